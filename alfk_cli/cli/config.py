"""Options from a file and the environment, for nightly jobs that should not repeat every flag.

Precedence, highest first: the command line, ``ALFK_<COMMAND>_<OPTION>`` environment variables
(click's automatic names: ``ALFK_SELECT_KERNEL``, ``ALFK_SELECT_P``), the options file, the
built-in defaults. The options file is ``--config FILE`` (before the command), else the file
``$ALFK_CONFIG`` names, else ``alfk.toml`` in the work folder of ``select`` and ``history``
(``--workdir``, or ``.alfk/<pool name>/`` beside ``--pool``). In the file, a key at the top
applies to every command that has that option; a table applies to one command::

    device = "cpu"
    workers = 4

    [select]
    P = 1250
    kernel = "product"
    format = "label-studio"
    url-prefix = "/data/local-files/?d=unlabeled/"

Keys are option names without the leading dashes. An unknown key is an error: a typo must not
silently fall back to a default every night.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alfk_cli.errors import AlfkError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["CONFIG_NAME", "ENV_PREFIX", "config_path", "default_map"]

CONFIG_NAME = "alfk.toml"
ENV_PREFIX = "ALFK"
_WORKDIR_COMMANDS = ("select", "history")


def _value(argv: Sequence[str], *names: str) -> str | None:
    """The value of the first of ``names`` in ``argv`` (``--name VALUE`` or ``--name=VALUE``)."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg[len(name) + 1 :]
    return None


def config_path(argv: Sequence[str]) -> Path | None:
    """The options file for this command line, if there is one (see the module docstring)."""
    given = _value(argv, "--config") or os.environ.get(f"{ENV_PREFIX}_CONFIG") or None
    if given is not None:
        if not Path(given).is_file():
            raise AlfkError(f"options file {given} does not exist")
        return Path(given)
    command = next((a for a in argv if a in _WORKDIR_COMMANDS), None)
    if command is None:
        return None
    rest = argv[list(argv).index(command) + 1 :]
    workdir = _value(rest, "--workdir", "-w")
    pool = _value(rest, "--pool", "-p")
    if workdir is None and pool is None:
        return None
    if workdir is None:
        from alfk_cli.selection.workdir import default_workdir

        folder = default_workdir(pool or ".")
    else:
        folder = Path(workdir)
    found = folder / CONFIG_NAME
    return found if found.is_file() else None


def _load(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, UnicodeDecodeError) as exc:
        raise AlfkError(f"cannot read the options file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AlfkError(f"the options file {path} is not valid TOML: {exc}") from None


def _param_names(command: Any) -> dict[str, str]:
    """Option spellings without dashes -> parameter names, for one click command."""
    names: dict[str, str] = {}
    for param in command.params:
        if param.name is None or not getattr(param, "opts", None):
            continue
        names[param.name] = param.name
        for opt in [*param.opts, *getattr(param, "secondary_opts", [])]:
            if opt.startswith("--"):
                names[opt[2:]] = param.name
                names[opt[2:].replace("-", "_")] = param.name
    return names


def default_map(group: Any, argv: Sequence[str]) -> dict[str, dict[str, Any]] | None:
    """click's ``default_map`` for ``group`` (the ``alfk`` command) from the options file."""
    path = config_path(argv)
    if path is None:
        return None
    data = _load(path)
    commands = group.commands
    known = {name: _param_names(cmd) for name, cmd in commands.items()}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    common = {k: v for k, v in data.items() if not isinstance(v, dict)}
    out: dict[str, dict[str, Any]] = {name: {} for name in commands}
    for key, value in common.items():
        hits = [name for name in commands if key in known[name]]  # groups have no options
        if not hits:
            raise AlfkError(f"{path}: {key!r} is not an option of any alfk command")
        for name in hits:
            out[name][known[name][key]] = value
    for table, values in tables.items():
        if table not in commands:
            raise AlfkError(f"{path}: [{table}] is not an alfk command")
        out[table] = _table(path, commands[table], f"alfk {table}", values)
    return {name: values for name, values in out.items() if values}


def _table(path: Path, command: Any, label: str, values: dict[str, Any]) -> dict[str, Any]:
    """One command's settings; a command group (``labels``) holds its commands' tables."""
    subcommands = getattr(command, "commands", None)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if subcommands is not None and isinstance(value, dict) and key in subcommands:
            out[key] = _table(path, subcommands[key], f"{label} {key}", value)
            continue
        names = _param_names(command)
        if key not in names:
            raise AlfkError(f"{path}: {key!r} is not an option of {label}")
        out[names[key]] = value
    return out
