"""The directory prometheus_client's multiprocess mode shares between gunicorn workers.

Used by gunicorn's master before it forks, so it imports nothing but the standard library
(prometheus_client itself must first be imported in each worker, after the variable is set).

The proxy only ever removes what it created: a directory of its own (``olla-metrics-*``,
with an owner file naming the master's pid), made inside ``$PROMETHEUS_MULTIPROC_DIR`` when
that is set (which may be shared with other programs) or in the system's temporary
directory when not; a previous run's is removed only once its master is gone.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import MutableMapping

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OWN_PREFIX = "olla-metrics-"
OWNER_FILE = ".olla-owner"


def prepare_directory(environ: MutableMapping[str, str], pid: int | None = None) -> str:
    """Point PROMETHEUS_MULTIPROC_DIR at a new, empty directory of this proxy's (inside the
    one given, if any) and return it."""
    base = environ.get(MULTIPROC_ENV)
    if base:
        os.makedirs(base, exist_ok=True)
        remove_stale(base)
    path = tempfile.mkdtemp(prefix=OWN_PREFIX, dir=base or None)
    with open(os.path.join(path, OWNER_FILE), "w", encoding="ascii") as owner:
        owner.write(str(pid if pid is not None else os.getpid()))
    environ[MULTIPROC_ENV] = path
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(base: str) -> list[str]:
    """Remove directories a previous run of the proxy made in ``base`` whose master has
    exited; nothing else is touched. Returns what was removed."""
    removed = []
    for path in glob.glob(os.path.join(base, OWN_PREFIX + "*")):
        owner = os.path.join(path, OWNER_FILE)
        try:
            with open(owner, encoding="ascii") as handle:
                pid = int(handle.read().strip())
        except (OSError, ValueError):
            continue  # not ours (no owner file we wrote): leave it
        if not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_directory(environ: MutableMapping[str, str]) -> None:
    """At the master's exit: remove the directory ``prepare_directory`` made."""
    path = environ.get(MULTIPROC_ENV)
    if path and os.path.basename(path).startswith(OWN_PREFIX) \
            and os.path.exists(os.path.join(path, OWNER_FILE)):
        shutil.rmtree(path, ignore_errors=True)


def forget_process(environ: MutableMapping[str, str], pid: int) -> None:
    """Drop a dead worker's live gauges (what prometheus_client's mark_process_dead does)."""
    path = environ.get(MULTIPROC_ENV)
    if path and os.path.exists(os.path.join(path, OWNER_FILE)):
        for live in glob.glob(os.path.join(path, f"gauge_live*_{pid}.db")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(live)
