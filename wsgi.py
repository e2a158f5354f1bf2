"""Production entry point: ``gunicorn wsgi:app`` (gunicorn.conf.py sets the gevent worker)."""

from app import create_app, logs
from app.services import services_of

app = create_app()
logs.configure(services_of(app).settings)
