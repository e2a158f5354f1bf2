"""The proxy as a package: a wheel built from the repo (PEP 517, as ``python -m build``
does), installed elsewhere, runs as ``olla-py`` from any directory with nothing of the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import requests

from app import __version__

from .procs import ROOT, free_port, stop_process, wait_http

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, installed (without its dependencies: this venv has them) into a
    directory of its own."""
    work = tmp_path_factory.mktemp("package")
    # Built from a copy of what the package is made of: setuptools builds in the source
    # tree (build/, *.egg-info), which must not be the repo's.
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "app", source / "app",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(work / "dist"), str(source)], check=True, timeout=300)
    wheels = list((work / "dist").glob("olla_py-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(work / "site"), str(wheels[0])], check=True, timeout=120)
    return work


def run(installed: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(installed / "site")}
    env.pop("OLLA_CONFIG_FILE", None)
    return subprocess.run([str(installed / "site" / "bin" / "olla-py"), *args], cwd=installed,
                          env=env, capture_output=True, text=True, timeout=60, check=False,
                          **kwargs)  # type: ignore[call-overload]


def test_the_wheel_holds_the_command_and_what_it_runs(installed: Path) -> None:
    wheel = next((installed / "dist").glob("olla_py-*.whl"))
    assert wheel.name.startswith(f"olla_py-{__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("app/gunicorn_conf.py", "app/wsgi.py", "app/worker.py", "app/shared.py",
                   "app/ui/index.html", "app/ui/app.js", "app/ui/app.css", "app/ui/favicon.svg"):
        assert module in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "olla-py = app.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]


def test_version_and_check(installed: Path) -> None:
    version = run(installed, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"olla-py {__version__}"
    config = installed / "good.yaml"
    config.write_text("endpoints:\n  - url: http://127.0.0.1:9\n    name: absent\n")
    checked = run(installed, "--check", "--config", str(config))
    assert checked.returncode == 0 and "config OK: 1 endpoint(s)" in checked.stdout
    broken = installed / "broken.yaml"
    broken.write_text("endpoints:\n  - url: ftp://nowhere\n")
    refused = run(installed, "--check", "--config", str(broken))
    assert refused.returncode != 0 and "endpoints[0].url" in refused.stderr


def test_the_installed_command_serves_from_anywhere(installed: Path) -> None:
    config = installed / "serve.yaml"
    config.write_text("endpoints:\n  - url: http://127.0.0.1:9\n    name: absent\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(installed / "site")}
    log = (installed / "serve.log").open("wb")
    process = subprocess.Popen(
        [str(installed / "site" / "bin" / "olla-py"), "--config", "serve.yaml", "--bind",
         f"127.0.0.1:{port}", "--workers", "2"],
        cwd=installed, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/internal/health", process, timeout=30)
        version = requests.get(f"http://127.0.0.1:{port}/version", timeout=5).json()
        assert version["version"] == __version__
        for asset in ("", "app.js", "favicon.svg"):  # the dashboard, from the wheel
            page = requests.get(f"http://127.0.0.1:{port}/internal/ui/{asset}", timeout=5)
            assert page.status_code == 200 and page.content, asset
    finally:
        stop_process(process)
        log.close()
    text = (installed / "serve.log").read_text()
    assert "Using worker: app.worker.Worker" in text and text.count("Booting worker") == 2
    assert "Traceback" not in text


def test_the_systemd_unit_passes_systemd_analyze_verify(installed: Path) -> None:
    """deploy/olla-py.service as shipped, with ExecStart pointing at the installed command
    (verify checks that it is executable): no error, no warning."""
    unit = (ROOT / "deploy" / "olla-py.service").read_text()
    assert "ExecStart=/opt/olla-py/bin/olla-py --config /etc/olla-py/config.yaml" in unit
    for option in ("ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                   "RuntimeDirectory=olla-py", "Environment=PROMETHEUS_MULTIPROC_DIR=/run/olla-py",
                   "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "User=olla-py"):
        assert option in unit, option
    command = installed / "site" / "bin" / "olla-py"
    path = installed / "olla-py.service"
    path.write_text(unit.replace("/opt/olla-py/bin/olla-py", str(command)))
    verified = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                              text=True, timeout=60, check=False)
    assert verified.returncode == 0 and verified.stderr.strip() == "", verified.stderr
    # The check can fail: a value systemd does not know is reported.
    path.write_text(unit.replace("/opt/olla-py/bin/olla-py", str(command))
                    .replace("Restart=on-failure", "Restart=sometimes"))
    wrong = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert "sometimes" in wrong.stderr
