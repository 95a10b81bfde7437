"""One single-node KRaft broker process: format once, start detached, wait until ready, stop."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from kafkarig.acls import Acl, create_acls
from kafkarig.jars import fetch
from kafkarig.layout import LOG4J_CONFIG, cache_dir, jars_dir, log
from kafkarig.net import HOST, free_ports, port_in_use
from kafkarig.oauth import OAuthListener
from kafkarig.properties import NODE_ID, server_properties
from kafkarig.protocol import probe_metadata
from kafkarig.security import Security

DEFAULT_PORT = 9092

# Kafka's own defaults from bin/kafka-run-class.sh, with the heap capped: the machine is small and
# several brokers (the shared one plus private ones of fault-injection tests) may run at once.
# ExitOnOutOfMemoryError: a broker that dies loudly is easier to diagnose than one that limps on.
JVM_OPTS = [
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]


class BrokerError(RuntimeError):
    """The broker could not be started, or did not become ready in time."""


class Broker:
    """One single-node KRaft broker on 127.0.0.1, with its data in ``data_dir``.

    The data dir outlives the process: stop/kill and start again and topics, records, committed
    offsets and transaction state are all still there. The ports are recorded in the data dir at
    first start, because the controller's address is written into the formatted metadata log.
    """

    def __init__(
        self,
        port: int = DEFAULT_PORT,
        data_dir: str | os.PathLike[str] | None = None,
        controller_port: int | None = None,
        extra_properties: dict[str, str] | None = None,
        jvm_opts: list[str] | None = None,
        security: Security | None = None,
        oauth: OAuthListener | None = None,
    ) -> None:
        self.port = port
        self.security = security
        self.oauth = oauth
        self.controller_port = controller_port if controller_port is not None else port + 1
        if data_dir is None:
            data_dir = cache_dir() / f"data-{port}"
        self.data_dir = Path(data_dir).resolve()
        self.extra_properties = dict(extra_properties or {})
        self.jvm_opts = list(jvm_opts if jvm_opts is not None else JVM_OPTS)
        self._proc: subprocess.Popen[bytes] | None = None  # set when this process started it

    @classmethod
    def on_free_ports(
        cls,
        data_dir: str | os.PathLike[str],
        extra_properties: dict[str, str] | None = None,
        jvm_opts: list[str] | None = None,
        *,
        secured: bool = False,
        scram_users: Mapping[str, str] | None = None,
        oauth_jwks_url: str | None = None,
        oauth_issuer: str = "",
        oauth_audience: str = "kafka",
    ) -> Broker:
        """A broker on free ports, for a test's private broker beside the shared one.

        ``secured=True`` adds the SASL_SSL and SSL listeners with ACLs on (see ``security``),
        their certificates made in ``<data_dir>/tls``, and the SCRAM users ``scram_users``
        (default: ``admin`` and ``forwarder``; each also gets a client certificate).
        ``oauth_jwks_url`` adds the OAUTHBEARER listener (see ``oauth``), taking JWTs signed by
        that JWKS's keys, issued by ``oauth_issuer`` for ``oauth_audience``.
        """
        port, controller_port, sasl_ssl_port, ssl_port, oauth_port = free_ports(5)
        security = None
        if secured:
            security = Security.create(
                sasl_ssl_port, ssl_port, Path(data_dir).resolve() / "tls", scram_users
            )
        oauth = None
        if oauth_jwks_url is not None:
            if not oauth_issuer:  # Kafka 4.x's BrokerJwtValidator does not start without one
                raise BrokerError("an OAuth listener needs oauth_issuer (the tokens' iss)")
            oauth = OAuthListener(oauth_port, oauth_jwks_url, oauth_issuer, oauth_audience)
        return cls(port, data_dir, controller_port, extra_properties, jvm_opts, security, oauth)

    # paths
    @property
    def bootstrap(self) -> str:
        """The PLAINTEXT listener (a super user's door when the broker is secured)."""
        return f"{HOST}:{self.port}"

    @property
    def sasl_ssl_bootstrap(self) -> str:
        """The SASL_SSL (SCRAM-SHA-512) listener of a secured broker."""
        return f"{HOST}:{self._secured().sasl_ssl_port}"

    @property
    def ssl_bootstrap(self) -> str:
        """The SSL listener of a secured broker (client certificates required)."""
        return f"{HOST}:{self._secured().ssl_port}"

    @property
    def oauth_bootstrap(self) -> str:
        """The SASL_PLAINTEXT (OAUTHBEARER) listener of a broker started with ``oauth``."""
        if self.oauth is None:
            raise BrokerError(f"{self!r} was not started with an OAuth listener")
        return f"{HOST}:{self.oauth.port}"

    def create_acls(self, acls: list[Acl]) -> None:
        """Create ALLOW ``acls`` as the super user (through the PLAINTEXT listener)."""
        self._secured()
        create_acls(HOST, self.port, acls)

    def _secured(self) -> Security:
        if self.security is None:
            raise BrokerError(f"{self!r} was not started with secured listeners")
        return self.security

    @property
    def properties_file(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log_dirs(self) -> Path:
        return self.data_dir / "kraft"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def out_file(self) -> Path:
        return self.data_dir / "broker.out"

    @property
    def server_log(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    def __repr__(self) -> str:
        return f"Broker({self.bootstrap}, data_dir={str(self.data_dir)!r}, pid={self.pid})"

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # configuration
    def properties(self) -> dict[str, str]:
        """server.properties: the rig's settings (``properties.py``), then ``extra_properties``."""
        props = server_properties(
            self.port, self.controller_port, self.log_dirs, self.security, self.oauth
        )
        props.update(self.extra_properties)
        return props

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        rig = self.data_dir / "rig.json"
        ports = {"port": self.port, "controller_port": self.controller_port}
        if self.security is not None:
            ports |= self.security.ports()
        if self.oauth is not None:
            ports |= self.oauth.ports()
        if rig.is_file():
            recorded = json.loads(rig.read_text())
            if recorded != ports:
                raise BrokerError(
                    f"{self.data_dir} was formatted for ports {recorded}, not {ports}; "
                    "use the same ports or another data dir"
                )
        rig.write_text(json.dumps(ports) + "\n")
        lines = ["# Written by deploy/kafka/rig.py on every start; edits are overwritten."]
        lines += [f"{k}={v}" for k, v in self.properties().items()]
        self.properties_file.write_text("\n".join(lines) + "\n")

    def _java(self, main: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise BrokerError("java is not on PATH; Kafka needs Java 17+")
        return [
            java,
            *self.jvm_opts,
            *(self.oauth.jvm_opts() if self.oauth is not None else []),
            f"-Dkafka.logs.dir={self.data_dir / 'logs'}",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp",
            str(jars_dir() / "*"),
            main,
            *args,
        ]

    def cluster_id(self) -> str | None:
        """The cluster id written by ``format``, or None if the data dir is not formatted yet."""
        meta = self.log_dirs / "meta.properties"
        if not meta.is_file():
            return None
        match = re.search(r"^cluster\.id=(\S+)", meta.read_text(), re.M)
        return match.group(1) if match else None

    def _format(self) -> None:
        if self.cluster_id() is not None:
            return  # formatted before: keep the data
        # A Kafka Uuid is 16 random bytes in URL-safe base64 without padding.
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # --standalone makes this node the sole voter of a dynamic (KIP-853) controller quorum.
        cmd = self._java(
            "kafka.tools.StorageTool",
            "format",
            "--config",
            str(self.properties_file),
            # "=" form: a random id may start with "-", which argparse would take for an option.
            f"--cluster-id={cluster_id}",
            "--standalone",
            *(self.security.format_args() if self.security is not None else []),
        )
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BrokerError(f"formatting {self.log_dirs} failed:\n{proc.stdout}{proc.stderr}")

    # process state
    @property
    def pid(self) -> int | None:
        """Pid of this data dir's broker if it is running (whoever started it), else None."""
        if self._proc is not None:
            # We started it: trust Popen (right after the fork /proc still shows Python's
            # cmdline, before exec turns the child into java).
            if self._proc.poll() is None:
                return self._proc.pid
            self._proc = None  # it exited (and poll() reaped it)
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return None
        # Guard against pid reuse: it must be a broker started on this very properties file.
        if b"kafka.Kafka" not in cmdline or str(self.properties_file).encode() not in cmdline:
            return None
        return None if state == "Z" else pid

    def is_running(self) -> bool:
        return self.pid is not None

    def is_ready(self) -> bool:
        """True when the broker serves Metadata for this cluster and lists itself as live."""
        try:
            cluster_id, brokers = probe_metadata(HOST, self.port)
        except (OSError, struct.error, ConnectionError):
            return False
        # Matching the cluster id makes sure we are not talking to some other broker that
        # happens to hold the port.
        return cluster_id == self.cluster_id() and NODE_ID in brokers

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of broker.out and server.log, for error messages."""
        parts = []
        for path in (self.out_file, self.server_log):
            if path.is_file():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts) or "(no broker logs yet)"

    # lifecycle
    def start(self, wait: float = 60.0) -> Broker:
        """Start the broker detached and wait up to ``wait`` seconds until it is ready.

        A no-op (apart from the wait) if it is already running on this data dir. Fetches the jars
        and formats the storage first when needed.
        """
        if self.is_running():
            if wait:
                self.wait_ready(wait)
            return self
        ports = [self.port, self.controller_port]
        if self.security is not None:
            ports += self.security.ports().values()
        if self.oauth is not None:
            ports += self.oauth.ports().values()
        for port in ports:
            if port_in_use(port):
                raise BrokerError(f"port {port} on {HOST} is already in use by another process")
        fetch()
        self._write_config()
        self._format()
        (self.data_dir / "logs").mkdir(exist_ok=True)
        with open(self.out_file, "ab") as out:
            # Own session/process group: the broker outlives the CLI that started it, and a
            # Ctrl-C in the starting terminal does not reach it.
            self._proc = subprocess.Popen(
                self._java("kafka.Kafka", str(self.properties_file)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        if wait:
            try:
                self.wait_ready(wait)
            except BrokerError:
                self.kill()  # do not leave a half-started JVM behind (in CI nobody would stop it)
                raise
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until ``is_ready()``; raise BrokerError with the log tail on death or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                raise BrokerError(f"broker on {self.bootstrap} is not running\n{self.log_tail()}")
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"broker on {self.bootstrap} not ready after {timeout:.0f}s\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def _signal(self, sig: int) -> int | None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pid

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.1)  # reaps it if we are its parent
            if not self.is_running():
                return True
            time.sleep(0.1)
        return not self.is_running()

    def stop(self, timeout: float = 20.0) -> None:
        """Graceful shutdown (SIGTERM); SIGKILL if it has not exited after ``timeout`` s."""
        self._signal(signal.SIGCONT)  # a paused broker cannot handle SIGTERM
        if self._signal(signal.SIGTERM) is None:
            self.pid_file.unlink(missing_ok=True)
            return
        if not self._wait_exit(timeout):
            log(f"broker on {self.bootstrap} ignored SIGTERM for {timeout:.0f}s; killing it")
            self.kill()
        self.pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """Crash the broker (SIGKILL): no controlled shutdown, unflushed data left to recovery."""
        if self._signal(signal.SIGKILL) is not None:
            self._wait_exit(10.0)
        self.pid_file.unlink(missing_ok=True)

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): sockets stay open but nothing answers, like a hung node."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause()``."""
        self._signal(signal.SIGCONT)
