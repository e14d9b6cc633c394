"""``alfk embed``, ``score`` and ``select`` through the real entry point, on tiny folders."""

import json
import shutil
from pathlib import Path

import h5py
import pytest

from alfk_cli.models.archs import ROTATION_CLASSES, build_model
from alfk_cli.models.checkpoint import save_checkpoint
from conftest import make_labelled, write_images


@pytest.fixture
def world(tmp_path, monkeypatch):
    """val/ (3 classes × 4), a flat pool of 40 images in two sub-folders, and a rotation checkpoint."""
    monkeypatch.chdir(tmp_path)
    make_labelled(Path("val"), ["a", "b", "c"], 4)
    write_images(Path("pool") / "day1", 20, seed=10)
    write_images(Path("pool") / "day2", 20, seed=11)
    save_checkpoint(
        "init.pt", build_model("lenet", 4, seed=0), "lenet", list(ROTATION_CLASSES), head="rotation"
    )
    return tmp_path


# alfk select on the fixture's folders, P = 5, with the fixture's checkpoint
SELECT_5 = (
    "select",
    "--val",
    "val",
    "--pool",
    "pool",
    "--P",
    "5",
    "--model",
    "init.pt",
    "--device",
    "cpu",
)


def _lines(r):
    return [ln for ln in r.stdout.splitlines() if ln]


def test_select_prints_p_distinct_existing_paths(cli, world):
    r = cli(
        "select",
        "--val",
        "val",
        "--pool",
        "pool",
        "--P",
        "7",
        "--model",
        "init.pt",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.stderr
    paths = _lines(r)
    assert len(paths) == 7 == len(set(paths))
    assert all(p.startswith("pool/") and Path(p).is_file() for p in paths)
    assert (world / ".alfk" / "pool" / "scores.h5").is_file()


def test_rerun_with_nothing_changed_does_no_model_pass(cli, world, monkeypatch):
    args = SELECT_5
    first = cli(*args)
    assert first.exit_code == 0, first.stderr

    def no_passes(*a, **k):
        raise AssertionError("a model pass on an unchanged re-run")

    monkeypatch.setattr("alfk_cli.features.descriptors.describe_batch", no_passes)
    monkeypatch.setattr("alfk_cli.features.estimators.describe_images", no_passes)
    look = cli(*args, "--no-ledger")
    assert look.exit_code == 0, look.stderr
    # the stores are reused; the ledger leaves night 1 out, so five new images come
    assert len(_lines(look)) == 5 and not set(_lines(look)) & set(_lines(first))
    again = cli(*args)  # the night the look showed: its scores file, up to date
    assert again.exit_code == 0 and again.stdout == look.stdout, again.stderr
    assert "scores.h5 is up to date" in again.stderr


def test_pool_that_gained_images_embeds_only_new_ones(cli, world):
    args = SELECT_5
    assert cli(*args).exit_code == 0
    write_images(Path("pool") / "day3", 6, seed=12)
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    assert "pool.h5: 46 images (6 computed, 40 reused" in r.stderr


def test_exclusions_and_validation_images_never_selected(cli, world):
    # the pool also contains the validation folder: those images must never come out
    shutil.copytree("val", "pool/val_copy")

    def select(P, *extra):
        return cli(
            "select", "--val", "pool/val_copy", "--pool", "pool", "--P", str(P), "--model",
            "init.pt", "--device", "cpu", "--workdir", "wd", "--no-ledger", *extra,
        )  # fmt: skip

    base = select(40)
    assert base.exit_code == 0, base.stderr
    chosen = _lines(base)
    assert not any("val_copy" in p for p in chosen) and len(set(chosen)) == 40
    Path("sent.txt").write_text("\n".join(chosen[:10]) + "\n")
    r = select(30, "--exclude", "sent.txt")
    assert r.exit_code == 0, r.stderr
    assert set(_lines(r)) == set(chosen[10:])  # the 40 non-validation images minus the 10 sent
    over = select(31, "--exclude", "sent.txt")
    # the end of a pool: the 30 left, with a warning; --exact-count keeps the strict behaviour
    assert over.exit_code == 0, over.stderr
    assert set(_lines(over)) == set(chosen[10:])
    assert "warning: only 30 pool image(s) are left" in over.stderr
    strict = select(31, "--exclude", "sent.txt", "--exact-count")
    assert strict.exit_code == 1 and strict.stdout == ""
    assert (
        strict.stderr.strip().splitlines()[-1].startswith("error: only 30 pool image(s) are left")
    )


def test_p_larger_than_pool_is_an_error(cli, world):
    r = cli("select", "--val", "val", "--pool", "pool", "--P", "41", "--model", "init.pt")
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1].startswith(
        "error: P=41 is more than the 40"
    )
    assert not (world / ".alfk" / "pool" / "pool.h5").exists()


