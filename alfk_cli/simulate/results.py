"""The simulation's results: one row per (strategy, seed, round), as JSON lines and CSV.

Per round, ``runs/<strategy>/<seed>/round_<b>.json`` holds the row and the labelled rows; it is
written after the round's model, so it marks the round finished. ``results.jsonl`` and
``results.csv`` are rewritten from those files after every round.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alfk_cli.errors import AlfkError
from alfk_cli.util.atomic import atomic_output

__all__ = [
    "RESULT_COLUMNS",
    "RESULT_FIELDS",
    "claim_folder",
    "clean",
    "collect",
    "earlier_config",
    "finished_rounds",
    "read_results",
    "rows_to_csv",
    "write_json",
    "write_results",
]

RESULT_FIELDS = (
    "strategy",
    "seed",
    "round",
    "labels",
    "test_accuracy",
    "rare_accuracy",
    "val_accuracy",
    "per_class",
    "pseudo_label_accuracy",
    "batch_histogram",
    "select_seconds",
    "model_passes",
    "train_seconds",
    "best_epoch",
)


def clean(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def write_json(path: Path, obj: Any) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def rows_to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RESULT_FIELDS)
    for r in rows:
        w.writerow(
            [
                json.dumps(r.get(f))
                if isinstance(r.get(f), list)
                else ("" if r.get(f) is None else r.get(f))
                for f in RESULT_FIELDS
            ]
        )
    return buf.getvalue()


#: Columns every results row has; a file without them is not simulate's.
RESULT_COLUMNS = ("strategy", "seed", "round", "labels", "test_accuracy")


def read_results(path: str | Path) -> list[dict]:
    """Rows of a results folder, ``results.jsonl`` or ``results.csv``."""
    path = Path(path)
    if path.is_dir():
        path = (
            path / "results.jsonl" if (path / "results.jsonl").is_file() else path / "results.csv"
        )
    if not path.is_file():
        raise AlfkError(f"no results at {path}")
    try:
        rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)
    except (ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise AlfkError(f"{path} is not a results file of alfk simulate ({exc})") from None
    for row in rows:
        missing = [c for c in RESULT_COLUMNS if c not in row or row[c] is None]
        if not isinstance(row, dict) or missing:
            raise AlfkError(
                f"{path} is not a results file of alfk simulate (no {missing[0] if missing else 'rows'!r})"
            )
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError("a line is not a JSON object")
    return rows


def _read_csv(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for rec in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for k, v in rec.items():
                if k == "strategy" or v is None:
                    row[k] = v
                elif v == "":
                    row[k] = None
                else:
                    try:
                        row[k] = json.loads(v)
                    except ValueError:  # a text column
                        row[k] = v
            rows.append(row)
    return rows


def finished_rounds(run_dir: Path, rounds: int) -> int:
    b = 0
    while (
        b < rounds
        and (run_dir / f"round_{b + 1}.json").is_file()
        and (run_dir / f"round_{b + 1}.pt").is_file()
    ):
        b += 1
    return b


def collect(out: Path, strats: Sequence[Any], seeds: Sequence[int], rounds: int) -> list[dict]:
    """Every finished row, in (strategy as given, seed, round) order."""
    rows = []
    for st in strats:
        for seed in seeds:
            run_dir = out / "runs" / st.dirname / str(seed)
            for b in range(1, finished_rounds(run_dir, rounds) + 1):
                rows.append(json.loads((run_dir / f"round_{b}.json").read_text())["row"])
    return rows


def write_results(out: Path, rows: list[dict]) -> None:
    _write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _write_text(out / "results.csv", rows_to_csv(rows))


def earlier_config(out: Path) -> dict[str, Any] | None:
    """The options of the run in the results folder ``out`` (None: no run yet); an error for a
    file or a damaged ``config.json``. Checked before any image is read (``simulate`` scans the
    pool for ``--arch auto`` first)."""
    cfg_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise AlfkError(f"the results folder {out} is a file")
    if not cfg_path.is_file():
        return None
    try:
        old = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise AlfkError(
            f"{cfg_path} is damaged (not a JSON object); remove it, or choose another results folder"
        ) from None
    return old


def claim_folder(out: Path, config: dict[str, Any], not_compared: Sequence[str] = ()) -> None:
    """Create ``out`` with ``config.json``, or check that it holds a run of the same options."""
    old = earlier_config(out)
    if old is not None:
        differ = sorted(
            k
            for k in set(old) | set(config)
            if k not in not_compared and old.get(k) != config.get(k)
        )
        if differ:
            raise AlfkError(
                f"{out} holds a simulation with other arguments ({', '.join(differ)} differ); "
                "choose another results folder, or repeat the arguments to resume"
            )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
