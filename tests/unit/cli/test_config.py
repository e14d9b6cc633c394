"""Nightly options from ``alfk.toml`` and ``ALFK_*`` variables: flags win over variables, variables
over the file, the file over the defaults; a typo in the file is an error, not a silent default."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import pytest

WD = Path(".alfk/pool")


@pytest.fixture
def world(small_world, monkeypatch):
    for name in [k for k in os.environ if k.startswith("ALFK_")]:
        monkeypatch.delenv(name)
    WD.mkdir(parents=True)
    return small_world


def _select(cli, *args: str):
    return cli("select", "--val", "val", "--pool", "pool", "--model", "init.pt", "--no-ledger",
               *args)  # fmt: skip


def _kernel() -> str:
    with h5py.File(WD / "scores.h5") as f:
        return str(f.attrs["kernel"])


def test_precedence_flags_then_environment_then_file_then_defaults(cli, world, monkeypatch):
    (WD / "alfk.toml").write_text(
        'device = "cpu"\nworkers = 0\n\n[select]\nP = 3\nkernel = "product"\nexact-count = true\n'
    )
    r = _select(cli)
    assert r.exit_code == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3 and _kernel() == "product"  # the file
    monkeypatch.setenv("ALFK_SELECT_KERNEL", "pcc")
    monkeypatch.setenv("ALFK_SELECT_P", "4")
    r = _select(cli)
    assert len(r.stdout.splitlines()) == 4 and _kernel() == "pcc"  # the environment
    r = _select(cli, "--kernel", "sum", "--P", "5")
    assert len(r.stdout.splitlines()) == 5 and _kernel() == "sum"  # the command line
    monkeypatch.delenv("ALFK_SELECT_KERNEL")
    monkeypatch.delenv("ALFK_SELECT_P")
    # the file's exact-count = true makes a short pool an error
    Path("sent.txt").write_text("".join(f"pool/img{i:04d}.png\n" for i in range(28)))
    r = _select(cli, "--exclude", "sent.txt")
    assert r.exit_code == 1 and "only 2 pool image(s) are left" in r.stderr
    r = _select(cli, "--workdir", "elsewhere", "--P", "2")  # another work folder: no file there
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2


def test_config_option_and_variable_name_a_file(cli, world, monkeypatch):
    Path("nightly.toml").write_text('[select]\nP = 2\ndevice = "cpu"\nworkers = 0\n')
    (WD / "alfk.toml").write_text("[select]\nP = 4\n")
    r = cli("--config", "nightly.toml", "select", "--val", "val", "--pool", "pool",
            "--model", "init.pt", "--no-ledger")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2  # --config wins over the work folder's file
    monkeypatch.setenv("ALFK_CONFIG", "nightly.toml")
    assert len(_select(cli).stdout.splitlines()) == 2
    monkeypatch.delenv("ALFK_CONFIG")
    assert len(_select(cli, "--device", "cpu").stdout.splitlines()) == 4


@pytest.mark.parametrize(
    ("text", "code", "says"),
    [
        ('[select]\nkernal = "sum"\n', 1, "'kernal' is not an option of alfk select"),
        ('colour = "red"\n', 1, "'colour' is not an option of any alfk command"),
        ("[selekt]\nP = 2\n", 1, "[selekt] is not an alfk command"),
        ("[select\n", 1, "is not valid TOML"),
        ('[select]\nkernel = "bogus"\n', 2, "'bogus' is not one of"),
        ('[labels.import]\nrelabel = "yes please"\n', 1, "relabel must be true or false"),
    ],
)
def test_a_bad_options_file_is_one_clear_error(cli, world, text, code, says):
    Path("bad.toml").write_text(text)
    r = cli("--config", "bad.toml", "select", "--val", "val", "--pool", "pool", "--P", "2",
            "--model", "init.pt", "--device", "cpu")  # fmt: skip
    if "labels" in text:
        r = cli("--config", "bad.toml", "labels", "import", "x.json", "--pool", "pool", "--into",
                "labeled")  # fmt: skip
    assert r.exit_code == code and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("--config", "missing.toml", "list")
    assert r.exit_code == 1 and "options file missing.toml does not exist" in r.stderr


def test_the_environment_cannot_turn_a_command_into_version(cli, world, monkeypatch):
    monkeypatch.setenv("ALFK_VERSION", "1")
    r = cli("list", "kernels")
    assert r.exit_code == 0 and r.stdout.splitlines()[:3] == ["sum", "pcc", "product"]
    assert cli("--version").stdout.strip() == __import__("alfk_cli").__version__
