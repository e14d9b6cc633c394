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
silently fall back to a default every night; so is a value of the wrong TOML type (``P = true``,
``P = 2.5``, ``device = 1``). A file named by ``--config`` or ``$ALFK_CONFIG`` must be a regular
file. The work folder's own file may not set where outputs go (``OUTPUT_OPTIONS``: ``selection.workdir``,
``out``, ``report``, ``into``): a file inside the work folder must not move the work folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

from alfk_cli.data.imagefile import check_named_file
from alfk_cli.errors import AlfkError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["CONFIG_NAME", "ENV_PREFIX", "OUTPUT_OPTIONS", "config_path", "default_map"]

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
    found = _config_file(argv)
    return None if found is None else found[0]


def _config_file(argv: Sequence[str]) -> tuple[Path, bool] | None:
    """The options file, and whether it was found in a work folder (not named by the user)."""
    given = _value(argv, "--config") or os.environ.get(f"{ENV_PREFIX}_CONFIG") or None
    if given is not None:
        check_named_file(Path(given), "options file")  # not /dev/zero, nor a folder
        return Path(given), False
    found = _workdir_config(argv)
    return None if found is None else (found, True)


def _workdir_config(argv: Sequence[str]) -> Path | None:
    """``alfk.toml`` in the work folder of a ``select`` or ``history`` command line."""
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


def _params(command: Any) -> dict[str, Any]:
    """Option spellings without dashes -> the option, for one click command."""
    params: dict[str, Any] = {}
    for param in command.params:
        if param.name is None or not getattr(param, "opts", None):
            continue
        params[param.name] = param
        for opt in [*param.opts, *getattr(param, "secondary_opts", [])]:
            if opt.startswith("--"):
                params[opt[2:]] = param
                params[opt[2:].replace("-", "_")] = param
    return params


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# TOML value types per option annotation: ``P = true`` must not run with P = 1, nor ``P = 2.5``
# with 2; a bool is an int to Python, and click would take either
_KINDS: dict[Any, tuple[str, Callable[[Any], bool]]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", _is_int),
    float: ("a number", lambda v: _is_int(v) or isinstance(v, float)),
    str: ("a string", lambda v: isinstance(v, str)),
    Path: ("a string (a path)", lambda v: isinstance(v, str)),
}


def _checked(path: Path, key: str, value: Any, param: Any) -> Any:
    """``value`` when its TOML type suits the option ``param``, else a one-line error."""
    hint = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    many = get_origin(hint) is list
    kind = _KINDS.get(get_args(hint)[0] if many and get_args(hint) else hint)
    if kind is None:
        return value  # a type this file does not know: click checks it
    what, ok = kind
    good = all(map(ok, value)) if many and isinstance(value, list) else not many and ok(value)
    if not good:
        expected = f"a list, each item {what}" if many else what
        raise AlfkError(f"{path}: {key} must be {expected}, not {_toml(value)}")
    return value


def _toml(value: Any) -> str:
    """``value`` as TOML spells it (for messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if not isinstance(value, (list, dict)) else type(value).__name__


#: Options that choose where a command writes (``selection.workdir``: where ``select`` writes everything).
#: A work folder's own ``alfk.toml`` may not set them: whoever can write that file could
#: otherwise send the stores, scores, report and lock anywhere the user can write.
OUTPUT_OPTIONS = frozenset({"workdir", "out", "report", "into"})


def default_map(group: Any, argv: Sequence[str]) -> dict[str, dict[str, Any]] | None:
    """click's ``default_map`` for ``group`` (the ``alfk`` command) from the options file."""
    found = _config_file(argv)
    if found is None:
        return None
    path, in_workdir = found
    data = _load(path)
    commands = group.commands
    known = {name: _params(cmd) for name, cmd in commands.items()}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    common = {k: v for k, v in data.items() if not isinstance(v, dict)}
    out: dict[str, dict[str, Any]] = {name: {} for name in commands}
    for key, value in common.items():
        hits = [name for name in commands if key in known[name]]  # groups have no options
        if not hits:
            raise AlfkError(f"{path}: {key!r} is not an option of any alfk command")
        for name in hits:
            param = known[name][key]
            out[name][param.name] = _setting(path, in_workdir, key, value, param)
    for table, values in tables.items():
        if table not in commands:
            raise AlfkError(f"{path}: [{table}] is not an alfk command")
        out[table] = _table(path, in_workdir, commands[table], f"alfk {table}", values)
    return {name: values for name, values in out.items() if values}


def _setting(path: Path, in_workdir: bool, key: str, value: Any, param: Any) -> Any:
    """One checked setting; an output option is refused in a work folder's file."""
    if in_workdir and param.name in OUTPUT_OPTIONS:
        raise AlfkError(
            f"{path}: {key!r} chooses where alfk writes, which a work folder's {CONFIG_NAME} may "
            "not (give it on the command line, or in --config FILE or $ALFK_CONFIG)"
        )
    return _checked(path, key, value, param)


def _table(
    path: Path, in_workdir: bool, command: Any, label: str, values: dict[str, Any]
) -> dict[str, Any]:
    """One command's settings; a command group (``labels``) holds its commands' tables."""
    subcommands = getattr(command, "commands", None)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if subcommands is not None and isinstance(value, dict) and key in subcommands:
            out[key] = _table(path, in_workdir, subcommands[key], f"{label} {key}", value)
            continue
        params = _params(command)
        if key not in params:
            raise AlfkError(f"{path}: {key!r} is not an option of {label}")
        out[params[key].name] = _setting(path, in_workdir, key, value, params[key])
    return out
