"""Draining endpoints: taken out of rotation (no new requests; those in flight finish; the
queue goes to the others) by ``drain: true`` in the config or ``POST
/internal/endpoints/<name>/drain``, and back by ``/undrain``. No Flask.

A drain asked of one worker holds for all: the overrides (endpoint name -> drained or not)
live in Redis with ``state.redis_url`` (every worker of every host), else in a file in this
proxy's runtime directory (``$PROMETHEUS_MULTIPROC_DIR``, every worker of this master), else
in this process only. Every worker reads them each second (the renewing greenlet's round)
and applies them; the config's ``drain`` holds for endpoints no override names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .config import StateSettings
from .metrics_dir import MULTIPROC_ENV
from .registry import EndpointState

if TYPE_CHECKING:
    from .shared import SharedTable

log = logging.getLogger(__name__)

FILE = "drains.json"


class Drains:
    """The drain overrides, shared as widely as this proxy is."""

    def __init__(self, states: Mapping[str, EndpointState], state: StateSettings,
                 environ: Mapping[str, str] | None = None,
                 on_change: Callable[[Iterable[EndpointState]], None] | None = None,
                 table: SharedTable | None = None) -> None:
        """``table``: the worker's Redis connections (the slot table's), when it has them;
        else, with ``state.redis_url``, connections of its own."""
        self.states = states
        self.on_change = on_change
        self._table: SharedTable | None = table
        self._key = f"{state.key_prefix}:drains"
        if table is None and state.redis_url:
            from .shared import SharedTable

            self._table = SharedTable(state, "", {})
        directory = (environ if environ is not None else os.environ).get(MULTIPROC_ENV)
        self._path = os.path.join(directory, FILE) if directory else None
        self._local: dict[str, bool] = {}
        self._seen: Any = None  # the file's (mtime, size) when last read

    def set(self, name: str, drained: bool) -> None:
        """Drain (or undrain) an endpoint everywhere; applied here at once."""
        if self._table is not None:
            from .shared import RedisDown

            try:
                self._table.command("HSET", self._key, name, "1" if drained else "0")
            except RedisDown as exc:
                log.warning("drain: Redis unreachable (%s): %s only in this worker", exc,
                            "drained" if drained else "undrained")
        elif self._path is not None:
            overrides = self._read_file() or {}
            overrides[name] = drained
            temporary = f"{self._path}.{os.getpid()}"
            with open(temporary, "w", encoding="utf-8") as out:
                json.dump(overrides, out)
            os.replace(temporary, self._path)
        self._local[name] = drained
        self._apply({name: drained})
        log.info("endpoint %s %s", name, "drained" if drained else "undrained")

    def sync(self) -> None:
        """Read the shared overrides and apply them (each second, in every worker)."""
        overrides: dict[str, bool] | None = None
        if self._table is not None:
            from .shared import RedisDown

            try:
                found = self._table.command("HGETALL", self._key) or {}
            except RedisDown:
                return  # keep what is applied until Redis answers
            overrides = {str(k): str(v) == "1" for k, v in found.items()}
        elif self._path is not None:
            overrides = self._read_file(only_if_changed=True)
        if overrides is not None:
            self._apply(overrides)

    def _read_file(self, only_if_changed: bool = False) -> dict[str, bool] | None:
        assert self._path is not None
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            return {}
        seen = (stat.st_mtime_ns, stat.st_size)
        if only_if_changed and seen == self._seen:
            return None
        with contextlib.suppress(OSError, ValueError):
            with open(self._path, encoding="utf-8") as found:
                document = json.load(found)
            self._seen = seen
            if isinstance(document, dict):
                return {str(k): bool(v) for k, v in document.items()}
        return None

    def _apply(self, overrides: Mapping[str, bool]) -> None:
        changed = []
        for name, state in self.states.items():
            drained = overrides.get(name, self._local.get(name, state.endpoint.drain))
            if drained != state.draining:
                state.draining = drained
                changed.append(state)
        if changed and self.on_change is not None:
            self.on_change(changed)
