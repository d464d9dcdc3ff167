"""The package as users install it: a wheel, in a fresh venv, serving the demo page on its own."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from .harness import ROOT, free_port, http_status, wait_answering

pytestmark = pytest.mark.cluster


def _run(*command: str | Path, cwd: Path) -> None:
    result = subprocess.run([str(part) for part in command], check=False, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.timeout(600)
def test_an_installed_wheel_serves_the_demo_page_and_the_api_docs(tmp_path: Path) -> None:
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", tmp_path / "dist", ROOT, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("webapp-*.whl")
    venv.EnvBuilder(with_pip=True).create(tmp_path / "venv")
    python = tmp_path / "venv" / "bin" / "python"
    # The runtime set the project pins for deployments (requirements.txt), then the wheel alone.
    _run(python, "-m", "pip", "install", "--quiet", "-r", ROOT / "requirements.txt", cwd=tmp_path)
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", wheel, cwd=tmp_path)
    installed = subprocess.run(
        [python, "-c", "import webapp, pathlib; print(pathlib.Path(webapp.__file__).parent)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()
    package = Path(installed)
    assert package.is_relative_to(tmp_path / "venv"), package  # not the source tree
    assert (package / "py.typed").is_file()

    port = free_port()
    env = {"PATH": str(python.parent), "SECRET_KEY": "wheel-test-secret-0123456789", "INSTANCE_ID": "wheel"}
    server = subprocess.Popen(
        [python, "-m", "hypercorn", "webapp.asgi:app", "--bind", f"127.0.0.1:{port}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_answering(
            server, lambda: http_status(base + "/healthz")[0] == 200, "the installed app", 30,
            lambda: server.communicate()[0].decode()[-3000:] if server.poll() is not None else "",
        )
        status, page = http_status(base + "/", timeout=5)
        assert status == 200 and b"Log in" in page, page[:500]  # the template, from the package
        for asset in ("/static/demo.js", "/static/demo.css", "/static/vendor/socket.io/socket.io.min.js",
                      "/static/vendor/swagger-ui/swagger-ui-bundle.js", "/docs", "/openapi.json"):
            assert http_status(base + asset, timeout=5)[0] == 200, asset
    finally:
        server.terminate()
        server.wait(15)
