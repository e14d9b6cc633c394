"""Integration test: the select → Label Studio → labels import round trip against a real Label
Studio server (1.23.x, in its own venv: ``ALFK_LABEL_STUDIO`` or /opt/ls-venv/bin/label-studio;
skipped only where it is not installed). The server starts once per module (~40 s, most of this
test's time), bound to 127.0.0.1 on a free port with a temporary data dir, and is stopped at the
end. Everything goes through its REST API with urllib; alfk runs as a subprocess from the folder
``select`` ran in, as a user's cron job would."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alfk_cli.checkpoint import save_checkpoint
from alfk_cli.models import ROTATION_CLASSES, build_model
from conftest import make_labelled, write_images

pytestmark = pytest.mark.integration

TOKEN = "alfk0test0token0123456789abcdef"
ODD = "a b#c%d.jpg"  # a space, a '#' and a '%' in a file name: each must survive URL quoting
CLASSES = ["a", "b", "c"]
PREFIX = "/data/local-files/?d=pool/"
READY_S = 240  # a fresh data dir runs Django's migrations first: ~40 s on 2 busy cores


def _executable() -> str:
    return os.environ.get("ALFK_LABEL_STUDIO") or "/opt/ls-venv/bin/label-studio"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _site(root: Path) -> None:
    """val/ (3 classes), a pool of 7 images (one JPEG with an odd name), a rotation model."""
    make_labelled(root / "val", CLASSES, 3)
    write_images(root / "pool", 6, seed=5)
    rgb = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "pool" / ODD)
    model = build_model("lenet", 4, seed=0)
    save_checkpoint(root / "init.pt", model, "lenet", list(ROTATION_CLASSES), head="rotation")


def alfk(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "alfk_cli", *args], cwd=root, env=env, capture_output=True, text=True
    )


class Server:
    def __init__(self, url: str):
        self.url = url

    def call(self, method: str, path: str, body: object = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Token {TOKEN}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from None

    def json(self, method: str, path: str, body: object = None):
        return json.loads(self.call(method, path, body))


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < READY_S:
        if proc.poll() is not None:
            pytest.fail(f"label-studio exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"label-studio not ready after {READY_S} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(server, root): a running Label Studio whose local-files root is ``root``, where val/,
    pool/ and init.pt lie and where alfk runs."""
    exe = _executable()
    if not os.access(exe, os.X_OK):
        pytest.skip(f"Label Studio is not installed: no {exe} (ALFK_LABEL_STUDIO names another)")
    root = tmp_path_factory.mktemp("site")
    _site(root)
    data, log = tmp_path_factory.mktemp("ls-data"), root.parent / "label-studio.log"
    port = _free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
    }
    args = [exe, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    args += ["--data-dir", str(data), "--username", "alfk@example.com", "--password", "alfk-pw-1"]
    args += ["--user-token", TOKEN, "--enable-legacy-api-token"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=data, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        took = _wait_ready(proc, url, log)
        print(f"label-studio ready in {took:.0f} s")
        yield Server(url), root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _config() -> str:
    choices = "".join(f'<Choice value="{c}"/>' for c in CLASSES)
    return (
        '<View><Image name="image" value="$image"/>'
        f'<Choices name="choice" toName="image" choice="single">{choices}</Choices></View>'
    )


def _choice(label: str) -> list[dict]:
    return [
        {
            "from_name": "choice",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": [label]},
        }
    ]


def _filed(into: Path) -> dict[str, list[str]]:
    return {c.name: sorted(f.name for f in c.iterdir()) for c in into.iterdir() if c.is_dir()}


def test_round_trip(site):
    server, root = site
    sel = alfk(
        root,
        "select",
        "--val",
        "val",
        "--pool",
        "pool",
        "--model",
        "init.pt",
        "--device",
        "cpu",
        "--P",
        "7",
        "--format",
        "label-studio",
        "--url-prefix",
        PREFIX,
    )
    assert sel.returncode == 0, sel.stderr
    (root / "tasks.json").write_text(sel.stdout)
    tasks = json.loads(sel.stdout)
    assert {t["data"]["alfk_path"] for t in tasks} >= {f"pool/{ODD}"}

    project = server.json(
        "POST", "/api/projects", {"title": "alfk night 1", "label_config": _config()}
    )
    pid = project["id"]
    storage = {"project": pid, "title": "pool", "path": str(root / "pool"), "use_blob_urls": False}
    server.json("POST", "/api/storages/localfiles", storage)
    imported = server.json("POST", f"/api/projects/{pid}/import", tasks)
    assert imported["task_count"] == len(tasks) and imported["prediction_count"] == len(tasks)

    stored = server.json("GET", f"/api/tasks?project={pid}&page_size=100&fields=all")["tasks"]
    by_path = {t["data"]["alfk_path"]: t for t in stored}
    assert set(by_path) == {t["data"]["alfk_path"] for t in tasks}
    for sent in tasks:
        task = by_path[sent["data"]["alfk_path"]]
        assert task["data"] == sent["data"]  # nothing altered, the URL included
        preds = server.json("GET", f"/api/predictions?task={task['id']}")
        assert len(preds) == 1
        assert preds[0]["model_version"] == sent["predictions"][0]["model_version"]
        assert preds[0]["score"] == pytest.approx(sent["predictions"][0]["score"])
        assert preds[0]["result"] == sent["predictions"][0]["result"]
        image = urllib.request.Request(server.url + task["data"]["image"])
        image.add_header("Authorization", f"Token {TOKEN}")
        with urllib.request.urlopen(image, timeout=30) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("image/")
            assert resp.read() == (root / sent["data"]["alfk_path"]).read_bytes()

    # annotate every task: even ranks take the prediction, odd ones another class; the odd-named
    # image is relabelled twice (three annotations): the latest wins
    expected: dict[str, set[str]] = {}
    for sent in tasks:
        path, rank = sent["data"]["alfk_path"], sent["data"]["alfk_rank"]
        predicted = sent["predictions"][0]["result"][0]["value"]["choices"][0]
        other = CLASSES[(CLASSES.index(predicted) + 1) % len(CLASSES)]
        labels = [predicted if rank % 2 == 0 else other]
        if path.endswith(ODD):
            labels = [predicted, other, CLASSES[(CLASSES.index(other) + 1) % len(CLASSES)]]
        for label in labels:
            server.json(
                "POST",
                f"/api/tasks/{by_path[path]['id']}/annotations",
                {"result": _choice(label), "lead_time": 1.0},
            )
        expected.setdefault(labels[-1], set()).add(Path(path).name)

    for kind, name in (
        ("JSON", "export.json"),
        ("JSON_MIN", "export-min.json"),
        ("CSV", "export.csv"),
    ):
        (root / name).write_bytes(
            server.call("GET", f"/api/projects/{pid}/export?exportType={kind}")
        )
        into = f"labeled-{kind.lower()}"
        args = ("labels", "import", name, "--pool", "pool", "--into", into, "--classes-from", "val")
        first = alfk(root, *args)
        assert first.returncode == 0, f"{kind}: {first.stderr}"
        want = {c: sorted(names) for c, names in expected.items()}
        assert _filed(root / into) == want, kind
        again = alfk(root, *args)
        assert again.returncode == 0, f"{kind}: {again.stderr}"
        assert again.stderr.startswith("0 filed") or " 0 filed" in again.stderr, again.stderr
        assert _filed(root / into) == want, kind
