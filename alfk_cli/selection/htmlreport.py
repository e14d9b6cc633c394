"""``alfk select --report``: the selection as one self-contained HTML page.

The page groups the selected images by the validation image (centre) each one matched, with
thumbnails embedded as base64 PNG data URIs, and draws class histograms as inline SVG. It loads
nothing from elsewhere (no scripts, no fonts, no CDN); every path and class name is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from alfk_cli import __version__
from alfk_cli.selection.scoresfile import Scores
from alfk_cli.util.atomic import atomic_output

#: Longest side of a thumbnail, in pixels.
THUMB_PX = 128
#: Thumbnails whose longest side is shorter than this (32 px CIFAR-10, 28 px MNIST) are drawn
#: enlarged to at least this size, with square pixels (``image-rendering: pixelated``).
MIN_DRAWN_PX = 96
NO_SCORE = "\u2014"  # strategies without scores (random) store NaN
NO_CENTRE = "no centre"

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table.prov td{padding:0 1em 0 0}table.prov td:first-child{color:#666}
.note{background:#fff6d6;border:1px solid #e6d28a;padding:.5em;max-width:60em}
.group{border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.5em}
.group h3{margin:.2em 0 .5em;font-size:1em;word-break:break-all}
.thumbs{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0;width:140px;font-size:.75em;word-break:break-all}
figure.centre{background:#eef4ff}
figure img{display:block;max-width:128px;max-height:128px}
img.enlarged{image-rendering:pixelated}
.placeholder{width:128px;height:96px;background:#eee;color:#a00;display:flex;
align-items:center;justify-content:center;text-align:center;padding:2px;box-sizing:border-box}
.charts{display:flex;flex-wrap:wrap;gap:2em}
.chart .title{font-weight:bold;font-size:.8em;margin-bottom:.3em}
svg.hist{display:block}svg.hist text{font-size:10px;font-family:sans-serif}
svg.hist rect.bar{fill:#4a7bd0}
"""


@dataclass
class ValStats:
    """What the page shows of the validation store: its classes, images and errors per class."""

    classes: list[str]
    counts: list[int]
    errors: list[int]


@dataclass
class _Group:
    centre: str
    members: list[int] = field(default_factory=list)  # indices into the selection


def val_stats(path: str | os.PathLike) -> ValStats:
    """Class counts and misclassified validation images per class of a validation store."""
    from alfk_cli.store.reader import open_store
    from alfk_cli.strategies.acquisition import misclassified

    with open_store(path) as store:
        classes = store.classes
        labels = np.asarray(store.labels[:]).reshape(-1).astype(np.int64)
        wrong = misclassified(store.logits[:], labels)
    counts = np.bincount(labels, minlength=len(classes))
    errors = np.bincount(labels[wrong], minlength=len(classes))
    return ValStats(classes, [int(c) for c in counts], [int(e) for e in errors])


def recorded_val_store(scores: Scores) -> Path | None:
    """The validation store a scores file was computed from, when it is still there unchanged."""
    from alfk_cli.errors import AlfkError
    from alfk_cli.store.reader import open_store

    path = scores.attrs.get("val_store")
    if not path or not Path(str(path)).is_file():
        return None
    try:
        with open_store(str(path)) as store:
            same = store.get_attr("fingerprint") == scores.attrs.get("val_store_fingerprint")
    except AlfkError:
        return None
    return Path(str(path)) if same else None


def write_report(
    out: str | os.PathLike, scores: Scores, *, val_store: str | os.PathLike | None = None
) -> Path:
    """Write the HTML page of ``scores`` to ``out`` (atomically) and return its path.

    ``val_store``: the validation feature store, for its class distribution and error mass per
    class; without it the page shows only what the scores file holds, and says so."""
    stats = val_stats(val_store) if val_store is not None else None
    page = render_report(scores, stats)
    out = Path(out)
    with atomic_output(out) as tmp:
        tmp.write_bytes(page.encode("utf-8"))
    return out


