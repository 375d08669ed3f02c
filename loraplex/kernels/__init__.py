"""C kernels for the CPU, built at first use as CPython extension modules.

Each ``*.c`` file here is one module; the ``*.h`` files hold what they share. ``load`` compiles
it once per machine with the system's C compiler (``-O3 -march=native``, OpenMP, this
Python's headers) into ``$LORAPLEX_HOME/native/`` under a name that hashes the sources, the
flags, the Python ABI and the CPU's features, written atomically, so concurrent first
starts and a changed kernel never load a stale or half-written library. Without a compiler
or Python's headers, ``load`` logs why and returns None, and the caller runs torch instead.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

from loraplex.models.registry import loraplex_home

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
# -fopenmp: the kernels share their work among the OpenMP threads torch already runs
# (PyPI's torch ships libgomp.so.1 and loads it first: the kernels bind to that same
# runtime, so one thread pool serves both).
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fPIC", "-shared", "-fno-math-errno",
         "-fopenmp"]


def cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        include = sysconfig.get_paths()["include"]
        subprocess.run([compiler, *FLAGS, f"-I{include}", str(source), "-o", tmp], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(name: str, module: str, switch_env: str) -> ModuleType | None:
    """The module built from ``kernels/<name>.c`` (its ``PyInit_<module>``), or None where
    it cannot be built (logged) or where the environment variable ``switch_env`` is "0"."""
    if os.environ.get(switch_env, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.system() == "Windows":
        log.warning("no C compiler found: the %s kernel is off (torch runs instead)", name)
        return None
    source = HERE / f"{name}.c"
    headers = [h.read_text() for h in sorted(HERE.glob("*.h"))]
    key = hashlib.sha256("\n".join([source.read_text(), *headers, compiler,
                                    " ".join(FLAGS), sysconfig.get_config_var("EXT_SUFFIX") or "",
                                    sys.version, platform.machine(), cpu_features()]).encode())
    target = loraplex_home() / "native" / f"{name}-{key.hexdigest()[:16]}.so"
    try:
        if not target.is_file():
            _build(compiler, source, target)
        spec = importlib.util.spec_from_file_location(module, target)
        if spec is None or spec.loader is None:
            raise OSError(f"{target} is not loadable as an extension module")
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
    except (OSError, ImportError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("could not build the %s kernel (%s): torch runs instead", name, detail)
        return None
    return loaded
