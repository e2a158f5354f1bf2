"""Olla's status routes: liveness, fleet status, per-model stats, the unified catalogue and
the version. GET only; the JSON is built in ``app.status``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from flask import Blueprint, Response, g, request

from .. import status
from ..access import may_use, presented_key
from ..errors import Forbidden, MethodNotAllowed, RouteNotFound
from ..metrics import CONTENT_TYPE
from ..services import services

bp = Blueprint("status", __name__)
PATHS = ("/internal/health", "/internal/status", "/internal/status/endpoints",
         "/internal/status/models", "/internal/stats/models", "/internal/stats/translators",
         "/internal/stats/sticky", "/internal/process", "/olla/models", "/version",
         "/internal/metrics")


def _json(document: Any) -> Response:
    response = Response(json.dumps(document), mimetype="application/json")
    # As Olla: state changes under the client, so caches must revalidate every time.
    response.headers["Cache-Control"] = "private, no-cache"
    return response


@bp.get("/internal/health")
def health() -> Response:
    """Process liveness: always 200."""
    return _json(status.liveness())


@bp.get("/internal/status")
def system() -> Response:
    """The fleet at a glance."""
    return _json(status.system_status(services()))


@bp.get("/internal/status/endpoints")
def endpoints() -> Response:
    """Every endpoint: health, traffic, models and slots."""
    return _json(status.endpoints_status(services()))


@bp.get("/internal/status/models")
def models() -> Response:
    """Every discovered model, by family, with the endpoints serving it."""
    svc = services()
    svc.registry.refresh()  # endpoints never discovered yet (the health loop may not have run)
    return _json(status.models_status(svc, request.args))


@bp.get("/internal/stats/models")
def model_stats() -> Response:
    """Per-model request counts, latency percentiles and tokens per second."""
    return _json(status.model_stats(services(), request.args))


@bp.get("/internal/stats/translators")
def translator_stats() -> Response:
    """Requests through the Anthropic routes (always passed through to llama.cpp)."""
    return _json(status.translator_stats(services()))


@bp.get("/internal/stats/sticky")
def sticky_stats() -> Response:
    """Sticky sessions: Olla's counters, outcomes and the measured KV-cache hit rate."""
    return _json(status.sticky_stats(services()))


@bp.get("/internal/process")
def process() -> Response:
    """The answering worker's memory, garbage collector, greenlets and uptime."""
    return _json(status.process_status(services()))


@bp.get("/olla/models")
def unified_models() -> Response:
    """The unified model catalogue."""
    svc = services()
    svc.registry.refresh()
    key = g.get("api_key")
    return _json(status.unified_models(svc, request.args,
                                       visible=lambda name: may_use(key, name)))


@bp.get("/olla/models/<path:model_id>")
def unified_model(model_id: str) -> Response:
    """One model of the unified catalogue, by id or alias; 404 JSON when none."""
    svc = services()
    svc.registry.refresh()
    key = g.get("api_key")
    return _json(status.unified_model(svc, model_id, visible=lambda name: may_use(key, name)))


@bp.get("/internal/metrics")
def metrics() -> Response:
    """Prometheus text: every worker's series and the fleet's llama.cpp metrics."""
    svc = services()
    return Response(svc.metrics.render(svc), content_type=CONTENT_TYPE)


@bp.get("/version")
def version() -> Response:
    """Name, version, capabilities and the status API's routes."""
    return _json(status.version_info(services()))


@bp.post("/internal/endpoints/<name>/drain")
def drain(name: str) -> Response:
    """Take an endpoint out of rotation: requests in flight finish, no new ones go there."""
    return _drain(name, True)


@bp.post("/internal/endpoints/<name>/undrain")
def undrain(name: str) -> Response:
    """Put a drained endpoint back in rotation."""
    return _drain(name, False)


def _drain(name: str, drained: bool) -> Response:
    svc = services()
    if not svc.access.internal.admin(presented_key(request.headers)):
        raise Forbidden("Forbidden: draining needs server.internal_access.admin_key "
                        "(as Authorization: Bearer <key> or X-API-Key)")
    state = svc.registry.states.get(name)
    if state is None:
        raise RouteNotFound(f"No endpoint named {name!r}", code="endpoint_not_found")
    svc.drains.set(name, drained)
    held = state.fleet_in_use if state.fleet_in_use is not None else state.in_flight
    return _json({"name": name, "draining": state.draining, "status": state.shown_status,
                  "in_flight": held})


def wrong_method() -> Response:
    # Explicit, not Werkzeug's own 405: the proxy's ``/olla/<prefix>/`` rule would otherwise
    # turn ``POST /olla/models`` into a redirect to ``/olla/models/``.
    raise MethodNotAllowed(f"Method {request.method} not allowed on {request.path}",
                           headers={"Allow": "GET, HEAD"})


def answer_wrong_methods(blueprint: Blueprint, paths: Iterable[str]) -> None:
    """Other methods on these GET routes: 405 JSON with ``Allow: GET, HEAD``."""
    for path in paths:
        blueprint.add_url_rule(path, "wrong_method" + path.replace("/", "_"), wrong_method,
                               methods=["POST", "PUT", "PATCH", "DELETE"])


answer_wrong_methods(bp, PATHS)
