"""alfk: deep active learning on biased image collections via Fisher-kernel self-supervision."""

__version__ = "0.1.0"

from alfk_cli.errors import AlfkError

__all__ = ["AlfkError", "__version__"]
