"""Shared fixtures: tiny image folders made with PIL, and an in-process CLI runner."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def write_images(
    folder: Path, n: int, size: int = 28, mode: str = "L", seed: int = 0, prefix: str = "img"
) -> list[Path]:
    """``n`` random images of ``size``² pixels under ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    paths = []
    for i in range(n):
        p = folder / f"{prefix}{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(p)
        paths.append(p)
    return paths


def make_labelled(root: Path, classes: list[str], per_class: int, **kw) -> Path:
    for j, c in enumerate(classes):
        write_images(root / c, per_class, seed=j, **kw)
    return root


def blob_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Easy 3-class data: a bright square at the left, middle or right of a dark 28×28 image."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(0, 40, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    for i in range(n):
        c = 5 + 9 * int(y[i]) + int(torch.randint(-1, 2, (1,), generator=g))
        r = 12 + int(torch.randint(-3, 4, (1,), generator=g))
        x[i, 0, r - 3 : r + 3, c - 3 : c + 3] = 230
    return x, y


@contextlib.contextmanager
def fifo_deadline(seconds: int, fifo: Path) -> Iterator[None]:
    """Fail the test instead of hanging on ``fifo`` (code that opens a FIFO for reading waits
    for a writer forever): at the deadline remove the FIFO, so that no later open can block on
    it, and open it for writing and close it, which lets a reader blocked in open() go on (to
    EOF); then raise TimeoutError. Main thread only (SIGALRM)."""

    def hung(*_):
        with contextlib.suppress(OSError):
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails when no reader waits
            os.unlink(fifo)
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(fifo)
        raise TimeoutError(f"still running after {seconds} s: {fifo} was opened")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def randomise_batch_norm(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-trivial running statistics (so eval-mode batch norm matters); ``model`` in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def per_image_reference(model, x, labels, modules, pooled):
    """Per image, alone: an unfrozen model, forward hooks on ``modules`` (tap name -> module, in
    tap order) that retain their outputs' gradients, and a backward of that image's own loss.
    ``pooled(name, tensor)`` is φ. Returns z, g, logits (numpy): the independent reference that
    ``describe_batch``'s one batched backward is checked against."""
    import torch.nn.functional as F

    for p in model.parameters():
        p.requires_grad_(True)
    zs, gs, logits = [], [], []
    for i in range(len(x)):
        caught: dict[str, torch.Tensor] = {}

        def catch(name, store=caught):
            def fn(_module, _inp, output):
                output.retain_grad()
                store[name] = output

            return fn

        handles = [m.register_forward_hook(catch(t)) for t, m in modules.items()]
        try:
            out = model(x[i : i + 1])
            F.cross_entropy(out, labels[i : i + 1]).backward()
        finally:
            for h in handles:
                h.remove()
        zs.append(torch.cat([pooled(t, caught[t].detach()) for t in modules], 1)[0])
        gs.append(torch.cat([pooled(t, caught[t].grad) for t in modules], 1)[0])
        logits.append(out.detach()[0])
        model.zero_grad(set_to_none=True)
    return torch.stack(zs).numpy(), torch.stack(gs).numpy(), torch.stack(logits).numpy()


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """Run ``alfk ARGS`` in-process through the real entry point (error handling included)."""
    from alfk_cli.cli.main import main

    def run(*args: str) -> Result:
        capsys.readouterr()
        old = sys.argv
        sys.argv = ["alfk", *map(str, args)]
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.argv = old
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


@pytest.fixture
def small_world(tmp_path, monkeypatch) -> Path:
    """In a fresh working directory: val/ (3 classes × 4 images), a flat pool/ of 30 images and
    init.pt, a rotation-pretrained LeNet checkpoint (untrained weights, seeded)."""
    from alfk_cli.models.archs import ROTATION_CLASSES, build_model
    from alfk_cli.models.checkpoint import save_checkpoint

    monkeypatch.chdir(tmp_path)
    make_labelled(Path("val"), ["a", "b", "c"], 4)
    write_images(Path("pool"), 30, seed=10)
    model = build_model("lenet", len(ROTATION_CLASSES), seed=0)
    save_checkpoint("init.pt", model, "lenet", list(ROTATION_CLASSES), head="rotation")
    return tmp_path
