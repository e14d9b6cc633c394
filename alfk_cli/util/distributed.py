"""Several processes as one run: torchrun's environment, collective failures, small exchanges.

Under ``torchrun`` (or any launcher that sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``) every process runs the same command; ``init()`` joins them
once: a torch.distributed process group (``gloo`` on the CPU, ``nccl`` when the device is CUDA,
each rank on ``cuda:LOCAL_RANK``) for DDP training, and the rendezvous' key-value store for the
exchanges below. Without those variables the run is one process and every function here is a
no-op (``world() == 1``, ``rank() == 0``).

The contract (docs/design.md, "Several processes"): rank 0 alone prints results, writes final
outputs, the ledger and reports; every rank computes its share. A failure is collective: a rank
that fails posts its one-line message to the store (``fail``) and waits, a bounded time, for the
others to see it; the others see it at their next synchronisation point or at ``check()`` (which
long loops call once per batch), raise :class:`PeerFailed` and exit quietly with status 1, so no
rank waits forever at a barrier for a rank that is gone. Only the first failure is printed.
Waits are bounded by ``ALFK_DIST_TIMEOUT`` seconds (default 3600), after which a rank gives up
with an error; a rank that dies outright (``kill -9``) is noticed by torchrun, which stops the
others.

Exchanges go through the store (pickled objects, polled with a short sleep), not through
process-group collectives, so that every wait also watches for failures.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

from alfk_cli.errors import AlfkError

__all__ = [
    "PeerFailed",
    "acknowledge",
    "all_gather",
    "barrier",
    "broadcast",
    "check",
    "fail",
    "init",
    "is_main",
    "launched",
    "local_rank",
    "main_only",
    "on_main",
    "process_group",
    "rank",
    "settle",
    "shutdown",
    "timeout_seconds",
    "world",
]

T = TypeVar("T")

#: Seconds a failing rank waits for the others to acknowledge its failure before it exits.
ACK_SECONDS = 30.0


class PeerFailed(Exception):
    """Another rank failed (and printed why): this one stops quietly, with status 1. Not an
    AlfkError, so that no handler of expected failures swallows it."""


class _State:
    """The joined run: the store, this rank, the world, the exchange counter."""

    store: Any = None
    raw_store: Any = None
    rank = 0
    world = 1
    local_rank = 0
    seq = 0
    solo = 0  # > 0 inside ``on_main``: rank 0 works alone, collectives are local


_state = _State()


def _env_world() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise AlfkError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def launched() -> bool:
    """Whether this process was started as one of several (``WORLD_SIZE`` > 1)."""
    return _env_world() > 1


def timeout_seconds() -> float:
    """How long a rank waits for the others (``ALFK_DIST_TIMEOUT``, default 3600 s)."""
    raw = os.environ.get("ALFK_DIST_TIMEOUT", "3600")
    try:
        value = float(raw)
    except ValueError:
        raise AlfkError(f"ALFK_DIST_TIMEOUT={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise AlfkError(f"ALFK_DIST_TIMEOUT must be positive, not {raw}")
    return value


def init() -> None:
    """Join the other ranks when launched by torchrun; does nothing otherwise or when joined.

    Connects to the rendezvous store; with CUDA, this rank's device becomes ``cuda:LOCAL_RANK``
    (so ``cuda`` means that GPU). The process group DDP needs is made by ``process_group``."""
    if _state.store is not None or not launched():
        return
    import torch
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_seconds())
    try:
        store, rank_, world_ = next(dist.rendezvous("env://", timeout=timeout))
    except (RuntimeError, ValueError, OSError) as exc:
        raise AlfkError(f"cannot join the other processes: {exc}") from None
    _state.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and _state.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(_state.local_rank)
    _state.raw_store = store
    _state.store = dist.PrefixStore("alfk/", store)
    _state.rank, _state.world = rank_, world_


def process_group(cuda: bool) -> None:
    """Make the torch.distributed process group (once; every rank calls it): ``nccl`` for CUDA
    ranks, ``gloo`` on the CPU, with the ``ALFK_DIST_TIMEOUT`` timeout."""
    import torch.distributed as dist

    if _state.store is None or dist.is_initialized():
        return
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=dist.PrefixStore("pg/", _state.raw_store),
        rank=_state.rank,
        world_size=_state.world,
        timeout=timedelta(seconds=timeout_seconds()),
    )


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    if _state.store is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 when alone)."""
    return _state.rank


def local_rank() -> int:
    """This process's rank on its node (its GPU index)."""
    return _state.local_rank


def world() -> int:
    """How many processes share the work now (1 alone, or inside ``on_main``)."""
    return 1 if _state.solo else _state.world


def is_main() -> bool:
    """Whether this process prints and writes the final outputs (rank 0)."""
    return _state.rank == 0


# ----------------------------------------------------------------------------- failures


def _failures() -> int:
    return int(_state.store.add("failed", 0))


def check() -> None:
    """Raise :class:`PeerFailed` when another rank has failed (cheap: one store round trip)."""
    if _state.store is not None and _failures() > 0:
        raise PeerFailed("another process failed")


