"""olla-py: one fast, reliable endpoint in front of many llama.cpp servers."""

from __future__ import annotations

from flask import Flask

from .config import Settings, load_settings
from .errors import register_error_handlers
from .services import Services

__version__ = "0.1.0"


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app: settings, services in ``app.extensions``, blueprints, errors."""
    from .embedded import with_embedded_endpoint
    from .views.proxy import bp as proxy_bp

    settings = with_embedded_endpoint(settings or load_settings())
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_body_size
    app.extensions["olla"] = Services.build(settings, __version__)
    app.register_blueprint(proxy_bp)
    register_error_handlers(app)
    return app
