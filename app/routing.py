"""From a request's ``model`` to the ordered list of endpoints to try."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ModelNotFound
from .registry import EndpointState, Registry, name_key


@dataclass(frozen=True)
class Candidate:
    """An endpoint to try, and the model name to send it (None: send the body as is)."""

    state: EndpointState
    model: str | None


class Router:
    """Chooses candidate endpoints: those serving the model, highest priority first."""

    def __init__(self, registry: Registry, aliases: Mapping[str, tuple[str, ...]]) -> None:
        self.registry = registry
        self.aliases = {name_key(k): v for k, v in aliases.items()}

    def _ordered(self, states: list[EndpointState], route: str) -> list[EndpointState]:
        # Endpoints known to lack the route's feature, then those known to be down, go last:
        # still tried, but only after the others.
        return sorted(states, key=lambda s: (route in s.unsupported, s.reachable is False,
                                             -s.endpoint.priority))

    def candidates(self, model: str | None, route: str = "") -> list[Candidate]:
        """Endpoints for a request; raises ModelNotFound when nobody serves ``model``."""
        self.registry.refresh()
        states = list(self.registry)
        if not model:
            return [Candidate(s, None) for s in self._ordered(states, route)]
        targets = self.aliases.get(name_key(model), (model,))
        keys = [name_key(t) for t in targets]
        serving = [s for s in states if s.serves(keys)]
        if not serving:
            # The fleet may have changed since discovery: look once more before giving up.
            self.registry.refresh(max_age=0)
            serving = [s for s in states if s.serves(keys)]
        if not serving:
            raise ModelNotFound(f"Model not found: {model}")
        aliased = name_key(model) in self.aliases
        return [Candidate(s, s.native_name(keys) if aliased else None)
                for s in self._ordered(serving, route)]
