"""``gunicorn wsgi:app`` from the repo root: the app of ``app.wsgi``."""

from app.wsgi import app  # noqa: F401
