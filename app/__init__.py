"""olla-py: one fast, reliable endpoint in front of many llama.cpp servers.

Importing this package imports nothing heavy: gunicorn's master reads the config before
its gevent workers patch the standard library, and nothing that opens sockets, creates
locks or imports ssl may be loaded by then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from .config import Settings

__version__ = "0.1.0"


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app: settings, services in ``app.extensions``, blueprints, errors."""
    from flask import Flask

    from .config import load_settings
    from .embedded import with_embedded_endpoint
    from .errors import register_error_handlers
    from .guard import Guard
    from .services import Services
    from .views.gate import bp as gate_bp
    from .views.proxy import bp as proxy_bp
    from .views.status import bp as status_bp
    from .views.ui import bp as ui_bp

    settings = with_embedded_endpoint(settings or load_settings())
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_body_size
    app.extensions["olla"] = Services.build(settings, __version__)
    app.register_blueprint(proxy_bp)  # first: its request id and clock start every request
    app.register_blueprint(gate_bp)
    app.register_blueprint(status_bp)
    app.register_blueprint(ui_bp)
    register_error_handlers(app)
    if settings.server.cors.enabled:
        from .cors import enable_cors

        enable_cors(app, settings.server.cors)
    app.wsgi_app = Guard(app.wsgi_app)  # type: ignore[method-assign]
    return app
