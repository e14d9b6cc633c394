"""Read labels back from the labelling tool: a Label Studio export or a ``path,label`` CSV.

Accepted files (the formats are Label Studio's, https://labelstud.io/guide/export, with the task
layout of https://labelstud.io/guide/task_format):

- **JSON** (Label Studio's "JSON" export): a list of tasks, each
  ``{"id": 7, "data": {"image": ..., "alfk_path": ...}, "annotations": [{"result": [{"type":
  "choices", "value": {"choices": ["cat"]}, ...}], "was_cancelled": false, ...}]}``. The latest
  annotation counts (by ``updated_at``, else ``created_at``, else its place in the list); a task
  whose latest annotation is cancelled, or that has none or no choice, is skipped.
- **JSON_MIN** (Label Studio's "JSON_MIN" export): a list of flat records, one per annotation:
  the task's data fields, one field per control and the annotation's bookkeeping, ``{"id": 7,
  "image": ..., "alfk_path": ..., "choice": "cat", "annotation_id": 12, "updated_at": ...}``. A
  task annotated twice (relabelled) has two records with its ``id``; the latest counts (by
  ``updated_at``, else ``created_at``, then ``annotation_id``), as in JSON. The label is the
  ``choice`` field (the image-classification template's control), else the only field that is
  neither Label Studio's bookkeeping nor a data field alfk writes (a ``<Choices>`` tag of another
  name), else any field holding ``{"choices": [...]}``. Cancelled annotations are not exported.
- **Label Studio CSV** (its "CSV" export): the JSON_MIN records as rows, one column per field
  (``alfk_path``, ``choice``, ``annotation_id``, ...; several choices as a JSON cell), read as
  JSON_MIN. Told apart from the CSV below by its ``annotator`` and ``annotation_id`` columns.
- **CSV**: a header with ``path`` and ``label`` columns, one image per row; an empty label skips
  the row.

Which image: ``alfk_path`` (the path as ``alfk select`` printed it), else ``image`` when it is a
local path; relative paths are joined to ``root``. A URL-style ``image`` (``/data/local-files/?d=``,
``s3://``, ``http://``) names no local file unless ``url_prefix`` strips it to a path (then joined
to ``root``, URL-decoded). These are only what an export *names*: ``label_filing`` files an image
only when it resolves to a regular image file inside the pool folder, so that an export cannot
name ``../../etc/shadow``, ``/etc/passwd`` or ``%2e%2e/`` its way to a file outside it.

A JSON object instead of a list is one task when it has a ``data`` object (what Label Studio's
task API, ``GET /api/tasks/<id>``, returns); any other object is an error, since no Label Studio
export is one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from alfk_cli.errors import AlfkError
from alfk_cli.names import printable

# Label Studio serves uploads and local-storage files under /data/; anything with a scheme is a URL.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SERVED = ("/data/upload/", "/data/local-files/")
# JSON_MIN and Label Studio CSV fields that are never the label: Label Studio's bookkeeping of the
# annotation and the data fields alfk select writes
_BOOKKEEPING = ("id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time")
_NOT_LABELS = frozenset(
    (*_BOOKKEEPING, "agreement", "image", "alfk_path", "alfk_rank", "alfk_score", "alfk_center")
)


@dataclass(frozen=True)
class Labelled:
    """One task or row: which pool image, which class, or why it is skipped."""

    where: str  # how messages name it: "export.json task 7", "labels.csv line 3"
    source: Path | None  # the pool image, joined to root; None when skipped
    label: str | None  # None when skipped
    skip: str | None = None  # "cancelled" or "unlabelled"


def read_labels(
    path: str | Path, *, root: str | Path = ".", url_prefix: str | None = None
) -> list[Labelled]:
    """The labels in one export file (JSON, JSON_MIN or CSV, told apart by their content)."""
    path, root = Path(path), Path(root)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise AlfkError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise AlfkError(f"{path} is a folder, not an export file") from None
    except UnicodeDecodeError:
        raise AlfkError(f"{path} is not UTF-8 text (a JSON or CSV export)") from None
    except OSError as exc:
        raise AlfkError(f"cannot read {path}: {exc.strerror}") from None
    if text.lstrip()[:1] in ("[", "{"):
        return _read_json(path, text, root, url_prefix)
    if _is_label_studio_csv(text):
        return _read_label_studio_csv(path, text, root, url_prefix)
    return _read_csv(path, text, root)


def _read_json(path: Path, text: str, root: Path, url_prefix: str | None) -> list[Labelled]:
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AlfkError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if isinstance(tasks, dict):
        if not isinstance(tasks.get("data"), dict):
            raise AlfkError(
                f"{path} is a JSON object, not a Label Studio export (a list of tasks, or one "
                "task with a data object)"
            )
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise AlfkError(f"{path} is not a Label Studio export (a list of tasks)")
    return _labelled(path, tasks, root, url_prefix)


def _labelled(
    path: Path, tasks: list[dict[str, Any]], root: Path, url_prefix: str | None
) -> list[Labelled]:
    """Each task's image and label: full tasks (JSON) and flat records (JSON_MIN, CSV) alike."""
    out = []
    for i, task in _latest_per_task(tasks):
        where = f"{path.name} task {task.get('id', f'#{i + 1}')}"
        data: dict[str, Any]
        if "annotations" in task or isinstance(task.get("data"), dict):
            data = task["data"] if isinstance(task.get("data"), dict) else {}
            label, skip = _task_label(task, where)
        else:  # JSON_MIN: the data fields and the controls side by side
            data = task
            label, skip = _min_label(task, where)
        source = _image(data, where, root, url_prefix) if skip is None else None
        out.append(Labelled(where, source, label, skip))
    return out


