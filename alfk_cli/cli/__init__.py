"""The `alfk` command: the Typer app, option types, alfk.toml, one module per command group,
progress on stderr, `alfk list`. Floor 8 of the house (docs/design.md, "Module map"): it may
import util, data, store, search, models, features, train, strategies, embed, selection,
simulate, labels and errors; never a room on its own floor or above
(tests/unit/test_imports.py). Lazy on purpose: importing the package imports nothing (a warm
select must not pull in torch or faiss); ``main`` imports the command when called.
"""


def main() -> None:
    """The `alfk` entry point as installed (``alfk_cli.cli:main``): ``cli.main.main``,
    imported when called, so that importing the package stays free."""
    from alfk_cli.cli.main import main as run

    run()