def test_select_pretrains_when_no_model(cli, world):
    r = cli("select", "--val", "val", "--pool", "pool", "--P", "3", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert "pretrained" in r.stderr and (world / ".alfk" / "pool" / "init.pt").is_file()
    assert len(_lines(r)) == 3


def test_stages_by_hand_and_formats(cli, world):
    assert (
        cli(
            "embed", "--model", "init.pt", "--images", "val", "--out", "val.h5", "--device", "cpu"
        ).exit_code
        == 0
    )
    r = cli(
        "embed",
        "--model",
        "init.pt",
        "--images",
        "pool",
        "--reference",
        "val.h5",
        "--out",
        "pool.h5",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.stderr
    assert "pool.h5: 40 images" in r.stderr and r.stdout == ""
    r = cli(
        "score",
        "--val",
        "val.h5",
        "--pool",
        "pool.h5",
        "--P",
        "6",
        "--out",
        "scores.h5",
        "--kernel",
        "product",
    )
    assert r.exit_code == 0, r.stderr
    txt = cli("select", "--scores", "scores.h5")
    assert len(_lines(txt)) == 6
    head = cli("select", "--scores", "scores.h5", "--P", "2")
    assert _lines(head) == _lines(txt)[:2]
    csv_out = _lines(cli("select", "--scores", "scores.h5", "--format", "csv"))
    assert csv_out[0] == "path,rank,score,predicted,center" and len(csv_out) == 7
    rows = [
        json.loads(x) for x in _lines(cli("select", "--scores", "scores.h5", "--format", "jsonl"))
    ]
    assert [r["path"] for r in rows] == _lines(txt)
    assert all(r["predicted"] in {"a", "b", "c"} and r["center"].startswith("val/") for r in rows)
    assert [r["rank"] for r in rows] == list(range(1, 7))
    short = cli("select", "--scores", "scores.h5", "--P", "7")  # all 6, and a warning
    assert short.exit_code == 0 and _lines(short) == _lines(txt)
    assert "warning: this scores file holds 6 images" in short.stderr
    assert cli("select", "--scores", "scores.h5", "--P", "7", "--exact-count").exit_code == 1


def test_mismatched_and_unknown_stores(cli, world):
    assert (
        cli(
            "embed", "--model", "init.pt", "--images", "val", "--out", "val.h5", "--device", "cpu"
        ).exit_code
        == 0
    )
    save_checkpoint(
        "other.pt",
        build_model("lenet", 4, seed=1),
        "lenet",
        list(ROTATION_CLASSES),
        head="rotation",
    )
    assert (
        cli(
            "embed", "--model", "other.pt", "--images", "val", "--out", "val2.h5", "--device", "cpu"
        ).exit_code
        == 0
    )
    r = cli(
        "embed",
        "--model",
        "other.pt",
        "--images",
        "pool",
        "--reference",
        "val2.h5",
        "--out",
        "pool2.h5",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.stderr
    r = cli("score", "--val", "val.h5", "--pool", "pool2.h5", "--P", "3", "--out", "s.h5")
    assert r.exit_code == 1 and "different checkpoints" in r.stderr and not Path("s.h5").exists()
    with h5py.File("val2.h5", "a") as f:
        f.attrs["schema_version"] = 99
    r = cli("score", "--val", "val2.h5", "--pool", "pool2.h5", "--P", "3", "--out", "s.h5")
    assert r.exit_code == 1 and "schema version 99" in r.stderr
    r = cli("select", "--scores", "nope.h5")
    assert r.exit_code == 1 and "does not exist" in r.stderr


def test_usage_errors(cli, world):
    assert cli("select", "--val", "val").exit_code == 2
    assert cli("select", "--scores", "x.h5", "--val", "val").exit_code == 2
    assert (
        cli("select", "--val", "val", "--pool", "pool", "--P", "3", "--format", "xml").exit_code
        == 2
    )


def test_unchanged_embed_leaves_the_store_untouched(cli, world):
    args = ("embed", "--model", "init.pt", "--images", "val", "--out", "val.h5", "--device", "cpu")
    assert cli(*args).exit_code == 0
    before = Path("val.h5").stat().st_mtime_ns
    r = cli(*args)
    assert r.exit_code == 0 and "val.h5 is up to date" in r.stderr and "0 computed" in r.stderr
    assert Path("val.h5").stat().st_mtime_ns == before
    # a changed image is recomputed, the rest reused
    write_images(Path("val") / "a", 1, seed=99)  # overwrites val/a/img0000.png with new pixels
    r = cli(*args)
    assert r.exit_code == 0 and "1 computed" in r.stderr


def test_scores_are_cached_until_an_input_changes(cli, world):
    args = [*SELECT_5, "--no-ledger"]  # looks: a recorded run would leave the last one's out
    assert cli(*args).exit_code == 0
    scores = world / ".alfk" / "pool" / "scores.h5"
    before = scores.stat().st_mtime_ns
    r = cli(*args)
    assert "scores.h5 is up to date" in r.stderr and scores.stat().st_mtime_ns == before
    r = cli(*args[:-6], "6", *args[-5:])  # another P
    assert r.exit_code == 0 and len(r.stdout.split()) == 6 and scores.stat().st_mtime_ns != before
    sent = r.stdout.split()[0]
    Path("sent.txt").write_text(sent + "\n")
    r = cli(*args, "--exclude", "sent.txt")  # a new exclusion list
    assert r.exit_code == 0 and "scores.h5 is up to date" not in r.stderr
    assert sent not in r.stdout.split() and len(r.stdout.split()) == 5


def test_pool_inside_validation_folder_and_disjoint_folders(cli, world):
    # pool lies inside the validation folder's tree: its images under val/a are validation images
    make_labelled(Path("data"), ["a", "b", "c"], 4)
    write_images(Path("data") / "a" / "extra", 3, seed=50, prefix="x")
    r = cli(
        "select",
        "--val",
        "data",
        "--pool",
        "data/a",
        "--P",
        "3",
        "--model",
        "init.pt",
        "--device",
        "cpu",
        "--workdir",
        "wd2",
    )
    # every image under data/a is a validation image: nothing is left to select tonight
    assert r.exit_code == 0 and r.stdout == ""
    assert "warning: only 0 pool image(s) are left" in r.stderr


def test_unreadable_pool_files_are_listed_under_the_pool_and_skipped(cli, world):
    Path("pool/day1/broken.png").write_bytes(b"junk")
    Path("pool/notes.txt").write_text("not an image")
    r = cli(
        "select",
        "--val",
        "val",
        "--pool",
        "pool",
        "--P",
        "3",
        "--model",
        "init.pt",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.stderr
    assert (
        "pool/day1/broken.png: unreadable image" in r.stderr
        and "pool/notes.txt: not an image file" in r.stderr
    )
    assert "pool.h5/" not in r.stderr
    assert all("broken" not in p for p in r.stdout.split())
    strict = cli(
        "select", "--val", "val", "--pool", "pool", "--P", "3", "--model", "init.pt", "--strict"
    )
    assert strict.exit_code == 1 and "not an image file (and 1 more)" in strict.stderr
