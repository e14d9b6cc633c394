"""A warm ``select``: stores and scores that are up to date are decided from the files alone, in a
process that never imports torch (nor torchvision, nor faiss), with the output of a run that does;
everything that needs a model pass is still detected."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from alfk_cli.models.archs import ROTATION_CLASSES, build_model
from alfk_cli.models.checkpoint import file_sha256, save_checkpoint
from alfk_cli.store.format import content_fingerprint
from conftest import write_images

# Runs ``alfk ARGS`` and appends to the file LOG every import of torch, torchvision, faiss or timm that
# is attempted (found or not, caught or not) and every read of an alfk entry-point group.
DRIVER = """
import importlib.metadata, sys

log_path, sys.argv = sys.argv[1], ["alfk", *sys.argv[2:]]

def note(what):
    with open(log_path, "a") as log:
        log.write(what + "\\n")

class Record:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision", "faiss", "timm"):
            note(name)
        return None

sys.meta_path.insert(0, Record())
entry_points = importlib.metadata.entry_points

def recorded(**kw):
    if str(kw.get("group", "")).startswith("alfk."):
        note("entry points " + kw["group"])
    return entry_points(**kw)

importlib.metadata.entry_points = recorded
from alfk_cli.cli.main import main
main()
"""

WORK = Path(".alfk") / "pool"
# looks (--no-ledger): a recorded night leaves out the last one's images, so it scores anew
SELECT = ("select", "--val", "val", "--pool", "pool", "--P", "5", "--no-ledger", "--model", "init.pt", "--workers", "0")  # fmt: skip


@pytest.fixture
def world(small_world):
    """val/ (3 classes × 4), a pool of 30 images, a rotation checkpoint init.pt."""
    return small_world


def _checkpoint(path: str, seed: int) -> None:
    model = build_model("lenet", len(ROTATION_CLASSES), seed=seed)
    save_checkpoint(path, model, "lenet", list(ROTATION_CLASSES), head="rotation")


def _alfk(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``alfk ARGS`` in a fresh process: its result and what it imported of torch and friends."""
    log = Path("imports.log")
    log.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    env.pop("ALFK_PROGRESS", None)
    r = subprocess.run(
        [sys.executable, "-c", DRIVER, str(log), *args],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    return r, log.read_text().split("\n")[:-1] if log.exists() else []


def _files() -> dict[str, bytes]:
    """The bytes of everything in the work folder but its lock."""
    return {p.name: p.read_bytes() for p in sorted(WORK.iterdir()) if p.name != "lock"}


def _timeless(stderr: str) -> str:
    """stderr without the durations and rates, which differ between two runs."""
    return re.sub(r"\d+\.\d+ s|\d+ images/s", "T", stderr)


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("--pool-list", "list.txt", "--format", "csv", "--taps", "conv1,conv2,fc1", "--strict"),
        ("--strategy", "margin", "--format", "label-studio", "--device", "cpu"),
    ],
    ids=["defaults", "pool-list-csv-taps", "margin"],
)
def test_warm_select_imports_no_torch_and_repeats_the_run(cli, world, extra):
    Path("list.txt").write_text(
        "".join(f"{p.relative_to('pool')}\n" for p in Path("pool").rglob("*.png"))
    )
    cold = cli(*SELECT, *extra)
    assert cold.exit_code == 0, cold.stderr
    before = _files()
    warm, heavy = _alfk(*SELECT, *extra)
    assert warm.returncode == 0, warm.stderr
    assert heavy == [], f"a warm select imported {heavy}"
    assert warm.stdout == cold.stdout
    assert _files() == before  # stores and scores file untouched, no ledger: nothing recorded
    for store in ("val.h5", "pool.h5", "scores.h5"):
        assert f"{WORK / store} is up to date" in warm.stderr
    assert "recorded" not in warm.stderr
    # the same run in a process that has torch loaded says the same
    again = cli(*SELECT, *extra)
    assert again.exit_code == 0 and again.stdout == cold.stdout
    assert _timeless(again.stderr) == _timeless(warm.stderr)
    assert _files() == before


