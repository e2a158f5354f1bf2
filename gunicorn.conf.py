"""gunicorn reads this file by default when started from the repo root (``gunicorn
wsgi:app``): the proxy's settings and hooks live in ``app/gunicorn_conf.py``, which the
installed ``olla-py`` command uses."""

from app.gunicorn_conf import *  # noqa: F403
