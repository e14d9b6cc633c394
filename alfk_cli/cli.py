"""The ``alfk`` command: parses options, calls the library, formats output. No maths here.

stdout carries data only; progress, tables and warnings go to stderr. Expected failures
(``AlfkError``) print one ``error: …`` line and exit 1; usage errors exit 2 (Typer's).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from alfk_cli import __version__, distributed
from alfk_cli.atomic import disk_error
from alfk_cli.cli_app import app
from alfk_cli.errors import AlfkError
from alfk_cli.progress import stderr

# Importing the command modules registers their commands, in this order in --help.
# isort: off
from alfk_cli import cli_train  # noqa: F401
from alfk_cli import cli_stores  # noqa: F401
from alfk_cli import cli_labels  # noqa: F401
from alfk_cli import cli_simulate  # noqa: F401
from alfk_cli import cli_history  # noqa: F401
# isort: on

if TYPE_CHECKING:

    class _UsageError(Exception):
        """What ``_run`` needs of Typer's (or click's) usage errors."""

        def show(self) -> None: ...


@app.command("list", epilog="Example: alfk list strategies")
def list_registered(
    kind: Annotated[
        str | None,
        typer.Argument(help="architectures, strategies, kernels or estimators (default: all)."),
    ] = None,
) -> None:
    """The registered architectures, strategies, kernels and estimators, plug-ins included."""
    from alfk_cli.plugins import registries

    found = registries()
    if kind is not None and kind not in found:
        raise typer.BadParameter(f"{kind!r} is not one of {', '.join(found)}", param_hint="KIND")
    for name, registry in found.items():
        if kind is None:
            sys.stdout.write(f"{name}: {', '.join(registry)}\n")
        elif name == kind:
            sys.stdout.write("".join(f"{n}\n" for n in registry))


def _version(ctx: typer.Context, value: bool) -> None:
    # ALFK_VERSION in the environment must not turn every command into --version
    source = ctx.get_parameter_source("version")
    if value and getattr(source, "name", "") == "COMMANDLINE":
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Options file (TOML; default: alfk.toml in the work folder). Flags win over it.",
        ),
    ] = None,
) -> None:
    """Deep active learning on biased image collections (Fisher-kernel self-supervision)."""


def _usage_error_type() -> type[_UsageError]:
    """The base of Typer's usage errors: its own since Typer vendored click, click's before."""
    import typer.exceptions

    # Any: which class it is depends on the installed Typer
    base: Any = getattr(typer.exceptions, "TyperException", None)
    if base is None:  # pragma: no cover - Typer before it vendored click
        from click.exceptions import ClickException

        base = ClickException
    return base


def _run() -> int:
    """The app without Typer's standalone handling, so that every outcome maps to our codes."""
    from alfk_cli.cli_config import ENV_PREFIX, default_map

    usage_error = _usage_error_type()
    group = typer.main.get_command(app)
    _check_launch(list(getattr(group, "commands", {})))
    defaults = default_map(group, sys.argv[1:])
    try:
        rc = group.main(standalone_mode=False, default_map=defaults, auto_envvar_prefix=ENV_PREFIX)
    except typer.Abort:  # EOF on a prompt, or Ctrl-C in older Typer
        raise KeyboardInterrupt from None
    except usage_error as exc:  # usage errors: Typer's message, exit 2
        if distributed.is_main():
            exc.show()
        return int(getattr(exc, "exit_code", 2))
    except typer.Exit as exc:
        rc = exc.exit_code
    if rc == 130:  # Typer turns KeyboardInterrupt into a silent Exit(130)
        raise KeyboardInterrupt
    return rc if isinstance(rc, int) else 0


def main() -> None:
    """Console entry point: one-line errors, no tracebacks for expected failures.

    Exit codes: 0 success, 2 usage error, 1 ``error: …``, 130 ``error: interrupted``. Under
    torchrun every rank runs this; rank 0 alone prints (``distributed``), and a failure on any
    rank stops them all with one ``error:`` line."""
    sys.unraisablehook = _quiet_disk_errors
    try:
        _join()
        code = _run()
        distributed.barrier()  # no rank leaves while another still needs the shared store
        if sys.stdout is not None:  # None: closed (``>&-``), said by the commands that print
            sys.stdout.flush()  # a full stdout (``> /dev/full``) must fail here, not at exit
    except distributed.PeerFailed:  # another rank failed and said why
        distributed.acknowledge()
        code = 1
    except AlfkError as exc:
        _error(str(exc))
        code = 1
    except KeyboardInterrupt:
        _error("interrupted")
        code = 130
    except BrokenPipeError:  # e.g. `alfk select ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        with contextlib.suppress(Exception, distributed.PeerFailed):
            distributed.barrier()  # the other ranks wait there for rank 0, which printed
        code = 0
    except (OSError, RuntimeError) as exc:
        message = disk_error(exc)
        if message is None:
            distributed.fail(f"{type(exc).__name__}: {exc}")
            distributed.settle()
            raise
        _error(message)
        # HDF5 cannot clean up after a failed write (its finalisers crash the process): leave
        # now, keeping the partial file for the next run, instead of unwinding through them.
        sys.stderr.flush()
        os._exit(1)
    except Exception as exc:  # a bug: the traceback, after telling the other ranks to stop
        distributed.fail(f"{type(exc).__name__}: {exc}")
        distributed.settle()
        raise
    distributed.shutdown()
    if code and sys.stdout is not None:
        try:
            sys.stdout.flush()
        except OSError:  # stdout is the full device itself: drop what is left, quietly
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)


#: Commands that run under torchrun (the others write files that every rank would write again).
TORCHRUN_COMMANDS = ("embed", "score", "select", "train", "pretrain", "list", "history")


def _check_launch(commands: list[str]) -> None:
    """Under torchrun, refuse a command that runs in one process only."""
    if distributed.world() == 1:
        return
    name = next((a for a in sys.argv[1:] if a in commands), None)
    if name is not None and name not in TORCHRUN_COMMANDS:
        raise AlfkError(f"{name} runs in one process: start it without torchrun")


def _join() -> None:
    """Under torchrun: join the other ranks; ranks other than 0 print nothing but errors. The
    SIGTERM torchrun (or Slurm) sends to stop a rank is handled as Ctrl-C: partial files are
    closed, to be resumed."""
    distributed.init()
    if distributed.world() > 1:
        signal.signal(signal.SIGTERM, _terminated)
    if not distributed.is_main():
        stderr.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _quiet_disk_errors(info) -> None:
    """h5py reports a failed write again from its finalisers ("Exception ignored in ..."): the
    one-line error says it already."""
    if disk_error(info.exc_value) is None:
        sys.__unraisablehook__(info)


def _error(message: str) -> None:
    """Print ``error: message``, unless another rank already printed its failure."""
    if distributed.fail(message):
        quiet, stderr.quiet = stderr.quiet, False
        stderr.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        stderr.quiet = quiet
        sys.stderr.flush()
    distributed.settle()


if __name__ == "__main__":
    main()
