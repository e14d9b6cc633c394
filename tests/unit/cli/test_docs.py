"""The docs describe the CLI as it is: every command and option is in docs/cli.md, in the
command's own section, and the docs the code points to exist."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main

from alfk_cli.cli.main import app  # the app with every command registered (cli_app has none)

ROOT = Path(__file__).resolve().parents[3]


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## alfk (\w+(?: \w+)?)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_command_and_option_is_documented():
    sections = _sections((ROOT / "docs" / "cli.md").read_text())
    commands = {  # a sub-app's commands as "group command" (alfk labels import)
        f"{name} {sub}" if hasattr(cmd, "commands") else name: subcmd
        for name, cmd in typer.main.get_command(app).commands.items()
        for sub, subcmd in (getattr(cmd, "commands", None) or {name: cmd}).items()
    }
    assert sorted(sections) == sorted(commands), "docs/cli.md sections and commands differ"
    missing = [
        f"alfk {name} {opt}"
        for name, cmd in commands.items()
        for p in cmd.params
        for opt in [*p.opts, *p.secondary_opts]
        if opt.startswith("--") and f"`{opt}`" not in sections[name]
    ]
    assert not missing, f"undocumented in docs/cli.md: {', '.join(missing)}"


def test_the_docs_the_code_points_to_exist():
    pointed = set()
    for path in [*ROOT.glob("alfk_cli/**/*.py"), ROOT / "README.md", *ROOT.glob("docs/*.md")]:
        pointed |= set(re.findall(r"docs/\w+\.md", path.read_text()))
    assert pointed >= {"docs/algorithm.md", "docs/design.md"}
    for doc in pointed:
        assert (ROOT / doc).is_file(), f"{doc} is referenced but missing"
