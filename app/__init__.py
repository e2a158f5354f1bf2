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
    from .views.proxy import bp as proxy_bp
    from .views.status import bp as status_bp

    settings = with_embedded_endpoint(settings or load_settings())
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_body_size
    app.extensions["olla"] = Services.build(settings, __version__)
    app.register_blueprint(proxy_bp)
    app.register_blueprint(status_bp)
    register_error_handlers(app)
    app.wsgi_app = Guard(app.wsgi_app)  # type: ignore[method-assign]
    return app
