#!/usr/bin/env python3
"""A real, single-node Apache Kafka broker for development and tests, without Docker.

The broker jars come from Maven Central (the pom.xml beside this file), so all this needs is
Java 17+ and Maven. The node runs in KRaft combined mode (broker + controller, node.id=1) and
listens on 127.0.0.1 only.

CLI (stdout carries only the bootstrap address, so ``BOOT=$(python deploy/kafka/rig.py start)``
works; progress and errors go to stderr)::

    python deploy/kafka/rig.py fetch
    python deploy/kafka/rig.py start [--port 9092] [--controller-port N] [--data-dir DIR]
                                     [--wait 60]
    python deploy/kafka/rig.py status [--port 9092] [--data-dir DIR]
    python deploy/kafka/rig.py stop [--port 9092] [--data-dir DIR]

Python API (for tests that need a private broker to stop, kill or freeze mid-test)::

    broker = Broker.on_free_ports(tmp_path / "kafka")   # or Broker(port, data_dir, controller_port)
    broker.start()                     # fetches jars if needed, formats once, waits until ready
    broker.bootstrap                   # "127.0.0.1:<port>"
    broker.kill(); broker.start()      # crash and restart on the same data: records persist
    broker.pause(); broker.resume()    # SIGSTOP/SIGCONT: a hung broker, its sockets still open
    broker.stop()

Layout: ``$KAFKA_RIG_CACHE`` (default ``<repo>/.cache/kafka``) holds ``jars/`` and the default data
dirs ``data-<port>/``. A data dir holds ``server.properties``, ``kraft/`` (the Kafka log dirs),
``logs/server.log`` (log4j), ``broker.out`` (JVM stdout/stderr), ``broker.pid`` and ``rig.json``.

Standard library only (Python 3.11+), so it runs before the project's venv exists.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
POM = HERE / "pom.xml"
LOG4J_CONFIG = HERE / "log4j2.yaml"

DEFAULT_PORT = 9092
NODE_ID = 1
HOST = "127.0.0.1"

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


def cache_dir() -> Path:
    """Where the rig keeps jars and data: ``$KAFKA_RIG_CACHE``, else ``<repo>/.cache/kafka``."""
    return Path(os.environ.get("KAFKA_RIG_CACHE") or REPO / ".cache" / "kafka").resolve()


def jars_dir() -> Path:
    return cache_dir() / "jars"


def kafka_version() -> str:
    """The Kafka version pinned in pom.xml (the single place it is written down)."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if not match:
        raise RuntimeError(f"no <kafka.version> in {POM}")
    return match.group(1).strip()


def _marker_text() -> str:
    # The pom's hash is in the marker so that any edit of pom.xml (a version bump, a new
    # dependency) makes the next fetch download again instead of trusting a stale jars dir.
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    return f"kafka_version={kafka_version()}\npom_sha256={digest}\n"


def _log(msg: str) -> None:
    print(f"kafka-rig: {msg}", file=sys.stderr, flush=True)


def fetch(force: bool = False) -> Path:
    """Download the broker jars with Maven into ``jars_dir()``, unless already complete.

    Maven copies into a temporary directory that is renamed into place only on success, and the
    marker is written last, so an interrupted fetch never looks complete. A file lock makes
    concurrent callers (parallel test workers, CI steps) wait for one download instead of racing.
    """
    target = jars_dir()
    marker = target / ".complete"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and marker.is_file() and marker.read_text() == _marker_text():
            return target
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError("Maven (mvn) is not on PATH; it is needed to fetch the Kafka jars")
        tmp = target.parent / "jars.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _log(f"fetching Kafka {kafka_version()} jars with Maven into {target}")
        started = time.monotonic()
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
        ]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                f"{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
            )
        # Never leave two versions of a jar side by side: the classpath is a plain '*'.
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        marker.write_text(_marker_text())
        _log(f"fetched {len(list(target.glob('*.jar')))} jars in {time.monotonic() - started:.1f}s")
        return target


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that are free right now (for private brokers)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:  # all bound at once, so the kernel cannot hand out one port twice
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    return free_ports(1)[0]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((HOST, port)) == 0


# --- a tiny Kafka protocol client, just enough for the readiness check -------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
    return bytes(buf)