def render_report(scores: Scores, stats: ValStats | None = None) -> str:
    """The page as a string (see the module docstring)."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>alfk selection: {e(scores.image_root)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>alfk selection of {len(scores.paths)} images from {e(scores.image_root)}</h1>",
        _provenance(scores),
        "<h2>Class histograms</h2>",
        _histograms(scores, stats),
        "<h2>Selected images by matched validation image</h2>",
        "<p>Each group starts with the validation image (centre) its images matched, then the "
        "selected pool images in selection order: rank, predicted class, score.</p>",
        *(_group_html(g, scores) for g in _groups(scores)),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _provenance(scores: Scores) -> str:
    a = scores.attrs
    sha = str(a.get("checkpoint_sha256") or "")
    rows = [
        ("date (UTC)", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")),
        ("pool", scores.image_root),
        ("P", str(len(scores.paths))),
        ("strategy", str(a.get("strategy", "?"))),
        ("kernel", str(a.get("kernel", "?"))),
        ("checkpoint sha256", sha[:12] or "?"),
        ("alfk version", __version__),
    ]
    cells = "".join(
        f'<tr><td>{html.escape(k)}</td><td class="{html.escape(k.split()[0])}">'
        f"{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    return f'<table class="prov">{cells}</table>'


def _groups(scores: Scores) -> list[_Group]:
    """One group per centre, in the order of each centre's first selected image."""
    groups: dict[str, _Group] = {}
    for i, centre in enumerate(scores.center_paths):
        groups.setdefault(centre, _Group(centre)).members.append(i)
    return list(groups.values())


def _group_html(group: _Group, scores: Scores) -> str:
    paths = scores.printed_paths()
    figures = []
    if group.centre:
        title = f"centre {group.centre}"
        figures.append(
            _figure(group.centre, ["centre", f"class {_folder_class(group.centre)}"], "centre")
        )
    else:
        title = NO_CENTRE
    for i in group.members:
        caption = [f"#{i + 1}", f"predicted {scores.predicted[i]}", f"score {_score(scores, i)}"]
        figures.append(_figure(paths[i], caption, "selected", rank=i + 1))
    return (
        f'<section class="group" data-centre="{html.escape(group.centre)}">'
        f"<h3>{html.escape(title)} ({len(group.members)} selected)</h3>"
        f'<div class="thumbs">{"".join(figures)}</div></section>'
    )


def _figure(path: str, caption: list[str], kind: str, rank: int | None = None) -> str:
    thumb, reason = thumbnail(path)
    alt = html.escape(path)
    if thumb is not None:
        w, h = drawn_size(thumb.width, thumb.height)
        enlarged = ' class="enlarged"' if (w, h) != (thumb.width, thumb.height) else ""
        pic = f'<img src="{thumb.uri}" alt="{alt}" width="{w}" height="{h}"{enlarged}>'
    else:
        pic = f'<div class="placeholder">cannot show: {html.escape(str(reason))}</div>'
    rank_attr = f' data-rank="{rank}"' if rank is not None else ""
    lines = "".join(f"<div>{html.escape(c)}</div>" for c in caption)
    return (
        f'<figure class="{kind}"{rank_attr}>{pic}<figcaption>{lines}'
        f'<div class="path">{alt}</div></figcaption></figure>'
    )


@dataclass(frozen=True)
class Thumb:
    """A thumbnail: its PNG data URI and its size in pixels."""

    uri: str
    width: int
    height: int


def thumbnail(path: str | os.PathLike) -> tuple[Thumb | None, str | None]:
    """The image downscaled to at most ``THUMB_PX`` px as a PNG data URI, or None and the reason
    it cannot be read (never raises for a bad image)."""
    from alfk_cli.data.imagefile import decode_pixels, open_image

    try:
        with open_image(path) as raw:  # decoded as the model sees it (upright, 16-bit scaled)
            im = decode_pixels(raw)
            im.thumbnail((THUMB_PX, THUMB_PX))
            if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            size = im.size
    except FileNotFoundError:
        return None, "file not found"
    except Exception as exc:  # a truncated, unknown or hostile file: the page still renders
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, reason[:200]
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Thumb(uri, *size), None


def drawn_size(width: int, height: int) -> tuple[int, int]:
    """The size a ``width`` × ``height`` thumbnail is drawn at on the page.

    As it is when its longest side is at least ``MIN_DRAWN_PX``; else enlarged, by a whole factor
    when one brings the longest side within [MIN_DRAWN_PX, THUMB_PX] (every pixel the same size:
    32 px → 128, 28 px → 112), otherwise to ``THUMB_PX`` exactly."""
    side = max(width, height)
    if side >= MIN_DRAWN_PX:
        return width, height
    k = THUMB_PX // side
    scale = k if k * side >= MIN_DRAWN_PX else THUMB_PX / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _score(scores: Scores, i: int) -> str:
    s = float(scores.score[i])
    return NO_SCORE if math.isnan(s) else f"{s:.4g}"


