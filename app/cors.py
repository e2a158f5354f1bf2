"""CORS (``server.cors``, Olla's keys) through flask-cors: browsers on the allowed origins
may call the proxy and read its ``X-Olla-*`` and rate-limit headers. Preflights are
answered by the gate (``app.views.gate``) without an API key and without an upstream;
flask-cors adds the ``Access-Control-*`` headers to them and to every other answer."""

from __future__ import annotations

from flask import Flask
from flask_cors import CORS

from .config import CorsSettings

# What a browser script may read when ``exposed_headers`` is empty (Olla: all X-Olla-*).
EXPOSED = ("X-Olla-Request-Id", "X-Olla-Endpoint", "X-Olla-Model", "X-Olla-Backend-Type",
           "X-Olla-Response-Time", "X-Olla-Routing-Strategy", "X-Olla-Routing-Decision",
           "X-Olla-Routing-Reason", "X-Olla-Mode", "X-Olla-Sticky-Session",
           "X-Olla-Sticky-Key-Source", "X-Olla-Session-ID", "X-RateLimit-Limit",
           "X-RateLimit-Remaining", "X-RateLimit-Reset", "Retry-After")


def enable_cors(app: Flask, cors: CorsSettings) -> None:
    """Answer CORS on every route."""
    CORS(app, origins=list(cors.allowed_origins), methods=list(cors.allowed_methods),
         allow_headers=list(cors.allowed_headers),
         expose_headers=list(cors.exposed_headers or EXPOSED),
         supports_credentials=cors.allow_credentials, max_age=cors.max_age,
         automatic_options=False, vary_header=True)
