"""The benchmarks' timer: run a command as a child process and read its own resource usage.

``os.wait4`` gives the child's rusage (CPU seconds, peak RSS), so no GNU time is needed (GPU
images lack it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_child(
    cmd: list[str], label: str, cwd: Path | None = None, tail: int = 2000
) -> tuple[float, os.struct_rusage, bytes]:
    """Run ``cmd``: (wall seconds, its rusage, its stdout). A failure exits with ``label`` and
    the last ``tail`` characters of its stderr."""
    with tempfile.TemporaryFile("w+") as err, tempfile.TemporaryFile("w+b") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, not by Popen: wait4 gives usage
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit(f"{label} failed:\n{err.read()[-tail:]}")
        out.seek(0)
        return wall, usage, out.read()