def _folder_class(path: str) -> str:
    """A validation image's class: its class sub-folder's name."""
    return Path(path).parent.name or "?"


def _histograms(scores: Scores, stats: ValStats | None) -> str:
    batch = Counter(scores.predicted)
    centres = Counter(_folder_class(c) for c in dict.fromkeys(scores.center_paths) if c)
    if stats is not None:
        classes = list(stats.classes)
        classes += sorted((set(batch) | set(centres)) - set(classes))
    else:
        classes = sorted(set(batch) | set(centres))
    charts = [_svg_bars("Predicted classes in the batch", classes, [batch[c] for c in classes])]
    if stats is not None:
        val = dict(zip(stats.classes, stats.counts))
        err = dict(zip(stats.classes, stats.errors))
        charts.append(
            _svg_bars("Validation set by class", classes, [val.get(c, 0) for c in classes])
        )
        charts.append(
            _svg_bars(
                "Validation error mass (misclassified per class)",
                classes,
                [err.get(c, 0) for c in classes],
            )
        )
    if centres:
        charts.append(_svg_bars("Centres by class", classes, [centres[c] for c in classes]))
    note = ""
    if stats is None:
        note = (
            '<p class="note">No validation store was available (a scores file whose validation '
            "store is gone or changed): the histograms show only what the scores file holds, the "
            "batch's predicted classes and the centres' classes from their folder names.</p>"
        )
    return note + f'<div class="charts">{"".join(charts)}</div>'


#: Upper bounds on the drawn width of one character of the histograms' 10 px labels and on its
#: height, in px: the chart is sized from them so that no label is cut at its edges.
_CHAR_PX, _LINE_PX = 7.5, 10.0
_LABEL_CHARS = 14  # longer class names are cut to this, with an ellipsis (the tooltip has all)
_SIN45 = math.sqrt(0.5)


def _label(name: str) -> str:
    return name if len(name) <= _LABEL_CHARS else name[: _LABEL_CHARS - 1] + "\u2026"


def _svg_bars(title: str, classes: list[str], values: list[int]) -> str:
    """A bar chart, its title in HTML above an inline SVG: one ``rect.bar`` per class, each with
    a tooltip, its value above it and its class name below, slanted 45° down to the right."""
    bar, gap, left, top, height = 22, 6, 30, 16, 120
    centres = [left + gap + j * (bar + gap) + bar / 2 for j in range(len(classes))]
    # a label slanted 45° reaches (its length + its height) · sin 45° right of and below its start
    reach = [(len(_label(c)) * _CHAR_PX + _LINE_PX) * _SIN45 for c in classes]
    width = math.ceil(max([200.0] + [x + r + 4 for x, r in zip(centres, reach)]))
    axis = top + height
    total_h = math.ceil(axis + 10 + max(reach, default=0.0) + 4)
    peak = max(values, default=0) or 1
    e = html.escape
    body = []
    for name, v, cx in zip(classes, values, centres):
        h = round(height * v / peak, 1)
        y = axis - h
        body.append(
            f'<rect class="bar" data-class="{e(name)}" data-value="{v}" x="{cx - bar / 2}" '
            f'y="{y}" width="{bar}" height="{h}"><title>{e(name)}: {v}</title></rect>'
            f'<text class="value" x="{cx}" y="{y - 2}" text-anchor="middle">{v}</text>'
            f'<text class="label" transform="translate({cx},{axis + 10}) rotate(45)">'
            f"{e(_label(name))}</text>"
        )
    return (
        f'<div class="chart"><div class="title" style="max-width:{width}px">{e(title)} '
        f"(n={sum(values)})</div>"
        f'<svg class="hist" data-title="{e(title)}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{total_h}" viewBox="0 0 {width} {total_h}" role="img" '
        f'aria-label="{e(title)}">'
        f'<line x1="{left}" y1="{axis}" x2="{width}" y2="{axis}" stroke="#888"/>'
        f"{''.join(body)}</svg></div>"
    )