def fail(message: str) -> bool:
    """Post this rank's failure; True when it is the first (the one to print). Then call
    ``settle``."""
    store = _state.store
    if store is None:
        return True
    try:
        store.set(f"failed/{_state.rank}", message)
        return int(store.add("failed", 1)) == 1
    except Exception:  # the store is gone (torchrun stopping): nothing left to tell
        return True


def settle() -> None:
    """After ``fail``: wait, at most ``ACK_SECONDS``, until every other rank has failed too or
    seen the failure, so that they close their files before torchrun stops them. A signal to
    stop (torchrun's SIGTERM) ends the wait."""
    store = _state.store
    if store is None:
        return
    deadline = time.monotonic() + ACK_SECONDS
    try:
        while time.monotonic() < deadline:
            if _failures() + int(store.add("acks", 0)) >= _state.world:
                return
            time.sleep(0.05)
    except (Exception, KeyboardInterrupt):
        return


def acknowledge() -> None:
    """A rank that stopped on :class:`PeerFailed` tells the failing rank it saw the failure."""
    if _state.store is not None:
        with contextlib.suppress(Exception):
            _state.store.add("acks", 1)


def _wait(done: Callable[[], bool], what: str) -> None:
    """Poll ``done`` until true; PeerFailed on a failure elsewhere, AlfkError past the timeout."""
    deadline = time.monotonic() + timeout_seconds()
    pause = 0.001
    while not done():
        check()
        if time.monotonic() > deadline:
            raise AlfkError(
                f"gave up waiting for the other processes ({what}) after "
                f"{timeout_seconds():.0f} s (ALFK_DIST_TIMEOUT)"
            )
        time.sleep(pause)
        pause = min(0.05, pause * 2)
    check()


# ----------------------------------------------------------------------------- exchanges


def _next_key() -> str:
    _state.seq += 1
    return f"x{_state.seq}"


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; a synchronisation point."""
    if world() == 1:
        return [obj]
    store, key, n = _state.store, _next_key(), _state.world
    store.set(f"{key}/{_state.rank}", pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    store.add(f"{key}/n", 1)
    _wait(lambda: int(store.add(f"{key}/n", 0)) >= n, "exchange")
    out = [pickle.loads(store.get(f"{key}/{r}")) for r in range(n)]
    if int(store.add(f"{key}/read", 1)) == n:  # the last reader clears the values
        for r in range(n):
            with contextlib.suppress(Exception):
                store.delete_key(f"{key}/{r}")
    return out


def broadcast(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (the others pass nothing); a synchronisation point."""
    if world() == 1:
        return obj
    store, key, n = _state.store, _next_key(), _state.world
    if _state.rank == 0:
        store.set(f"{key}/v", pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        store.add(f"{key}/n", 1)
    _wait(lambda: int(store.add(f"{key}/n", 0)) >= 1, "rank 0")
    value = obj if _state.rank == 0 else pickle.loads(store.get(f"{key}/v"))
    if int(store.add(f"{key}/read", 1)) == n:
        with contextlib.suppress(Exception):
            store.delete_key(f"{key}/v")
    return value


def barrier() -> None:
    """Wait until every rank is here (or one has failed)."""
    all_gather(None)


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 alone (the others wait) and give its result to every rank.

    ``fn`` starts only when every rank is here, so that what it writes cannot change what
    another rank is still reading. Inside ``fn`` the run counts as one process
    (``world() == 1``): its exchanges are local."""
    if world() == 1:
        return fn()
    barrier()
    value: Any = None
    if _state.rank == 0:
        with main_only():
            value = fn()
    return broadcast(value)


@contextlib.contextmanager
def main_only() -> Iterator[None]:
    """Rank 0 working alone: ``world()`` is 1 inside, so library code does not wait for peers."""
    _state.solo += 1
    try:
        yield
    finally:
        _state.solo -= 1


# ----------------------------------------------------------------------------- training


def data_parallel(model: Any, device: Any) -> Any:
    """``model`` wrapped in DistributedDataParallel when several ranks train (the process group
    is made on first use), else ``model`` itself. Gradients are averaged over the ranks after
    each step, so the weights stay equal on every rank. nccl needs a GPU per rank: with more
    ranks on a node than GPUs, the ranks share GPUs through gloo."""
    if world() == 1:
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel

    cuda = getattr(device, "type", "cpu") == "cuda"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    process_group(cuda and torch.cuda.device_count() >= per_node)
    if cuda:
        return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
    return DistributedDataParallel(model)


def shard_order(order: Any) -> Any:
    """This rank's share of an epoch's sample order (a 1-D tensor), as DistributedSampler deals
    it: padded by repeating from the start to a multiple of the world size, then every
    ``world()``-th sample from ``rank()``, so that every rank takes the same number of steps."""
    n = world()
    if n == 1 or len(order) == 0:
        return order
    import torch

    pad = (-len(order)) % n
    if pad:
        order = torch.cat([order, order.repeat(pad // len(order) + 1)[:pad]])
    return order[rank() :: n]