def _latest_per_task(records: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(place, record) with one flat record per task: JSON_MIN and CSV exports hold one record per
    annotation, so a task annotated twice has two with its ``id``; the latest stands in the place
    of the first. Full tasks (JSON) and records without an ``id`` stand alone."""
    out: list[tuple[int, dict[str, Any]]] = []
    first: dict[str, int] = {}  # task id -> index in out
    for i, record in enumerate(records):
        tid = record.get("id")
        flat = "annotations" not in record and not isinstance(record.get("data"), dict)
        if not flat or not isinstance(tid, (int, str)) or tid == "":
            out.append((i, record))
        elif str(tid) not in first:
            first[str(tid)] = len(out)
            out.append((i, record))
        elif _when(record) >= _when(out[first[str(tid)]][1]):
            out[first[str(tid)]] = (i, record)
    return out


def _when(record: dict[str, Any]) -> tuple[str, int]:
    """When a flat record's annotation was last changed: ISO time stamps sort as text."""
    try:
        annotation = int(record.get("annotation_id") or -1)
    except (TypeError, ValueError):
        annotation = -1
    return str(record.get("updated_at") or record.get("created_at") or ""), annotation


def _task_label(task: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    """(label, None) or (None, why skipped) from a task's latest annotation."""
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
    if not annotations:
        return None, "unlabelled"
    latest = max(
        enumerate(annotations),
        key=lambda ia: (str(ia[1].get("updated_at") or ia[1].get("created_at") or ""), ia[0]),
    )[1]
    if latest.get("was_cancelled"):
        return None, "cancelled"
    choices: list[Any] = []
    for result in latest.get("result") or []:
        value = result.get("value") if isinstance(result, dict) else None
        if isinstance(value, dict) and isinstance(value.get("choices"), list):
            choices.extend(c for c in value["choices"] if c not in choices)
    return _one_choice(choices, where)


def _min_label(record: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    if record.get("was_cancelled"):
        return None, "cancelled"
    controls = [key for key in record if key not in _NOT_LABELS and key != "was_cancelled"]
    if "choice" in record or len(controls) == 1:
        value = record["choice" if "choice" in record else controls[0]]
        choices = value.get("choices", []) if isinstance(value, dict) else [value]
    else:
        choices = []
        for key in controls:
            value = record[key]
            if isinstance(value, dict) and isinstance(value.get("choices"), list):
                choices.extend(c for c in value["choices"] if c not in choices)
    return _one_choice([c for c in choices if c not in (None, "")], where)


def _one_choice(choices: list[Any], where: str) -> tuple[str | None, str | None]:
    if not choices:
        return None, "unlabelled"
    if len(choices) > 1:
        shown = ", ".join(printable(str(c)) for c in choices)
        raise AlfkError(f"{where} has several choices ({shown}); an image goes in one class")
    if not isinstance(choices[0], str):
        raise AlfkError(f"{where}: the choice {choices[0]!r} is not a class name")
    return choices[0], None


def _image(data: dict[str, Any], where: str, root: Path, url_prefix: str | None) -> Path:
    """The pool image a task names: its alfk_path, else its image when that is a local path."""
    alfk_path = data.get("alfk_path")
    if isinstance(alfk_path, str) and alfk_path:
        return root / alfk_path
    image = data.get("image")
    if not isinstance(image, str) or not image:
        raise AlfkError(f"{where} names no image (no alfk_path or image in its data)")
    if url_prefix and image.startswith(url_prefix):
        return root / unquote(image[len(url_prefix) :]).lstrip("/")
    if _SCHEME.match(image) or image.startswith(_SERVED):
        raise AlfkError(
            f"{where}: its image {printable(image)} is a URL, not a local file; give the task "
            "an alfk_path, or the URL prefix to strip"
        )
    return root / image


def _is_label_studio_csv(text: str) -> bool:
    header = next(csv.reader(io.StringIO(text)), [])
    return {"annotator", "annotation_id"} <= {h.strip() for h in header}


def _read_label_studio_csv(
    path: Path, text: str, root: Path, url_prefix: str | None
) -> list[Labelled]:
    """Label Studio's CSV export: its JSON_MIN records as rows (empty cells are absent fields; a
    cell holding several choices is JSON, ``{"choices": [...]}``)."""
    records = []
    for row in csv.DictReader(io.StringIO(text)):
        record: dict[str, Any] = {}
        for key, cell in row.items():
            if key is None or cell is None or cell == "":
                continue  # a row longer than the header, or an empty cell
            record[key] = cell  # a label that starts with a brace but is no JSON: as written
            if key not in _NOT_LABELS and cell.lstrip().startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    record[key] = json.loads(cell)
        records.append(record)
    return _labelled(path, records, root, url_prefix)


def _read_csv(path: Path, text: str, root: Path) -> list[Labelled]:
    rows = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(rows, [])]
    if "path" not in header or "label" not in header:
        raise AlfkError(
            f"{path} is neither a Label Studio export (JSON, JSON_MIN, CSV) nor a CSV with a "
            "path,label header"
        )
    ip, il = header.index("path"), header.index("label")
    out = []
    for n, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path.name} line {n}"
        if len(row) <= max(ip, il):
            raise AlfkError(f"{where} has {len(row)} columns; the header has {len(header)}")
        if not row[ip]:
            raise AlfkError(f"{where} has an empty path")
        label = row[il].strip()
        if not label:
            out.append(Labelled(where, None, None, "unlabelled"))
        else:
            out.append(Labelled(where, root / row[ip], label))
    return out
