"""From a request's ``model`` to the ordered list of endpoints to try."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .balancer import Balancer
from .errors import ModelNotFound, ModelUnavailable, NoEndpointAvailable
from .registry import EndpointState, Registry, Status, name_key


@dataclass(frozen=True)
class Candidate:
    """An endpoint to try, and the model name to send it (None: send the body as is)."""

    state: EndpointState
    model: str | None
    # The fleet's one name for what was asked (the configured alias, else the model id the
    # endpoint lists): what metrics, stats and X-Olla-Model show, however the client
    # spelled it ("" when the endpoint lists no model).
    served: str = ""
    # Why it was chosen, for X-Olla-Routing-Reason ("" when no model was named).
    reason: str = ""


# Olla's routing headers, on answers to requests that named a model. Olla's default
# strategy, the only one here: a model is served only by endpoints that list it.
STRATEGY = "strict"


def routing_headers(decision: str, reason: str) -> dict[str, str]:
    """X-Olla-Routing-Strategy, -Decision (routed, rejected) and -Reason."""
    return {"X-Olla-Routing-Strategy": STRATEGY, "X-Olla-Routing-Decision": decision,
            "X-Olla-Routing-Reason": reason}


def describe(states: list[EndpointState]) -> str:
    """``a (offline), b (loading)``: for error messages."""
    return ", ".join(f"{s.endpoint.name} ({s.status.value})" for s in states)


class Router:
    """Chooses candidate endpoints: routable ones serving the model, in balancer order."""

    def __init__(self, registry: Registry, aliases: Mapping[str, tuple[str, ...]],
                 balancer: Balancer) -> None:
        self.registry = registry
        self.aliases = {name_key(k): v for k, v in aliases.items()}
        self.alias_names = {name_key(k): k for k in aliases}
        self.balancer = balancer

    def _ordered(self, states: list[EndpointState], route: str) -> list[EndpointState]:
        routable = [s for s in states if s.accepting]
        # Not probed yet (no health loop running, or just started): tried after the routable.
        unknown = [s for s in states if s.status is Status.UNKNOWN and not s.draining]
        ordered = self.balancer(routable) + sorted(unknown, key=lambda s: -s.endpoint.priority)
        # Endpoints known to lack the route's feature go last: tried only if nobody else can.
        return sorted(ordered, key=lambda s: route in s.unsupported)

    def candidates(self, model: str | None, route: str = "") -> list[Candidate]:
        """Endpoints for a request, best first.

        Raises ModelNotFound when nobody serves ``model``, ModelUnavailable when only
        endpoints that cannot take requests now serve it, NoEndpointAvailable when no
        endpoint can take a request that names no model.
        """
        self.registry.refresh()
        states = list(self.registry)
        if not model:
            ordered = self._ordered(states, route)
            if not ordered:
                raise NoEndpointAvailable(
                    "No llama.cpp endpoint is available" +
                    (f": {describe(states)}" if states else " (none configured)"))
            return [Candidate(s, None, s.primary_model or "") for s in ordered]
        targets = self.aliases.get(name_key(model), (model,))
        keys = [name_key(t) for t in targets]
        serving = [s for s in states if s.serves(keys)]
        if not serving:
            # The fleet may have changed since discovery: look once more before giving up.
            self.registry.refresh(max_age=0)
            serving = [s for s in states if s.serves(keys)]
        if not serving:
            raise ModelNotFound(f"Model not found: {model}",
                                headers=routing_headers("rejected", "model_not_found"))
        ordered = self._ordered(serving, route)
        if not ordered:
            raise ModelUnavailable(
                f"Model {model} is served only by endpoints that cannot take requests now: "
                f"{describe(serving)}", headers=routing_headers("rejected", "model_unavailable"))
        alias = self.alias_names.get(name_key(model))
        reason = (f'alias "{alias}" resolved to {len(ordered)} endpoint(s)' if alias
                  else "model_found")
        out = []
        for state in ordered:
            native = state.native_name(keys)
            out.append(Candidate(state, native if alias else None,
                                 alias or native or state.primary_model or "", reason))
        return out
