"""``alfk select --report``: the HTML page of a selection, through the real entry point."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from alfk_cli.models.archs import build_model
from alfk_cli.models.checkpoint import save_checkpoint
from conftest import make_labelled, write_images

ODD = 'it\'s "odd" <b>&amp;.png'
SELECT = ("select", "--val", "val", "--pool", "pool", "--model", "model.pt", "--device", "cpu",
          "--workers", "0", "--no-ledger")  # fmt: skip
VOID = {"meta", "img", "br", "hr", "link", "input"}


@pytest.fixture
def world(tmp_path, monkeypatch):
    """val/ (3 classes × 4), a pool of 12 images (one with an odd name), a 3-class checkpoint."""
    monkeypatch.chdir(tmp_path)
    make_labelled(Path("val"), ["a", "b", "c"], 4)
    write_images(Path("pool"), 11, seed=10, size=40, mode="RGB")
    shutil.copy("pool/img0000.png", Path("pool") / ODD)
    save_checkpoint("model.pt", build_model("lenet", 3, seed=0), "lenet", ["a", "b", "c"])
    return tmp_path


class Page(HTMLParser):
    """The page's structure, checking that every element is closed in order."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.groups: list[dict] = []
        self.svgs: list[dict] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in VOID:
            self.stack.append(tag)
        classes = (a.get("class") or "").split()
        if tag == "section" and "group" in classes:
            self.groups.append({"centre": a.get("data-centre"), "figures": []})
        elif tag == "figure":
            self.groups[-1]["figures"].append({"kind": a["class"], "rank": a.get("data-rank")})
        elif tag == "img":
            self.groups[-1]["figures"][-1]["src"] = a["src"]
            self.groups[-1]["figures"][-1]["alt"] = a["alt"]
        elif tag == "svg":
            self.svgs.append({"title": a.get("data-title"), "bars": []})
        elif tag == "rect" and "bar" in classes:
            self.svgs[-1]["bars"].append(a["data-class"])

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> does not close {self.stack[-1:] or 'anything'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _page(path: str | Path) -> Page:
    page = Page(Path(path).read_text(encoding="utf-8"))
    assert not page.errors, page.errors
    return page


def _png(uri: str) -> Image.Image:
    head, data = uri.split(",", 1)
    assert head == "data:image/png;base64"
    im = Image.open(io.BytesIO(base64.b64decode(data)))
    assert im.format == "PNG"
    im.load()
    return im


def test_report_groups_thumbnails_by_centre_in_rank_order(cli, world):
    r = cli(*SELECT, "--P", "6", "--format", "csv", "--report", "report.html")
    assert r.exit_code == 0, r.stderr
    page = _page("report.html")
    rows = [ln.split(",") for ln in r.stdout.splitlines()[1:]]
    centres = list(dict.fromkeys(row[-1] for row in rows))
    assert [g["centre"] for g in page.groups] == centres
    for g in page.groups:
        figs = g["figures"]
        assert figs[0]["kind"] == "centre" and figs[0]["alt"] == g["centre"]
        ranks = [int(f["rank"]) for f in figs[1:]]
        assert ranks == sorted(ranks)
        assert ranks == [int(row[1]) for row in rows if row[-1] == g["centre"]]
        for f in figs:
            assert max(_png(f["src"]).size) <= 128
    assert sum(len(g["figures"]) - 1 for g in page.groups) == 6
    text = " ".join(page.text)
    for what in ("date (UTC)", "strategy", "fk", "kernel", "checkpoint sha256", "alfk version"):
        assert what in text
    assert "http://" not in Path("report.html").read_text().replace('"http://www.w3.org/', "")
    assert "<script" not in Path("report.html").read_text()


def test_histograms_have_one_bar_per_class_with_error_mass(cli, world):
    assert cli(*SELECT, "--P", "6", "--report", "report.html").exit_code == 0
    page = _page("report.html")
    titles = [s["title"] for s in page.svgs]
    assert any("Validation error mass" in t for t in titles), titles
    assert any("Validation set" in t for t in titles), titles
    for svg in page.svgs:
        assert svg["bars"] == ["a", "b", "c"], svg


def test_thumbnails_are_downscaled(cli, world):
    write_images(Path("pool") / "big", 2, seed=3, size=300, mode="RGB")
    assert cli(*SELECT, "--P", "13", "--report", "report.html").exit_code == 0
    sizes = [_png(f["src"]).size for g in _page("report.html").groups for f in g["figures"]]
    assert (128, 128) in sizes and all(max(s) <= 128 for s in sizes)


def test_odd_file_names_are_escaped(cli, world):
    r = cli(*SELECT, "--P", "12", "--report", "report.html")
    assert r.exit_code == 0, r.stderr
    assert f"pool/{ODD}" in r.stdout.splitlines()
    raw = Path("report.html").read_text()
    assert ODD not in raw and "&lt;b&gt;&amp;amp;" in raw
    alts = [f["alt"] for g in _page("report.html").groups for f in g["figures"]]
    assert f"pool/{ODD}" in alts  # parsed back to the real name


def test_random_strategy_has_dashes_and_no_centre_group(cli, world):
    r = cli(*SELECT, "--P", "5", "--strategy", "random", "--report", "report.html")
    assert r.exit_code == 0, r.stderr
    page = _page("report.html")
    assert len(page.groups) == 1 and page.groups[0]["centre"] == ""
    figs = page.groups[0]["figures"]
    assert [f["rank"] for f in figs] == ["1", "2", "3", "4", "5"]
    text = page.text
    assert "no centre (5 selected)" in text
    assert text.count("score \u2014") == 5


def test_unwritable_report_fails_before_any_work(cli, world):
    r = cli(*SELECT, "--P", "5", "--report", "missing/report.html")
    assert r.exit_code != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "missing" in r.stderr, r.stderr
    assert r.stdout == ""
    assert not Path(".alfk").exists()
    Path("out").mkdir()
    r = cli(*SELECT, "--P", "5", "--report", "out")
    assert r.exit_code != 0 and "is a folder" in r.stderr and not Path(".alfk").exists()
    r = cli("select", "--scores", "nothing.h5", "--report", "nodir/r.html")
    assert r.exit_code != 0 and "nodir" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_report_does_not_change_stdout(cli, world):
    plain = cli(*SELECT, "--P", "6", "--format", "jsonl", "--quiet")
    with_report = cli(*SELECT, "--P", "6", "--format", "jsonl", "--quiet", "--report", "r.html")
    assert with_report.exit_code == 0, with_report.stderr
    assert with_report.stdout == plain.stdout and with_report.stderr == plain.stderr == ""
    assert Path("r.html").is_file()
    loud = cli(*SELECT, "--P", "6", "--format", "jsonl", "--report", "r2.html")
    assert loud.stdout == plain.stdout and "wrote report r2.html" in loud.stderr


def test_scores_file_report_with_and_without_the_validation_store(cli, world):
    assert cli(*SELECT, "--P", "6").exit_code == 0
    scores = ".alfk/pool/scores.h5"
    r = cli("select", "--scores", scores, "--report", "a.html")
    assert r.exit_code == 0, r.stderr
    page = _page("a.html")
    assert any("error mass" in s["title"] for s in page.svgs)
    assert sum(len(g["figures"]) - 1 for g in page.groups) == 6
    Path(".alfk/pool/val.h5").unlink()
    r = cli("select", "--scores", scores, "--P", "4", "--report", "b.html")
    assert r.exit_code == 0, r.stderr
    page = _page("b.html")
    titles = [s["title"] for s in page.svgs]
    assert not any("Validation" in t for t in titles)
    assert any("Predicted" in t for t in titles) and any("Centres" in t for t in titles)
    assert "No validation store was available" in " ".join(page.text)
    assert sum(len(g["figures"]) - 1 for g in page.groups) == 4


def test_unreadable_image_gets_a_placeholder(cli, world):
    r = cli(*SELECT, "--P", "6")
    assert r.exit_code == 0, r.stderr
    first, second = r.stdout.splitlines()[:2]
    Path(first).write_bytes(b"not a png at all")
    Path(second).unlink()
    r = cli("select", "--scores", ".alfk/pool/scores.h5", "--report", "report.html")
    assert r.exit_code == 0, r.stderr
    page = _page("report.html")
    text = " ".join(page.text)
    assert "cannot show: file not found" in text and text.count("cannot show") == 2
    srcs = [f.get("src") for g in page.groups for f in g["figures"]]
    assert srcs.count(None) == 2


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "firefox")


@pytest.mark.skipif(
    not any(shutil.which(b) for b in BROWSERS), reason="no headless browser installed"
)
def test_headless_browser_renders_the_page(cli, world, tmp_path):
    assert cli(*SELECT, "--P", "6", "--report", "report.html").exit_code == 0
    browser = next(b for b in BROWSERS if shutil.which(b))
    shot = tmp_path / "shot.png"
    url = (world / "report.html").resolve().as_uri()
    if browser == "firefox":
        cmd = [browser, "--headless", "--screenshot", str(shot), url]
    else:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu",
               f"--screenshot={shot}", "--window-size=1200,900", url]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    im = Image.open(shot).convert("L")
    lo, hi = im.getextrema()
    assert hi - lo > 50  # something was drawn, not a blank page