def test_a_warm_select_on_a_timm_backbone_imports_neither_torch_nor_timm(cli, world):
    # the cron line names the backbone; the first night's pretrained checkpoint (untrained
    # weights here) is cached in the work folder, and the next night reads its record
    arch = "timm:resnet10t@28"
    WORK.mkdir(parents=True)
    model = build_model(arch, len(ROTATION_CLASSES), seed=0)
    save_checkpoint(WORK / "init.pt", model, arch, list(ROTATION_CLASSES), head="rotation")
    night = (*SELECT[:8], "--arch", arch, "--workers", "0", "--device", "cpu")
    cold = cli(*night, "--taps", "L896")
    assert cold.exit_code == 0, cold.stderr
    warm, heavy = _alfk(*night, "--taps", "L896")
    assert warm.returncode == 0, warm.stderr
    assert heavy == [], f"a warm select imported {heavy}"
    assert warm.stdout == cold.stdout and "scores.h5 is up to date" in warm.stderr


def test_printing_a_scores_file_imports_no_torch(cli, world):
    assert cli(*SELECT).exit_code == 0
    printed = cli("select", "--scores", str(WORK / "scores.h5"), "--format", "jsonl")
    r, heavy = _alfk("select", "--scores", str(WORK / "scores.h5"), "--format", "jsonl")
    assert r.returncode == 0 and heavy == [] and r.stdout == printed.stdout != ""


def test_listing_the_registries_imports_no_torch(world):
    r, heavy = _alfk("list")
    assert r.returncode == 0 and "architectures: lenet, resnet10, resnet18" in r.stdout
    assert [h for h in heavy if not h.startswith("entry points ")] == []
    assert "entry points alfk.strategies" in heavy  # plug-ins are looked for


def _summary(stderr: str, store: str) -> str:
    """The summary line of ``store`` (val.h5 or pool.h5) on stderr."""
    return next(ln for ln in stderr.splitlines() if f"/{WORK / store}: " in ln)


def test_a_replaced_checkpoint_of_equal_size_and_mtime_is_embedded_again(cli, world):
    assert cli(*SELECT).exit_code == 0
    st = os.stat("init.pt")
    _checkpoint("other.pt", seed=1)
    assert os.path.getsize("other.pt") == st.st_size  # same shapes: same size, other weights
    os.replace("other.pt", "init.pt")
    os.utime("init.pt", ns=(st.st_atime_ns, st.st_mtime_ns))
    r, heavy = _alfk(*SELECT)
    assert r.returncode == 0, r.stderr
    assert "12 computed" in _summary(r.stderr, "val.h5")
    assert "30 computed" in _summary(r.stderr, "pool.h5")
    assert "torch" in heavy  # the model passes need it
    for store in ("val.h5", "pool.h5"):
        with h5py.File(WORK / store) as f:
            assert f.attrs["checkpoint_sha256"] == file_sha256("init.pt")


def test_a_touched_or_copied_checkpoint_with_the_same_bytes_is_still_up_to_date(cli, world):
    cold = cli(*SELECT)
    assert cold.exit_code == 0, cold.stderr
    before = _files()
    os.utime("init.pt", ns=(1, 1))
    shutil.copy("init.pt", "copy.pt")
    for model in ("init.pt", "copy.pt"):
        r, heavy = _alfk(*SELECT[:-4], "--model", model, "--workers", "0")
        assert r.returncode == 0 and heavy == [], r.stderr
        assert r.stdout == cold.stdout
        for store in ("val.h5", "pool.h5", "scores.h5"):
            assert f"{WORK / store} is up to date" in r.stderr
    assert _files() == before


def test_a_new_pool_image_is_embedded_alone(cli, world):
    assert cli(*SELECT).exit_code == 0
    write_images(Path("pool"), 1, seed=12, prefix="new")
    r, heavy = _alfk(*SELECT)
    assert r.returncode == 0, r.stderr
    assert "0 computed, 12 reused" in _summary(r.stderr, "val.h5")
    assert "31 images (1 computed, 30 reused" in _summary(r.stderr, "pool.h5")
    assert "torch" in heavy


@pytest.mark.parametrize(
    ("option", "val_computed", "pool_computed", "scores_reused"),
    [
        (("--taps", "L20"), 12, 30, False),
        (("--seed", "1"), 12, 30, False),
        (("--pseudo-label", "yhat"), 0, 30, False),
        (("--kernel", "product"), 0, 0, False),
        (("--P", "4"), 0, 0, False),
        (("--exclude", "sent.txt"), 0, 0, False),
        (("--device", "cpu", "--workers", "1", "--format", "csv"), 0, 0, True),
    ],
)
def test_a_changed_option_recomputes_what_it_decides(
    cli, world, option, val_computed, pool_computed, scores_reused
):
    assert cli(*SELECT).exit_code == 0
    Path("sent.txt").write_text("pool/img0000.png\n")
    r = cli(*SELECT, *option)
    assert r.exit_code == 0, r.stderr
    assert f"({val_computed} computed" in _summary(r.stderr, "val.h5")
    assert f"({pool_computed} computed" in _summary(r.stderr, "pool.h5")
    assert (f"{WORK / 'scores.h5'} is up to date" in r.stderr) == scores_reused


