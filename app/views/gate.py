"""Who may ask what, before any view runs: CORS preflights answered, ``/internal`` behind
its access policy, API keys and rate limits on ``/olla/``. The decisions are
``app.access`` and ``app.ratelimit``'s; this only reads the request and raises."""

from __future__ import annotations

from flask import Blueprint, Response, g, request

from ..access import InternalPolicy, presented_key
from ..dispatch import Share
from ..errors import Forbidden, NotAuthenticated
from ..services import services

bp = Blueprint("gate", __name__)

HEALTH = "/internal/health"


@bp.before_app_request
def _gate() -> Response | None:
    svc = services()
    path = request.path
    if request.method == "OPTIONS" and svc.settings.server.cors.enabled \
            and "Access-Control-Request-Method" in request.headers:
        # A browser's preflight: flask-cors adds its headers; no key needed (browsers
        # send none), nothing sent upstream.
        return Response(status=204)
    if path.startswith("/olla/"):
        keys, limiter = svc.access.keys, svc.limiter
        key = None
        if keys.enabled:
            presented = presented_key(request.headers)
            key = keys.find(presented)
            if key is None:
                if limiter.active:
                    limiter.admit(client_address(), None)  # a flood of bad keys counts too
                raise NotAuthenticated(
                    "Missing API key: send it as Authorization: Bearer <key> or X-API-Key"
                    if presented is None else "Invalid API key")
            g.api_key = key
            g.share = Share(key.name, key.weight, key.max_concurrent)
        if limiter.active:
            g.rate = limiter.admit(client_address(), key)
    elif path == HEALTH:
        if svc.limiter.limits_health:
            g.rate = svc.limiter.admit_health(client_address())
    elif InternalPolicy.guards(path) and not svc.access.internal.allows(
            path, client_address(), presented_key(request.headers)):
        raise Forbidden(f"Forbidden: {path} is open to the addresses in "
                        "server.internal_access.allowed_cidrs, or with its admin key")
    return None


def client_address() -> str:
    """The client's address (behind trusted proxies, when so configured)."""
    return services().access.address.resolve(request.remote_addr or "", request.headers)


@bp.after_app_request
def _rate_headers(response: Response) -> Response:
    verdict = g.get("rate")
    if verdict is not None and verdict.headers:
        response.headers.update(verdict.headers)
    return response
