"""The Typer application every ``cli_*`` module adds its commands to."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="alfk",
    help="Deep active learning on biased image collections (Fisher-kernel self-supervision).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
