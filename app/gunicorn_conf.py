"""gunicorn settings for the proxy: ``olla-py`` and ``python -m app`` run gunicorn with
``-c python:app.gunicorn_conf``; the repo's ``gunicorn.conf.py`` re-exports this module, so
``gunicorn wsgi:app`` from the repo root reads it too.

The YAML config is found as the app finds it (``OLLA_CONFIG_FILE``, else
config/config.yaml); ``server.host``/``server.port`` become the bind address unless
``--bind`` is given on the command line, which gunicorn lets override this file.
"""

import contextlib
import math
import os
import signal

from app import embedded
from app import metrics_dir as metrics
from app.config import (
    CONFIG_SNAPSHOT_ENV,
    WORKER_COUNT_ENV,
    ConfigError,
    config_path,
    load_settings,
)

try:
    # The file the operator edits (its snapshot, for the workers, is made in on_starting).
    _source = config_path(environ={k: v for k, v in os.environ.items()
                                   if k != CONFIG_SNAPSHOT_ENV})
    _settings = load_settings(str(_source) if _source else None)
except ConfigError as _exc:
    raise SystemExit(f"olla: {_exc}") from None

bind = [f"{_settings.server.host}:{_settings.server.port}"]
# gevent's worker, answering the errors gunicorn handles itself in the spec's JSON.
worker_class = "app.worker.Worker"
_limits = _settings.server.request_limits
# server.request_limits.max_header_size: one header line, and the request line (gunicorn
# caps that at 8190); beyond, 431 or 414 in JSON before the app sees the request.
limit_request_field_size = _limits.max_header_size
limit_request_line = min(_limits.max_header_size, 8190)
workers = int(os.environ.get("OLLA_WORKERS", "1"))
# One gevent worker holds at least this many open streams at once.
worker_connections = 2000
# With gevent the worker timeout is a heartbeat from an idle greenlet, not a request limit:
# a stream that runs for an hour is not killed, a worker whose loop is stuck is.
timeout = 120
# SIGTERM: requests in flight get this long (Olla's server.shutdown_timeout); streams still
# running just before it ends get a final server_shutting_down event (app.worker).
# --graceful-timeout on gunicorn's command line wins.
graceful_timeout = math.ceil(_settings.server.shutdown_timeout)  # gunicorn takes whole seconds
keepalive = 75
# No preload: every worker builds its own app (and, later, its own background greenlets).
preload_app = False
accesslog = None
errorlog = "-"
loglevel = _settings.log_level


def _snapshot(text: str) -> None:
    """Write the config the workers read (atomically: a booting worker reads all of it)."""
    path = os.path.join(os.environ[metrics.MULTIPROC_ENV], "config.yaml")
    with open(f"{path}.new", "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(f"{path}.new", path)
    os.environ[CONFIG_SNAPSHOT_ENV] = path


def on_starting(server):  # type: ignore[no-untyped-def]
    """Give the workers a fresh runtime directory (metrics, the config snapshot); start the
    embedded llama.cpp when no endpoint is configured."""
    metrics.prepare_directory(os.environ)
    if _source is not None:
        _snapshot(_source.read_text(encoding="utf-8"))
    if server.cfg.workers > 1 and not _settings.state.redis_url:
        server.log.info(
            "%d workers without shared state: each takes floor(total_slots / %d) of every "
            "endpoint's slots and keeps its own queue; set state.redis_url (or "
            "OLLA_REDIS_URL) to share one slot table and queue", server.cfg.workers,
            server.cfg.workers)
    if _settings.endpoints or not _settings.embedded.enabled or os.environ.get(embedded.ENV_URL):
        return
    server.log.info("no endpoints configured: starting the embedded llama.cpp (Gemma 3 270M)")
    process, url, key = embedded.start(_settings.embedded)
    os.environ[embedded.ENV_URL] = url
    os.environ[embedded.ENV_KEY] = key  # for the workers only (see app.embedded)
    server.olla_embedded = process
    server.log.info("embedded llama.cpp ready at %s", url)


def on_reload(server):  # type: ignore[no-untyped-def]
    """SIGHUP: the workers running now are told they are retiring for a reload (their
    requests get server.reload_grace, not the shutdown timeout); the config file is read
    again and, when it is valid, becomes what the new workers read. A broken file is
    refused and logged: the new workers read the previous one."""
    for pid in list(server.WORKERS):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGWINCH)
    if _source is None:
        server.log.info("reload: no config file to read again")
        return
    try:
        text = _source.read_text(encoding="utf-8")
        load_settings(str(_source))
    except (ConfigError, OSError) as exc:
        server.log.error("reload refused, still serving the previous configuration: %s", exc)
        return
    _snapshot(text)
    server.log.info("reload: %s read again; new workers follow it", _source)


def post_fork(server, worker):  # type: ignore[no-untyped-def]
    """Tell the app how many workers share this proxy's slots."""
    os.environ[WORKER_COUNT_ENV] = str(server.cfg.workers)


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """A worker is gone: its live gauges (in-flight, queue depth) no longer count."""
    metrics.forget_process(os.environ, worker.pid)


def on_exit(server):  # type: ignore[no-untyped-def]
    """Stop the embedded llama.cpp with the master; remove the metrics directory."""
    metrics.remove_directory(os.environ)
    process = getattr(server, "olla_embedded", None)
    if process is not None:
        embedded.stop(process)
