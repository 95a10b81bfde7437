"""Running the real ``forwarder serve`` in a subprocess, and talking to it, for tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from forwarder.config import SecretStr, Settings, setting_fields
from forwarder.environment import env_name
from forwarder.webhooks import sign

REPO = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "whsec_test_fake_secret_123"
API_TOKEN = "api-token-1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that reproduces ``settings`` for a child process."""
    env: dict[str, str] = {}
    for name in setting_fields():
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, list):
            value = ",".join(v.get_secret_value() if isinstance(v, SecretStr) else v for v in value)
        elif hasattr(value, "value"):
            value = value.value
        variable = "DATAGRID_API_KEY" if name == "datagrid_api_key" else env_name(name)
        env[variable] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def forwarder_env(settings: Settings) -> dict[str, str]:
    """This process's environment without FORWARDER_* variables, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    env.pop("DATAGRID_API_KEY", None)
    env.update(settings_env(settings))
    return env


def run_forwarder(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real ``forwarder`` command (``python -m forwarder.cli ARGS``) to completion."""
    return subprocess.run(
        [sys.executable, "-m", "forwarder.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Forwarder:
    """One ``forwarder serve`` process with its own port and log file."""

    def __init__(self, settings: Settings, log_dir: Path, name: str = "fwd", **env: str) -> None:
        self.port = free_port()
        self.management_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.management_url = f"http://127.0.0.1:{self.management_port}"
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self.env = forwarder_env(settings)
        self.env.update(
            {
                "FORWARDER_HTTP_PORT": str(self.port),
                "FORWARDER_MANAGEMENT_PORT": str(self.management_port),
                "FORWARDER_HTTP_HOST": "127.0.0.1",
            }
        )
        self.env.update(env)
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def start(self) -> Forwarder:
        """Start the process (does not wait for readiness)."""
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "forwarder.cli", "serve"],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def ready(self) -> bool:
        """True when /readyz answers 200."""
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 60) -> Forwarder:
        """Block until ready; fail with the log tail if the process died or took too long."""

        def check() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"forwarder exited {self.process.returncode}:\n{self.tail()}")
            return self.ready()

        try:
            wait_until(check, timeout, "forwarder readiness")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None
        return self

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send a signal to the process."""
        assert self.process is not None
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float = 60) -> int:
        """Wait for the process to end; return its exit status."""
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL if it hangs); safe to call twice. Fails the test if the
        process let an exception go unhandled (a task that died, a bug caught as internal)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.http.close()
        unhandled = self.unhandled()
        assert not unhandled, f"{self.log_path.name}: unhandled exceptions: {unhandled[:3]}"

    def unhandled(self) -> list[dict[str, Any]]:
        """Log records of exceptions nothing handled (they are also counted by the service)."""
        if not self.log_path.exists():
            return []
        names = {"task_failed", "job_internal_error", "batch_internal_error"}
        return [
            r
            for r in self.logs()
            if r.get("event") in names or "never retrieved" in str(r.get("raw", ""))
        ]

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (non-JSON lines are kept as {'raw': ...})."""
        out = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                out.append({"raw": raw})
        return out

    def tail(self, lines: int = 40) -> str:
        """The last lines of the log, for failure messages."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def events(self, name: str) -> list[dict[str, Any]]:
        """Log records whose ``event`` is ``name``."""
        return [r for r in self.logs() if r.get("event") == name]

    def webhook(
        self,
        body: bytes,
        *,
        secret: str = WEBHOOK_SECRET,
        timestamp: int | None = None,
        header: str | None = None,
    ) -> httpx.Response:
        """POST a webhook signed like Datagrid does (or with an explicit header)."""
        t = int(time.time()) if timestamp is None else timestamp
        if header is None:
            header = f"t={t},v1={sign(secret.encode(), t, body)}"
        return self.http.post(
            "/webhooks/datagrid",
            content=body,
            headers={"Datagrid-Signature": header, "Content-Type": "application/json"},
        )

    def queue(self, batch_id: str, replay: bool = False) -> httpx.Response:
        """POST /v1/batches with the test token."""
        return self.http.post(
            "/v1/batches",
            json={"batch_id": batch_id, "replay": replay},
            headers={"Authorization": f"Bearer {API_TOKEN}"},
        )

    def state(self, batch_id: str) -> dict[str, Any] | None:
        """GET /v1/batches/{id}, or None while unknown."""
        response = self.http.get(
            f"/v1/batches/{batch_id}", headers={"Authorization": f"Bearer {API_TOKEN}"}
        )
        return response.json() if response.status_code == 200 else None


def event_body(
    batch_id: str, event_id: str, event_type: str = "batch_prediction.completed"
) -> bytes:
    """A compact webhook envelope like Datagrid's."""
    return json.dumps(
        {
            "id": event_id,
            "event_type": event_type,
            "timestamp": int(time.time()),
            "data": {
                "object": "batch_prediction",
                "id": batch_id,
                "status": event_type.split(".")[-1],
            },
        },
        separators=(",", ":"),
    ).encode()


def start(forwarders: list[Forwarder], settings: Settings, log_dir: Path, **env: str) -> Forwarder:
    """Start one more ``forwarder serve`` (its own ports and log) and keep it in ``forwarders``
    (the conftest fixture of that name stops them all)."""
    fwd = Forwarder(settings, log_dir, name=f"fwd{len(forwarders)}", **env).start()
    forwarders.append(fwd)
    return fwd
