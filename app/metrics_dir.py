"""The directory prometheus_client's multiprocess mode shares between gunicorn workers.

Used by gunicorn's master before it forks, so it imports nothing but the standard library
(prometheus_client itself must first be imported in each worker, after the variable is set).
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import MutableMapping

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_directory(environ: MutableMapping[str, str]) -> str:
    """Point PROMETHEUS_MULTIPROC_DIR at an empty directory (a new temporary one unless set;
    a given one is emptied of the previous run's files) and return it."""
    path = environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
    else:
        path = tempfile.mkdtemp(prefix="olla-metrics-")
        environ[MULTIPROC_ENV] = path
    return path


def forget_process(environ: MutableMapping[str, str], pid: int) -> None:
    """Drop a dead worker's live gauges (what prometheus_client's mark_process_dead does)."""
    path = environ.get(MULTIPROC_ENV)
    if path:
        for live in glob.glob(os.path.join(path, f"gauge_live*_{pid}.db")):
            os.remove(live)
