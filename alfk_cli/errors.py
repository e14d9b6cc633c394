"""The one exception type for expected failures: the CLI prints it as ``error: …`` and exits 1."""


class AlfkError(Exception):
    """A failure the user can fix (bad input, missing file, mismatched store); never a bug."""
