"""``olla-py`` (also ``python -m app``): ``[--config FILE] [--bind HOST:PORT] [--workers N]
[--check] [--version]``. Validates the config, then runs the proxy under gunicorn with the
gevent worker (``app.gunicorn_conf``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .config import CONFIG_FILE_ENV, ConfigError, load_settings

# Where the ``app`` package lives (the repo root, or site-packages once installed): on
# gunicorn's path, whatever directory the command is run from.
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    """Validate the config, then hand over to gunicorn."""
    parser = argparse.ArgumentParser(prog="olla-py", description="llama.cpp proxy")
    parser.add_argument("--config", help="YAML config (default: $OLLA_CONFIG_FILE, "
                        "else config/config.yaml)")
    parser.add_argument("--bind", help="HOST:PORT (default: server.host:server.port)")
    parser.add_argument("--workers", type=int, help="gunicorn workers (default 1)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--version", action="version", version=f"olla-py {__version__}")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        sys.exit(f"olla-py: {exc}")
    if args.check:
        print(f"config OK: {len(settings.endpoints)} endpoint(s)")
        return
    env = dict(os.environ)
    config = args.config or env.get(CONFIG_FILE_ENV)
    if config:
        env[CONFIG_FILE_ENV] = str(Path(config).resolve())
    if args.workers:
        env["OLLA_WORKERS"] = str(args.workers)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "gunicorn", "-c", "python:app.gunicorn_conf"]
    if args.bind:
        command += ["--bind", args.bind]
    command.append("app.wsgi:app")
    os.execve(sys.executable, command, env)


if __name__ == "__main__":
    main()
