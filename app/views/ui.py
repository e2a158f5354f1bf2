"""The dashboard: ``/internal/ui/`` (one page, its script and style, no build step, nothing
from a CDN) and the JSON it polls every 2 s, ``/internal/ui/data``. Behind the ``/internal``
access policy like every other internal route (``app.views.gate``)."""

from __future__ import annotations

import functools
import hashlib
import json
import mimetypes
from pathlib import Path

from flask import Blueprint, Response, redirect, request

from .. import status
from ..errors import RouteNotFound
from ..services import services
from .status import answer_wrong_methods

bp = Blueprint("ui", __name__)
ASSETS = Path(__file__).resolve().parent.parent / "ui"
FILES = frozenset({"index.html", "app.js", "app.css", "favicon.svg"})


@bp.get("/internal/ui")
def to_page() -> Response:
    """As Olla: the page lives at the path with its slash."""
    return redirect("/internal/ui/", code=307)  # type: ignore[return-value]


@bp.get("/internal/ui/")
def page() -> Response:
    return _asset("index.html")


@bp.get("/internal/ui/data")
def data() -> Response:
    """The fleet now and its last 15 minutes (``app.status.ui_data``)."""
    svc = services()
    svc.registry.refresh()  # endpoints never discovered yet (the health loop may not have run)
    response = Response(json.dumps(status.ui_data(svc), separators=(",", ":")),
                        mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/internal/ui/<name>")
def asset(name: str) -> Response:
    return _asset(name)


@functools.cache
def _read(name: str) -> tuple[bytes, str, str]:
    """An asset's bytes, type and ETag (a few KB each, read once)."""
    body = (ASSETS / name).read_bytes()
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return body, kind, hashlib.sha256(body).hexdigest()[:16]


def _asset(name: str) -> Response:
    if name not in FILES:
        raise RouteNotFound(f"Not found: /internal/ui/{name}")
    body, kind, etag = _read(name)
    response = Response(body, mimetype=kind)
    response.set_etag(etag)
    response.headers["Cache-Control"] = "no-cache"  # revalidated: a new version shows at once
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.make_conditional(request)  # 304 when the browser has this version
    return response


answer_wrong_methods(bp, ("/internal/ui", "/internal/ui/", "/internal/ui/data",
                          "/internal/ui/<name>"))
