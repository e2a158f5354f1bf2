"""``python -m app [--config FILE] [--bind HOST:PORT] [--workers N]``: run the proxy under
gunicorn with the gevent worker (gunicorn.conf.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    """Validate the config, then hand over to gunicorn."""
    parser = argparse.ArgumentParser(prog="olla", description="llama.cpp proxy")
    parser.add_argument("--config", help="YAML config (default: $OLLA_CONFIG_FILE, "
                        "else config/config.yaml)")
    parser.add_argument("--bind", help="HOST:PORT (default: server.host:server.port)")
    parser.add_argument("--workers", type=int, help="gunicorn workers (default 1)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        sys.exit(f"olla: {exc}")
    if args.check:
        print(f"config OK: {len(settings.endpoints)} endpoint(s)")
        return
    env = dict(os.environ)
    config = args.config or env.get("OLLA_CONFIG_FILE")
    if config:
        # gunicorn changes into the repo; keep a relative path meaning what the user meant.
        env["OLLA_CONFIG_FILE"] = str(Path(config).resolve())
    if args.workers:
        env["OLLA_WORKERS"] = str(args.workers)
    command = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
               "--chdir", str(ROOT)]
    if args.bind:
        command += ["--bind", args.bind]
    command.append("wsgi:app")
    os.execve(sys.executable, command, env)


if __name__ == "__main__":
    main()
