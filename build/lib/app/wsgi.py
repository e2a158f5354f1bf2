"""Production entry point: ``gunicorn app.wsgi:app`` (``app.gunicorn_conf`` sets the
gevent worker; ``olla-py`` runs exactly that).

Imported once per worker (no preload), after the gevent worker has patched the standard
library, so the health-check greenlet started here belongs to this worker.
"""

from app import create_app, logs
from app.config import load_settings
from app.services import services_of

settings = load_settings()
logs.configure(settings)  # first: building the app may log (e.g. Redis unreachable)
app = create_app(settings)
services_of(app).start_background()
