"""Wheel build hook (hatchling's ``custom`` hook): compiles ``forwarder/hotpath.py`` with mypyc.

Only regular wheel builds compile (the image's ``uv sync --no-editable``, ``uv build``); an editable
install (``uv sync``, every developer's tree) imports the source, so no compiled module can ever
sit beside an edited ``hotpath.py`` and shadow it. Compilation happens in a temporary copy, never
in the tree, and the wheel gets the two extension modules mypyc makes (the module and its
``hotpath__mypyc`` runtime) next to the source, which Python imports only when they are absent.

A build without a C compiler or Python's headers fails, saying so;
``DATAGRID_FORWARDER_PURE_PYTHON=1`` builds a pure-Python wheel instead (the source is the
fallback; not a ``FORWARDER_*`` name, which the service would refuse as unknown). ``make hotpath``
builds a wheel this way, keeps its compiled modules under ``.cache/hotpath/`` (outside the
package) and runs ``tests/unit/test_hotpath.py``, which compares them with the source.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: The modules compiled, relative to the project root (each stays in the wheel as its fallback).
COMPILED = ("forwarder/hotpath.py",)
#: Set to 1, a pure-Python wheel (for a platform without a C compiler).
PURE_PYTHON = "DATAGRID_FORWARDER_PURE_PYTHON"

# Runs in a subprocess (setuptools and mypyc keep global state): mypyc turns the staged modules
# into C, setuptools compiles them into --build-lib.
_COMPILE = """
import sys
from mypyc.build import mypycify
from setuptools import setup

out, temp, *modules = sys.argv[1:]
setup(
    name="forwarder-hotpath",
    ext_modules=mypycify(["--strict", *modules], opt_level="3", target_dir=temp + "/c"),
    script_args=["build_ext", "--build-lib", out, "--build-temp", temp + "/o", "--quiet"],
)
"""


def compile_modules(root: Path, work: Path) -> list[Path]:
    """Compile :data:`COMPILED` from ``root`` with mypyc in ``work``; the extension modules made,
    under ``work/out`` at their paths in the package (``forwarder/hotpath.cpython-...so``)."""
    stage, out, temp = work / "stage", work / "out", work / "temp"
    for module in COMPILED:
        (stage / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / module, stage / module)
        # An empty package marker: mypyc names the module forwarder.hotpath, and type-checks
        # nothing else of the package (the module imports only the standard library).
        (stage / module).parent.joinpath("__init__.py").touch()
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE, str(out), str(temp), *COMPILED],
        cwd=stage,
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode:
        raise RuntimeError(
            f"mypyc could not compile {', '.join(COMPILED)}:\n{_advice()}{run.stdout}{run.stderr}"
        )
    return sorted(path for path in out.rglob("*") if path.suffix in (".so", ".pyd"))


def _advice() -> str:
    """What a failed compile most likely lacks (a C compiler, Python's headers)."""
    hints = []
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if not headers.exists():
        hints.append(f"Python's headers are missing ({headers}: Debian's python3-dev)")
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        hints.append(f"no C compiler ({compiler}: Debian's gcc)")
    hints.append(f"{PURE_PYTHON}=1 builds a pure-Python wheel instead")
    return "".join(f"  - {hint}\n" for hint in hints)


class MypycHook(BuildHookInterface):  # type: ignore[misc]
    """Adds the compiled hot path to regular wheels (see the module's docstring)."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Compile into a temporary directory and add the extension modules to the wheel."""
        if self.target_name != "wheel" or version == "editable":
            return
        if os.environ.get(PURE_PYTHON) == "1":
            self.app.display_warning(f"{PURE_PYTHON}=1: the hot path is not compiled")
            return
        self._work = Path(tempfile.mkdtemp(prefix="forwarder-mypyc-"))
        out = self._work / "out"
        try:
            built = compile_modules(Path(self.root), self._work)
        except BaseException:
            shutil.rmtree(self._work, ignore_errors=True)  # finalize() is not called
            raise
        for path in built:
            build_data["force_include"][str(path)] = path.relative_to(out).as_posix()
        # A platform wheel (cp311-cp311-linux_x86_64), not py3-none-any.
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        """The wheel is written: remove the temporary build."""
        work = getattr(self, "_work", None)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
