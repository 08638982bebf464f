"""The directory of the workers' metrics under ``run --workers N``, and the ones killed parents left behind.

prometheus-client's multiprocess mode sums the files every worker writes into one directory
(``PROMETHEUS_MULTIPROC_DIR``). Unless the user names one, the supervising parent makes it,
named after its own pid, and removes it as it exits. A parent killed outright (``kill -9``, the
OOM killer) cannot: so each parent, before making its own, removes those whose parent and
workers are all gone, rather than leaving one more in the temporary directory per kill.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile

__all__ = ["PREFIX", "make_metrics_dir", "remove_stale_metrics_dirs"]

PREFIX = "connic-metrics-"
"""How the directories made here are named: ``connic-metrics-PID-RANDOM``, PID the parent's."""
_OWNER = re.compile(rf"{re.escape(PREFIX)}(\d+)-")
_WRITER = re.compile(r"_(\d+)\.db$")  # prometheus-client's files: counter_PID.db, gauge_livesum_PID.db


def make_metrics_dir() -> str:
    """A new directory for this parent's workers' metrics, in the temporary directory (``$TMPDIR``)."""
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_metrics_dirs() -> list[str]:
    """Remove this user's metrics directories left by parents that are gone; the paths removed.

    Kept: one whose parent lives, and one a live process still writes to (an orphaned worker
    draining: its files are named after its pid). Directories of another user, symbolic links,
    and names not made here are never touched.
    """
    base = tempfile.gettempdir()
    removed: list[str] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        owner = _OWNER.match(entry.name)
        if owner is None or _alive(int(owner.group(1))):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            writers = [int(m.group(1)) for m in map(_WRITER.search, os.listdir(entry.path)) if m]
        except OSError:
            continue
        if any(_alive(pid) for pid in writers):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(entry.path)
            removed.append(entry.path)
    return removed
