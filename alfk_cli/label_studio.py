"""A selection as Label Studio tasks (``alfk select --format label-studio``).

The document is Label Studio's JSON import format for pre-annotated tasks, as documented at
https://labelstud.io/guide/predictions (the task format: https://labelstud.io/guide/task_format):
a JSON array of tasks, each with a ``data`` object (``data.image`` is the ``$image`` of the
standard image-classification labelling config) and a ``predictions`` array whose items hold a
``model_version``, an optional float ``score`` and a ``result`` list. An image-classification
result is ``{"from_name": CHOICES_NAME, "to_name": IMAGE_NAME, "type": "choices",
"value": {"choices": [CLASS]}}``; the names are those of the ``<Choices>`` and ``<Image>`` tags of
the project's labelling config (``choice`` and ``image`` in Label Studio's image-classification
template, https://labelstud.io/templates/image_classification).

alfk's own provenance rides along in ``data`` under ``alfk_*`` keys (Label Studio keeps any extra
``data`` keys and shows them in the Data Manager): the path as ``alfk select`` prints it, the
rank in the selection, the selection score and the validation image it matched ("" for
strategies without centres).

A prediction's ``score`` must lie in [0, 1]: Label Studio 1.23 checks it on import (logging an
error, or refusing the import where its prediction-validation flag is on) and its "prediction
score lowest first" sampling and sorting read it. The kernel score is not a probability, so the
prediction's score is the rank's place in the batch, ``(rank - 1) / n``: lowest first is the
selection order, and the kernel score itself is ``data.alfk_score``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from alfk_cli.scores import Scores

#: The documentation the task format follows.
DOC_URL = "https://labelstud.io/guide/predictions"
#: ``from_name`` / ``to_name`` of Label Studio's image-classification template.
FROM_NAME = "choice"
TO_NAME = "image"
#: How many hex digits of the checkpoint's sha256 make the ``model_version``.
VERSION_DIGITS = 12


def model_version(scores: Scores) -> str:
    """The checkpoint's sha256 prefix: tasks from one model share a Label Studio model version."""
    return str(scores.attrs.get("checkpoint_sha256", ""))[:VERSION_DIGITS]


def image_urls(scores: Scores, url_prefix: str | None = None) -> list[str]:
    """``data.image`` per task: ``url_prefix`` + the path inside the pool folder, URL-quoted
    (``/`` kept); without a prefix, the path as ``alfk select`` prints it."""
    if url_prefix is None:
        return scores.printed_paths()
    return [url_prefix + quote(p, safe="/") for p in scores.paths]  # paths are POSIX


def tasks(
    scores: Scores,
    *,
    url_prefix: str | None = None,
    from_name: str = FROM_NAME,
    to_name: str = TO_NAME,
) -> list[dict[str, Any]]:
    """The selection, in selection order, as Label Studio tasks with the predicted class as a
    pre-annotation scored ``(rank - 1) / n`` (Label Studio wants a score in [0, 1]). The kernel
    score is ``data.alfk_score``, left out where it is not a finite number (strategies without
    one, such as random and coreset, store NaN)."""
    version = model_version(scores)
    n = len(scores.paths)
    out = []
    rows = zip(
        image_urls(scores, url_prefix),
        scores.printed_paths(),
        scores.score,
        scores.predicted,
        scores.center_paths,
    )
    for rank, (url, path, score, predicted, center) in enumerate(rows, start=1):
        result = {
            "from_name": from_name,
            "to_name": to_name,
            "type": "choices",
            "value": {"choices": [predicted]},
        }
        prediction = {"model_version": version, "score": (rank - 1) / n, "result": [result]}
        data: dict[str, Any] = {"image": url, "alfk_path": path, "alfk_rank": rank}
        if math.isfinite(float(score)):
            data["alfk_score"] = float(score)
        data["alfk_center"] = center
        out.append({"data": data, "predictions": [prediction]})
    return out