def test_a_store_without_a_fingerprint_is_rewritten_not_trusted(cli, world):
    assert cli(*SELECT).exit_code == 0
    with h5py.File(WORK / "pool.h5", "a") as f:  # as if written by an alfk that recorded none
        del f.attrs["fingerprint"]
    r = cli(*SELECT)
    assert r.exit_code == 0, r.stderr
    assert "is up to date" not in _summary(r.stderr, "pool.h5")
    assert "30 images (0 computed, 30 reused" in _summary(r.stderr, "pool.h5")
    with h5py.File(WORK / "pool.h5") as f:
        assert "fingerprint" in f.attrs


def test_stores_from_before_are_judged_by_the_fingerprint_they_were_written_with(cli, world):
    """The configuration a validation store's fingerprint hashes, key for key as alfk wrote it
    before a checkpoint could be read without torch (c028598, this world's checkpoint hash),
    and the fingerprint of that configuration and the image list: a store written then is up to
    date now exactly when it was then. Since issue 19 the configuration also holds ``decode``
    (the decoding rule's version): stores decoded by the earlier rule are embedded once more."""
    assert cli(*SELECT).exit_code == 0
    with h5py.File(WORK / "val.h5") as f:
        config = json.loads(f.attrs["embed_config"])
        rows = [f["paths"].asstr()[:].tolist(), f["labels"][:], f["size"][:], f["mtime_ns"][:]]
        fingerprint = f.attrs["fingerprint"]
    assert config == {
        "alfk_version": "0.1.0", "arch": "lenet", "checkpoint_sha256": file_sha256("init.pt"),
        "classes": ["a", "b", "c"], "decode": 2, "mc": None, "pseudo_label": "true",
        "reference_data_sha256": None, "schema_version": 1, "seed": 0,
        "taps": ["conv1", "conv2", "fc1"],
    }  # fmt: skip
    assert fingerprint == content_fingerprint(config, *rows)


def test_stores_decoded_by_the_earlier_rule_are_embedded_again_once(cli, world):
    """Issue 19: EXIF orientation, 16-bit grey and first frames changed the pixels of some files;
    a store written before (no ``decode`` in its configuration, fingerprints as alfk wrote them
    then) is embedded again, in full and without an error, and is up to date after that."""
    from alfk_cli.store.format import config_fingerprint

    assert cli(*SELECT).exit_code == 0
    for store in ("val.h5", "pool.h5"):
        with h5py.File(WORK / store, "r+") as f:
            config = json.loads(f.attrs["embed_config"])
            del config["decode"]
            rows = [f["paths"].asstr()[:].tolist(), f["labels"][:], f["size"][:], f["mtime_ns"][:]]
            f.attrs["embed_config"] = json.dumps(config, sort_keys=True)
            f.attrs["config_fingerprint"] = config_fingerprint(config)
            f.attrs["fingerprint"] = content_fingerprint(config, *rows)
    r = cli(*SELECT)
    assert r.exit_code == 0 and "error" not in r.stderr, r.stderr
    assert "12 computed, 0 reused" in _summary(r.stderr, "val.h5")
    assert "30 computed, 0 reused" in _summary(r.stderr, "pool.h5")
    assert "made with other options, checkpoint or reference" in r.stderr
    r = cli(*SELECT)
    assert "0 computed, 12 reused" in _summary(r.stderr, "val.h5")
    assert "0 computed, 30 reused" in _summary(r.stderr, "pool.h5")


def test_a_damaged_checkpoint_is_an_error_as_before(cli, world):
    assert cli(*SELECT).exit_code == 0
    data = bytearray(Path("init.pt").read_bytes())
    Path("init.pt").write_bytes(bytes(data[: len(data) // 2]))
    r, _ = _alfk(*SELECT)
    assert r.returncode == 1 and r.stdout == ""
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("error: cannot read checkpoint init.pt: not an alfk checkpoint")
    )
