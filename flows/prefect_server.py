"""The temporary local Prefect server of ``fedtune run``, started on its first line.

Without ``PREFECT_API_URL``, Prefect starts a temporary server when a flow first asks for its
API: after Prefect, the flow module and everything they import are loaded, and then the run
waits for the server's start (about 20 s in a new ``PREFECT_HOME``, which migrates a new
database) with nothing else to do. ``fedtune run`` starts the same server itself, with the
command Prefect's ``SubprocessASGIServer`` runs, before it does anything slow, so that checking
the configuration, importing the flow and creating the MLflow store happen while the server
starts; the run then talks to it as to any Prefect API, through ``PREFECT_API_URL``.

Standard library only: this module is imported before Prefect.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# What Prefect's SubprocessASGIServer gives its server process (prefect/server/api/server.py):
# no UI, and the server's own marks of a temporary server.
_SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
_PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind


class ServerFailed(RuntimeError):
    """The temporary server exited or did not answer in time."""


def answers(api_url: str) -> bool:
    """Whether the Prefect API at ``api_url`` answers its health check now."""
    try:
        urllib.request.urlopen(f"{api_url}/health", timeout=1.0).close()
    except OSError:  # URLError included
        return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prefect_root() -> str:
    spec = importlib.util.find_spec("prefect")
    if spec is None or not spec.submodule_search_locations:
        raise ServerFailed("Prefect is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


class TemporaryServer:
    """A temporary Prefect server in a child process: ``start()`` returns at once, ``wait()``
    blocks until its API answers and returns ``PREFECT_API_URL``, ``stop()`` ends it (also at
    interpreter exit, after Prefect's own exit handlers have sent their last logs and events,
    because it is registered before Prefect is imported)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env or {}
        """Settings of the server process beyond this process's environment."""
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.used = False
        """Whether a flow ran on it (then it stops at exit, not before)."""

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> TemporaryServer:
        self.port = free_port()
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            _prefect_root(),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]
        self.process = subprocess.Popen(command, env={**os.environ, **self.env, **_SERVER_ENV})
        atexit.register(self.stop)
        return self

    def ready(self) -> bool:
        """Whether the API answers now."""
        return answers(self.api_url)

    def wait(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == _PORT_IN_USE:
                raise ServerFailed(
                    f"port {self.port} of the temporary Prefect server was taken by another "
                    "process; run again"
                )
            if code is not None:
                raise ServerFailed(f"the temporary Prefect server exited with code {code}")
            if self.ready():
                return self.api_url
            time.sleep(0.05)
        self.stop()
        raise ServerFailed(
            f"the temporary Prefect server did not answer within {timeout:g} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
        )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
