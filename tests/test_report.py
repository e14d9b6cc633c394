"""``alfk select --report``: the HTML page of a selection, through the real entry point."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alfk_cli.checkpoint import save_checkpoint
from alfk_cli.models import build_model
from alfk_cli.report import drawn_size
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


@pytest.mark.parametrize(
    ("size", "drawn"),
    [((32, 32), (128, 128)), ((28, 28), (112, 112)), ((40, 40), (120, 120)),
     ((50, 50), (100, 100)), ((43, 43), (128, 128)), ((70, 35), (128, 64)),
     ((32, 16), (128, 64)), ((96, 96), (96, 96)), ((128, 60), (128, 60)), ((1, 1), (128, 128))],
)  # fmt: skip
def test_small_thumbnails_are_drawn_enlarged(size, drawn):
    assert drawn_size(*size) == drawn


def test_small_images_get_enlarged_pixelated_img_tags(cli, world):
    write_images(Path("pool") / "big", 1, seed=3, size=300, mode="RGB")
    assert cli(*SELECT, "--P", "13", "--report", "report.html").exit_code == 0
    tags = re.findall(r"<img [^>]*>", Path("report.html").read_text())
    drawn = {}
    for t in tags:
        size = tuple(int(v) for v in re.findall(r' (?:width|height)="(\d+)"', t))
        drawn.setdefault(re.search(r'alt="(val|pool/big|pool)', t).group(1), set()).add(
            (size, 'class="enlarged"' in t)
        )
    assert drawn == {
        "val": {((112, 112), True)},  # 28 px, 4×
        "pool": {((120, 120), True)},  # 40 px, 3×
        "pool/big": {((128, 128), False)},  # 300 px, downscaled to 128 and drawn as it is
    }
    assert "img.enlarged{image-rendering:pixelated}" in Path("report.html").read_text()


# --- the page as a person sees it: Chromium renders it, the test reads the screenshot -----------

CHROMIUM_FLAGS = ("--headless", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--force-device-scale-factor=1")  # fmt: skip
DESKTOP = (1280, 4000)  # a desktop width; tall enough for the whole test page in one shot
BAR_RGB = (0x4A, 0x7B, 0xD0)
# Added to a copy of the page (the report itself has no scripts): once laid out, it writes what
# was drawn where into an attribute that --dump-dom returns.
PROBE = """<script>addEventListener("load", () => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; };
  const all = (root, sel) => [...root.querySelectorAll(sel)];
  document.documentElement.setAttribute("data-probe", JSON.stringify({
    page: [document.documentElement.scrollWidth, document.documentElement.scrollHeight],
    figures: all(document, "figure").length,
    placeholders: all(document, ".placeholder").length,
    imgs: all(document, "img").map(i => ({alt: i.alt, box: box(i), ok: i.complete && i.naturalWidth > 0,
      natural: [i.naturalWidth, i.naturalHeight], rendering: getComputedStyle(i).imageRendering})),
    svgs: all(document, "svg.hist").map(s => ({title: s.dataset.title, box: box(s),
      bars: all(s, "rect.bar").map(b => ({cls: b.dataset.class, value: +b.dataset.value, box: box(b)})),
      texts: all(s, "text").map(t => ({text: t.textContent, label: t.classList.contains("label"),
        box: box(t)}))})),
  }));
});</script>"""


@pytest.fixture
def chromium() -> str:
    """Chromium's path; without one the test skips (fails where ALFK_REQUIRE_CHROMIUM is set, as
    .ci/run sets it, so CI cannot skip it silently)."""
    found = next((p for b in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(b))), None)  # fmt: skip
    if found is None:
        if os.environ.get("ALFK_REQUIRE_CHROMIUM"):
            pytest.fail("ALFK_REQUIRE_CHROMIUM is set but no chromium is on PATH")
        pytest.skip("no headless Chromium on PATH (apt-get install chromium; .ci/run does)")
    return found


def _render(chromium: str, page: Path, out: Path) -> tuple[dict, Image.Image]:
    """Chromium's layout probe and screenshot of ``page`` at the desktop size (one start)."""
    probed = out / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"))
    shot = out / "shot.png"
    sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses root
    cmd = [chromium, *CHROMIUM_FLAGS, *sandbox, f"--user-data-dir={out / 'profile'}",
           f"--window-size={DESKTOP[0]},{DESKTOP[1]}", f"--screenshot={shot}", "--dump-dom",
           probed.resolve().as_uri()]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        dom, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the browser and its renderers: its own session
        proc.communicate()
        pytest.fail("chromium did not finish within 60 s")
    found = re.search(r'<html[^>]* data-probe="([^"]*)"', dom)
    assert proc.returncode == 0 and found and shot.is_file(), (proc.returncode, err[-2000:])
    return json.loads(html.unescape(found.group(1))), Image.open(shot).convert("RGB")


def _off(shot: Image.Image, want: Image.Image, x: float, y: float) -> float:
    """Mean absolute difference between ``want`` and the screenshot at (x, y), best within a
    pixel of it (layout may put an image at a fractional position)."""
    ref = np.asarray(want.convert("RGB"), dtype=np.float64)
    best = math.inf
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            left, top = round(x) + dx, round(y) + dy
            crop = shot.crop((left, top, left + want.width, top + want.height))
            best = min(best, float(np.abs(np.asarray(crop, dtype=np.float64) - ref).mean()))
    return best


