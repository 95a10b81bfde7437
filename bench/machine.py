"""What the machine is, and how busy the rest of it was while a figure was measured.

The benchmark shares 2 cores with whatever else runs (other engineers' builds and test suites).
``LoadWindow`` says, for one run, how many cores *other* processes kept busy: the machine's busy
time from ``/proc/stat`` minus the CPU of the processes the run accounts for (the contender, the
fake Datagrid, the broker and this harness), and which other commands used the most.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.harness import CLK_TCK, REPO


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores, idle and iowait excluded)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _processes() -> dict[int, tuple[str, float]]:
    """pid -> (command name, CPU seconds so far) for every live process."""
    out: dict[int, tuple[str, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            raw = Path(entry.path, "stat").read_text()
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
            fields = raw.rsplit(")", 1)[1].split()
            out[int(entry.name)] = (comm, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LoadWindow:
    """Machine load over one measured window (start at construction, read with :meth:`close`)."""

    def __init__(self) -> None:
        self.load_start = os.getloadavg()[0]
        self._busy = _busy_seconds()
        self._self = _self_cpu()
        self._procs = _processes()
        self._t = time.monotonic()

    def close(self, accounted_cpu_s: float, our_pids: set[int]) -> dict[str, Any]:
        """The load figures; ``accounted_cpu_s`` is the CPU the run itself reports (all parts)."""
        wall = max(time.monotonic() - self._t, 1e-9)
        busy = _busy_seconds() - self._busy
        mine = _self_cpu() - self._self
        others = max(busy - accounted_cpu_s - mine, 0.0)
        by_name: dict[str, float] = {}
        for pid, (comm, cpu) in _processes().items():
            if pid in our_pids or pid == os.getpid():
                continue
            before = self._procs.get(pid)
            used = cpu - before[1] if before and before[0] == comm else cpu
            if used > 0:
                by_name[comm] = by_name.get(comm, 0.0) + used
        ranked = sorted(by_name.items(), key=lambda item: -item[1])[:3]
        top = [f"{name} {cpu / wall:.2f}" for name, cpu in ranked if cpu / wall >= 0.01]
        return {
            "load1_start": round(self.load_start, 2),
            "load1_end": round(os.getloadavg()[0], 2),
            "machine_busy_cores": round(busy / wall, 2),
            "others_cores": round(others / wall, 2),
            "others_top": top,
        }


def describe() -> dict[str, Any]:
    """Hardware, software versions and the revision, for the JSON and the report's footer."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    versions: dict[str, str] = {}
    for module in ("aiokafka", "httpx", "msgspec"):
        with contextlib.suppress(Exception):
            versions[module] = __import__(module).__version__
    with contextlib.suppress(Exception):
        import confluent_kafka

        versions["confluent_kafka"] = importlib.metadata.version("confluent-kafka")
        versions["librdkafka (confluent-kafka)"] = confluent_kafka.libversion()[0]
    kcat = ""
    with contextlib.suppress(Exception):
        version = subprocess.run(["kcat", "-V"], capture_output=True, text=True).stdout
        # "Version 1.7.1 (JSON, ..., librdkafka 2.0.2 builtin.features=...)"
        kcat = next(line for line in version.splitlines() if line.startswith("Version "))
        kcat = kcat.split(" builtin.features", 1)[0]
    jq = ""
    with contextlib.suppress(Exception):
        jq = subprocess.run(["jq", "--version"], capture_output=True, text=True).stdout.strip()
    revision = ""
    with contextlib.suppress(Exception):
        revision = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    import rig  # deploy/kafka/rig.py, on sys.path through bench.testbed

    return {
        "revision": revision,
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "kafka": rig.kafka_version(),
        "kcat": kcat.strip(),
        "jq": jq,
        **versions,
    }
