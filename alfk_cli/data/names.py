"""Rules for image file names: which ones alfk can carry, and how to show the others.

Selected images are printed one per line (``to_label.txt``), read back from ``--exclude`` files
and stored as UTF-8 in HDF5. A name with a newline or another control character, or with bytes
that are not UTF-8, would break each of those, so such files are skipped at scan time and listed,
like unreadable images, with the name escaped (``\\n``, ``\\xff``). No torch import here: the CLI
uses it for messages.
"""

from __future__ import annotations

import re

# C0, DEL and C1 controls, and the line/paragraph separators: str.splitlines (and many readers of
# to_label.txt) end a line at U+0085, U+2028 and U+2029 too, so such a name would come back from an
# --exclude file as two lines and never match.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(name: str) -> str:
    """``name`` with control characters and undecodable bytes escaped (``\\n``, ``\\xff``), for
    messages: such names are skipped, but the listing must still say which file it was."""
    out = []
    for c in name:
        code = ord(c)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif c.isprintable() and not 0xD800 <= code <= 0xDFFF:
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def name_problem(rel: str) -> str | None:
    """Why a relative path cannot be used as a pool image's name, or None.

    Names are printed one per line (to_label.txt), read back from --exclude files and stored as
    UTF-8 in HDF5: a newline or other control character, or bytes that are not UTF-8, would break
    each of those, so such files are skipped and listed like unreadable ones (rename them)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8; rename it"
    if _UNPRINTABLE.search(rel):
        return "file name has a control character or line break (newline, tab, ...); rename it"
    return None