def probe_metadata(host: str, port: int, timeout: float = 2.0) -> tuple[str | None, list[int]]:
    """Send a Kafka Metadata request and return ``(cluster_id, ids of live brokers)``.

    Metadata v4 is used because Kafka 4.0 removed v0-v3 (KIP-896) and 3.x still has v4. No topics
    are asked for, so the answer is small. A KRaft broker lists itself only once it is unfenced,
    i.e. registered with the controller and caught up with the metadata log: that, not an open
    port, is what "ready" means here.
    """
    client_id = b"kafka-rig"
    # Request header v1: api_key=3 (Metadata), api_version=4, correlation_id, client_id.
    header = struct.pack(">hhih", 3, 4, 1, len(client_id)) + client_id
    # Body v4: topics=[] (empty; null would mean all topics), allow_auto_topic_creation=false.
    body = struct.pack(">ib", 0, 0)
    request = header + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        data = _recv_exact(sock, size)

    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        value: int = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def take_string() -> str | None:
        nonlocal pos
        length = take(">h")
        if length < 0:
            return None
        value = data[pos : pos + length].decode()
        pos += length
        return value

    if take(">i") != 1:
        raise ConnectionError("unexpected correlation id in Metadata response")
    take(">i")  # throttle_time_ms
    brokers = []
    for _ in range(take(">i")):
        brokers.append(take(">i"))  # node_id
        take_string()  # host
        take(">i")  # port
        take_string()  # rack
    cluster_id = take_string()
    return cluster_id, brokers


# --- the broker --------------------------------------------------------------------------------


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
    ) -> None:
        self.port = port
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
    ) -> Broker:
        """A broker on two free ports, for a test's private broker beside the shared one."""
        port, controller_port = free_ports(2)
        return cls(port, data_dir, controller_port, extra_properties, jvm_opts)

    # paths
    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

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
        """server.properties for a fast, reliable single dev node (see comments for the why)."""
        props = {
            "process.roles": "broker,controller",
            "node.id": str(NODE_ID),
            "controller.quorum.bootstrap.servers": f"{HOST}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.log_dirs),
            # Topics are created explicitly (as the forwarder does in production); a typo in a
            # topic name must fail, not silently create a new topic.
            "auto.create.topics.enable": "false",
            "num.partitions": "3",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            # One node: internal topics must not ask for 3 replicas, or groups and transactions
            # never work. Fewer partitions than the default 50 make their creation quick.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "5",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "5",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Consumer groups in tests should not idle 3 s waiting for more members to join.
            "group.initial.rebalance.delay.ms": "0",
            # Small segments so compaction and retention have something to act on in a test;
            # a small cleaner buffer (default 128 MiB) so it fits in the capped heap.
            "log.segment.bytes": str(16 * 1024 * 1024),
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            # Two cores: a handful of threads is plenty and starts faster.
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "background.threads": "4",
        }
        props.update(self.extra_properties)
        return props

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        rig = self.data_dir / "rig.json"
        ports = {"port": self.port, "controller_port": self.controller_port}
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
        for port in (self.port, self.controller_port):
            if _port_in_use(port):
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
            _log(f"broker on {self.bootstrap} ignored SIGTERM for {timeout:.0f}s; killing it")
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


# --- CLI ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rig.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download the broker jars (skipped when complete)")
    p_fetch.add_argument("--force", action="store_true", help="download again even if complete")
    for name, text in (
        ("start", "start the broker and wait until it is ready"),
        ("stop", "stop the broker (SIGTERM, then SIGKILL after 20 s)"),
        ("status", "say whether the broker runs and answers (exit 0 if ready)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--port", type=int, default=DEFAULT_PORT)
        p.add_argument("--controller-port", type=int, default=None, help="default: port + 1")
        p.add_argument("--data-dir", default=None, help="default: $KAFKA_RIG_CACHE/data-<port>")
        if name == "start":
            p.add_argument(
                "--wait",
                type=float,
                default=60.0,
                help="seconds to wait for readiness (0: do not wait)",
            )
    args = parser.parse_args(argv)

    try:
        if args.command == "fetch":
            print(fetch(force=args.force))
            return 0
        broker = Broker(args.port, args.data_dir, args.controller_port)
        if args.command == "start":
            was_running = broker.is_running()
            started = time.monotonic()
            broker.start(wait=args.wait)
            took = time.monotonic() - started
            state = "already running" if was_running else f"started in {took:.1f}s"
            _log(f"Kafka {kafka_version()} {state}, pid {broker.pid}, data {broker.data_dir}")
            print(broker.bootstrap)
        elif args.command == "stop":
            pid = broker.pid
            broker.stop()
            _log(f"stopped pid {pid}" if pid else "not running")
        elif args.command == "status":
            pid = broker.pid
            if pid is None:
                print(f"stopped (data {broker.data_dir})")
                return 1
            ready = broker.is_ready()
            print(
                f"{'ready' if ready else 'running, not ready'}: pid {pid}, "
                f"bootstrap {broker.bootstrap}, data {broker.data_dir}"
            )
            return 0 if ready else 1
    except (BrokerError, RuntimeError) as exc:
        _log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