def _drawn_problems(probe: dict, shot: Image.Image, root: Path) -> list[str]:
    """What the page fails to show: every thumbnail decoded and its pixels on screen, enlarged
    pixel for pixel when small; every bar drawn at its height in the bar colour; every text of a
    chart inside the chart."""
    bad = []
    if probe["page"][0] > DESKTOP[0] or probe["page"][1] > DESKTOP[1]:
        bad.append(f"page {probe['page']} does not fit the screenshot {DESKTOP}")
    if len(probe["imgs"]) + probe["placeholders"] != probe["figures"]:
        bad.append(f"{probe['figures']} figures, {len(probe['imgs'])} images")
    for img in probe["imgs"]:
        x, y, w, h = img["box"]
        with Image.open(root / img["alt"]) as src:
            src.thumbnail((128, 128))
            want = src.convert("RGB").resize((round(w), round(h)), Image.Resampling.NEAREST)
            small = max(src.size) < 96
        if not img["ok"]:
            bad.append(f"thumbnail not decoded: {img['alt']}")
        elif (d := _off(shot, want, x, y)) > 12:
            bad.append(f"thumbnail not drawn as its image: {img['alt']} (mean diff {d:.0f})")
        if small and (max(w, h) < 96 or img["rendering"] != "pixelated"):
            bad.append(f"small thumbnail drawn at {w}×{h}, {img['rendering']}: {img['alt']}")
    for svg in probe["svgs"]:
        sx, sy, sw, sh = svg["box"]
        peak = max(b["value"] for b in svg["bars"]) or 1
        for b in svg["bars"]:
            x, y, w, h = b["box"]
            if abs(h - 120 * b["value"] / peak) > 1:
                bad.append(f"{svg['title']}: bar {b['cls']} drawn {h} px high for {b['value']}")
            elif h >= 3:
                inner = np.asarray(
                    shot.crop((round(x) + 1, round(y) + 1, round(x + w) - 1, round(y + h) - 1))
                )
                if np.abs(inner.reshape(-1, 3).mean(0) - BAR_RGB).max() > 8:
                    bad.append(f"{svg['title']}: bar {b['cls']} not drawn in the bar colour")
        for t in svg["texts"]:
            x, y, w, h = t["box"]
            if (
                w <= 0
                or x < sx - 0.5
                or y < sy - 0.5
                or x + w > sx + sw + 0.5
                or y + h > sy + sh + 0.5
            ):
                bad.append(
                    f"{svg['title']}: text {t['text']!r} at {t['box']} cut by the chart {svg['box']}"
                )
    return bad


CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def cifar_report(cli, tmp_path, monkeypatch) -> Path:
    """The report of a CIFAR-10-like world: 32 px images, the ten class names, one 300 px image."""
    monkeypatch.chdir(tmp_path)
    make_labelled(Path("val"), CIFAR10, 2, size=32, mode="RGB")
    write_images(Path("pool"), 9, seed=10, size=32, mode="RGB")
    write_images(Path("pool"), 1, seed=11, size=300, mode="RGB", prefix="big")
    save_checkpoint("model.pt", build_model("lenet", 10, seed=0), "lenet", CIFAR10)
    r = cli(*SELECT, "--P", "10", "--report", "report.html")
    assert r.exit_code == 0, r.stderr
    return tmp_path / "report.html"


def test_report_is_drawn_in_chromium(chromium, cifar_report, tmp_path):
    probe, shot = _render(chromium, cifar_report, tmp_path)
    assert _drawn_problems(probe, shot, tmp_path) == []
    imgs = probe["imgs"]
    assert len(imgs) == probe["figures"] > 10 and probe["placeholders"] == 0
    sizes = {img["alt"]: tuple(img["box"][2:]) for img in imgs}
    assert sizes.pop("pool/big0000.png") == (128, 128)  # downscaled, drawn as it is
    assert set(sizes.values()) == {(128, 128)}  # 32 px, drawn 4× with square pixels
    assert [s["title"].split()[0] for s in probe["svgs"]] == ["Predicted", "Validation",
                                                             "Validation", "Centres"]  # fmt: skip
    for svg in probe["svgs"]:
        assert [b["cls"] for b in svg["bars"]] == CIFAR10
        assert [t["text"] for t in svg["texts"] if t["label"]] == CIFAR10  # "truck", not "truc"
    assert any(b["value"] > 0 for s in probe["svgs"] for b in s["bars"])


def test_the_browser_check_sees_a_broken_page(chromium, cifar_report, tmp_path):
    """The check above can fail: a corrupt data URI, an unfilled bar, a label cut at the edge."""
    page = cifar_report.read_text()
    centre = re.search(r'<img src="data:[^"]*" alt="(val/[^"]*)"', page)[1]  # the first centre
    page, n = re.subn(rf'(<img src="data:image/png;base64,)[^"]*(" alt="{re.escape(centre)}")',
                      r"\g<1>iVBORw0KGgoAAAANSUhEUgAAACAAAAAg\g<2>", page)  # fmt: skip
    assert n == 1  # a data URI cut short: a PNG header with no image data
    chart = r'(<svg class="hist" data-title="Validation set by class"[^>]*>)'
    page, n = re.subn(chart + "(<line[^>]*>)<rect ", r'\1\2<rect style="fill:none" ', page)
    assert n == 1
    # the last chart 20 px narrower, as before the fix: its last label ("truck") is cut
    page, n = re.subn(
        r'(data-title="Centres by class"[^>]* width=")(\d+)(" height="\d+" viewBox="0 0 )\d+',
        lambda m: f"{m[1]}{int(m[2]) - 20}{m[3]}{int(m[2]) - 20}",
        page,
    )
    assert n == 1
    broken = tmp_path / "broken.html"
    broken.write_text(page)
    bad = _drawn_problems(*_render(chromium, broken, tmp_path), tmp_path)
    assert bad[:2] == [
        f"thumbnail not decoded: {centre}",
        "Validation set by class: bar airplane not drawn in the bar colour",
    ], bad
    assert len(bad) == 3 and bad[2].startswith("Centres by class: text 'truck' "), bad
