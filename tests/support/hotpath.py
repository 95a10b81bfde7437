"""Both builds of ``forwarder.hotpath`` side by side, and a producer that keeps what it is given.

:func:`compiled_hotpath` is the mypyc-compiled module: the installed one when the package was
installed from a wheel, else one built here the way the wheel is (``uv build --wheel``, through
``hatch_build.py``), cached under ``.cache/hotpath/`` by the hash of its inputs and loaded beside
the source module without replacing it. :func:`pure_hotpath` is the source, always.
:class:`RecordingProducer` stands in for ``AIOKafkaProducer`` on the publisher's path: real
aiokafka record batches, read back record by record, and the dead letters sent one by one.
Used by ``tests/unit/test_hotpath.py`` and ``bench/hotpath.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

import forwarder.hotpath

REPO = Path(__file__).resolve().parents[2]
#: What the compiled module is built from: a change to any of them builds it again.
BUILD_INPUTS = ("forwarder/hotpath.py", "hatch_build.py", "pyproject.toml")
CACHE = REPO / ".cache" / "hotpath"


class NoCompiler(RuntimeError):
    """This machine cannot compile the hot path (no C compiler or no Python headers)."""


def is_compiled(module: ModuleType) -> bool:
    """Whether ``module`` is an extension module (mypyc's), not Python source."""
    return not str(module.__file__).endswith(".py")


def pure_hotpath() -> ModuleType:
    """``forwarder.hotpath`` from its source file, even where the compiled one is installed."""
    if not is_compiled(forwarder.hotpath):
        return forwarder.hotpath
    source = Path(str(forwarder.hotpath.__file__)).with_name("hotpath.py")
    loader = importlib.machinery.SourceFileLoader("forwarder.hotpath", str(source))
    return _load(loader)


def compiled_hotpath() -> ModuleType:
    """``forwarder.hotpath`` compiled with mypyc (installed, or built and cached here).

    Raises :class:`NoCompiler` when it cannot be built for want of a compiler or headers, and
    ``RuntimeError`` with the build's output when the build fails for any other reason.
    """
    if is_compiled(forwarder.hotpath):
        return forwarder.hotpath
    built = build_compiled()
    # The module's shim imports its runtime by name: load the runtime under that name first.
    runtime = next(built.glob("hotpath__mypyc.*"))
    name = "forwarder.hotpath__mypyc"
    if name not in sys.modules:
        loaded = _load(importlib.machinery.ExtensionFileLoader(name, str(runtime)))
        sys.modules[name] = loaded
    shim = next(p for p in built.glob("hotpath.*") if p != runtime)
    return _load(importlib.machinery.ExtensionFileLoader("forwarder.hotpath", str(shim)))


def build_compiled() -> Path:
    """The directory holding the compiled hot path's extension modules, built if not cached."""
    digest = hashlib.sha256()
    for name in BUILD_INPUTS:
        digest.update((REPO / name).read_bytes())
    digest.update(sys.version.encode())
    target = CACHE / digest.hexdigest()[:16]
    if target.is_dir():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        wheel = _build_wheel(Path(work))
        staged = Path(work) / "forwarder"
        staged.mkdir()
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith("forwarder/hotpath") and member.endswith((".so", ".pyd")):
                    (staged / Path(member).name).write_bytes(archive.read(member))
        if not any(staged.iterdir()):
            raise RuntimeError(f"{wheel.name} holds no compiled hot path")
        try:  # another session may have finished first: its copy is as good
            staged.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    return target


def _build_wheel(work: Path) -> Path:
    uv = REPO / ".cache" / "uv" / "bin" / "uv"
    command = [str(uv) if uv.exists() else shutil.which("uv") or "uv"]
    env = {**os.environ, "UV_PYTHON": sys.executable}
    env.pop("DATAGRID_FORWARDER_PURE_PYTHON", None)
    run = subprocess.run(
        [*command, "build", "--wheel", "--out-dir", str(work), str(REPO)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if run.returncode:
        missing = missing_toolchain()
        if missing:
            raise NoCompiler(f"cannot compile the hot path here: {missing}")
        raise RuntimeError(f"building the compiled hot path failed:\n{run.stdout}{run.stderr}")
    return next(work.glob("*.whl"))


def missing_toolchain() -> str | None:
    """What this machine lacks to compile an extension module, if anything."""
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler})"
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if not headers.exists():
        return f"no Python headers ({headers})"
    return None


def _load(loader: importlib.abc.Loader) -> ModuleType:
    """A module from ``loader``, leaving ``sys.modules`` and the package as they were (a mypyc
    module registers itself in both as it initialises)."""
    name = loader.name  # type: ignore[attr-defined]
    package, _, attribute = name.rpartition(".")
    before = sys.modules.get(name)
    parent = sys.modules[package]
    had = getattr(parent, attribute, None)
    try:
        spec = importlib.util.spec_from_loader(name, loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    finally:
        if before is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = before
        if had is None:
            with contextlib.suppress(AttributeError):
                delattr(parent, attribute)
        else:
            setattr(parent, attribute, had)
    return module


@dataclass
class Sent:
    """One record as Kafka would store it."""

    topic: str
    partition: int | None  # None: the producer's partitioner (dead letters)
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


@dataclass
class RecordingProducer:
    """``AIOKafkaProducer``'s batch and send calls, acknowledged at once, records kept in order.

    ``keep=False`` (the benchmark) counts records without reading the batches back.
    """

    batch_size: int = 16_384
    keep: bool = True
    sent: list[Sent] = field(default_factory=list)
    batches: int = 0

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_size, 0)

    async def send_batch(self, builder: BatchBuilder, topic: str, *, partition: int) -> Any:
        self.batches += 1
        if self.keep:
            for record in DefaultRecordBatch(bytes(builder._build())):
                self.sent.append(
                    Sent(topic, partition, record.key, record.value, tuple(record.headers))
                )
        return self._done()

    async def send(
        self, topic: str, value: bytes, key: bytes, *, headers: list[tuple[str, bytes]]
    ) -> Any:
        self.sent.append(Sent(topic, None, key, value, tuple(headers)))
        return self._done()

    @staticmethod
    def _done() -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future
