"""Production entry point: ``gunicorn wsgi:app`` (gunicorn.conf.py sets the gevent worker)."""

from app import create_app

app = create_app()
