"""Process control: run a contender (or a pipeline of them) and measure wall, CPU and peak RSS.

Every figure comes from the kernel: ``wait4()`` gives a finished child's own CPU and ``ru_maxrss``
(not its whole family's), ``/proc/<pid>/stat`` and ``VmHWM`` those of a live process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
OUT = REPO / "bench" / "out"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchFailure(RuntimeError):
    """A run did not produce exactly the expected records (or did not run at all)."""


def log(message: str) -> None:
    """Progress on stderr (stdout carries the report)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def forwarder_command() -> list[str]:
    """The ``forwarder`` console script of this interpreter's environment."""
    script = Path(PY).parent / "forwarder"
    return [str(script)] if script.exists() else [PY, "-m", "forwarder.cli"]


def proc_cpu(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process (``/proc/<pid>/stat``)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_hwm_kb(pid: int) -> int:
    """Peak RSS so far of a live process (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@dataclass
class Exited:
    """A finished process: exit code, wall time, CPU and peak RSS from ``wait4``."""

    code: int
    wall_s: float
    cpu_s: float
    rss_kb: int
    stdout: str
    stderr: str


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, Any]:
    """``wait4`` one child (its own rusage, not the whole family's), killing it after timeout."""
    timer = threading.Timer(timeout, lambda: _kill(proc.pid))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def measure(
    commands: Sequence[Sequence[str]], env: dict[str, str], cwd: Path, timeout: float = 600
) -> Exited:
    """Run a pipeline of commands (usually one); CPU and peak RSS are summed over its processes."""
    with tempfile.TemporaryDirectory() as tmp:
        logs = [(Path(tmp, f"{i}.out"), Path(tmp, f"{i}.err")) for i in range(len(commands))]
        with contextlib.ExitStack() as stack:
            procs: list[subprocess.Popen[bytes]] = []
            started = time.perf_counter()
            previous: Any = subprocess.DEVNULL
            for index, (command, (out, err)) in enumerate(zip(commands, logs, strict=True)):
                last = index == len(commands) - 1
                proc = subprocess.Popen(
                    command,
                    stdin=previous,
                    stdout=stack.enter_context(out.open("wb")) if last else subprocess.PIPE,
                    stderr=stack.enter_context(err.open("wb")),
                    env=env,
                    cwd=cwd,
                )
                if previous is not subprocess.DEVNULL:
                    previous.close()  # the next process owns the read end now
                previous = proc.stdout
                procs.append(proc)
            code, cpu, rss = 0, 0.0, 0
            for proc in procs:
                rc, usage = _reap(proc, timeout)
                code = code or rc
                cpu += usage.ru_utime + usage.ru_stime
                rss += usage.ru_maxrss
            wall = time.perf_counter() - started
        stdout = logs[-1][0].read_text(errors="replace")
        stderr = "".join(err.read_text(errors="replace") for _, err in logs)
    return Exited(code, wall, cpu, rss, stdout, stderr)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 40) -> None:
    """SIGTERM (the service drains), then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Run:
    """One measured (or warm-up) run of one contender."""

    contender: str
    lines: int
    body_bytes: int
    wall_s: float
    cpu_s: float
    rss_kb: int
    warmup: bool
    fake_cpu_s: float = 0.0
    broker_cpu_s: float | None = None
    load: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def lines_per_s(self) -> float:
        """Lines forwarded per second of wall time."""
        return self.lines / self.wall_s

    @property
    def mb_per_s(self) -> float:
        """HTTP body megabytes (10^6) per second of wall time."""
        return self.body_bytes / self.wall_s / 1e6

    @property
    def cpu_per_m(self) -> float:
        """The contender's CPU seconds per million lines."""
        return self.cpu_s / self.lines * 1e6
