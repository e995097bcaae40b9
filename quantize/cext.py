"""Build, cache and load dbrxq's C kernels (quantize/csrc/qmatmul.c and fmoe.c, one library) with gcc + ctypes.

The C files have no torch headers, so it compiles in about a second at first use. The shared
library lands in ``$DBRXQ_CACHE`` (default ``~/.cache/dbrxq``) under a name keyed by a hash of
the source, the flags and the compiler's version, so an edited kernel rebuilds and concurrent
processes never see a half-written file (compile to a temp name, then rename).

No -march flags: the AVX2 functions carry ``target`` attributes inside the one build, and
:func:`cpu_path` picks the path from the CPU's flags at run time (override with
``DBRXQ_CPU_KERNEL=generic|avx2|avx512``). ``DBRXQ_DISABLE_CEXT=1`` pretends the build failed. When gcc
is missing or the build fails, :func:`load` logs once and returns None; callers fall back to the
torch backends.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from dbrxq.core.errors import QuantizationError
from dbrxq.core.files import cache_dir
from dbrxq.core.sysinfo import cpu_flags

log = logging.getLogger(__name__)

# qmatmul.c: the quantized kernels; fmoe.c: float experts (bf16/float32 weights) in one call per layer
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("qmatmul.c", "fmoe.c")]
FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp"]
PATHS = {"generic": 0, "avx2": 1, "avx512": 2}  # the `path` argument of dbrxq_matmul
# CPU flags (/proc/cpuinfo names) each path needs; "avx512" is AVX512F/BW/VL with VNNI (vpdpbusd).
PATH_FLAGS = {"generic": frozenset(), "avx2": frozenset({"avx2", "fma", "f16c"}),
              "avx512": frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"})}

_c_int, _c_i64, _vp = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p


def cpu_path() -> str:
    """The fastest kernel path the running CPU supports, or the one forced by DBRXQ_CPU_KERNEL."""
    forced = os.environ.get("DBRXQ_CPU_KERNEL")
    if forced:
        if forced not in PATHS:
            raise QuantizationError(f"DBRXQ_CPU_KERNEL={forced!r} is not a kernel path; use one of {sorted(PATHS)}")
        return forced
    return next(p for p in ("avx512", "avx2", "generic") if PATH_FLAGS[p] <= cpu_flags())


def runnable_paths() -> list[str]:
    """Every kernel path this CPU can run (tests compare them with each other)."""
    return [p for p in PATHS if PATH_FLAGS[p] <= cpu_flags()]


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc"))


def _build(cc: str) -> Path:
    src = b"".join(p.read_bytes() for p in SOURCES)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(src + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    out = cache_dir() / f"qmatmul-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed:\n{r.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built %s", out)
    return out


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (logged once) when it cannot be built or loaded."""
    if os.environ.get("DBRXQ_DISABLE_CEXT") == "1":
        log.warning("dbrxq C kernel disabled by DBRXQ_DISABLE_CEXT=1; using torch backends")
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler (gcc) found; dbrxq's cpu_q4/cpu_q8 kernels are unavailable")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except Exception as e:  # compiler errors, missing libgomp, read-only cache...
        log.warning("could not build dbrxq's C kernel, using torch backends: %s", e)
        return None
    lib.dbrxq_row_bytes.argtypes = [_c_int, _c_int, _c_int, _c_int]
    lib.dbrxq_row_bytes.restype = _c_i64
    lib.dbrxq_packed_bytes.argtypes = [_c_int, _c_int, _c_int, _c_int, _c_int]
    lib.dbrxq_packed_bytes.restype = _c_i64
    lib.dbrxq_layout_version.argtypes = []
    lib.dbrxq_layout_version.restype = _c_int
    lib.dbrxq_peak_macs.argtypes = [_c_int, ctypes.c_long]
    lib.dbrxq_peak_macs.restype = ctypes.c_double
    lib.dbrxq_repack.argtypes = [_vp, _vp, _vp, _c_int, _c_int, _c_int, _c_int, _vp]
    lib.dbrxq_repack.restype = None
    lib.dbrxq_matmul.argtypes = [_vp, _c_int, _c_int, _vp, _c_int, _c_int, _c_int, _c_int, _vp,
                                 _c_int, _c_int]
    lib.dbrxq_matmul.restype = _c_int
    lib.dbrxq_glu.argtypes = [_vp, _c_int, _c_int, _c_int, _vp, _vp, _vp, _c_int, _c_int, _c_int, _c_int,
                              _vp, _c_int, _c_int]
    lib.dbrxq_glu.restype = _c_int
    lib.dbrxq_glu2.argtypes = [_vp, _c_int, _c_int, _c_int, _vp, _vp, _vp, _c_int, _c_int, _c_int, _c_int, _c_int,
                               _c_int, _vp, _c_int, _c_int]
    lib.dbrxq_glu2.restype = _c_int
    lib.dbrxq_kq_repack.argtypes = [_vp, _vp, _vp, _vp, _vp, _c_int, _c_int, _c_int, _vp]
    lib.dbrxq_kq_repack.restype = None
    lib.dbrxq_kq_from_ggml.argtypes = [_vp, _c_int, _c_int, _c_int, _vp, _c_int]
    lib.dbrxq_kq_from_ggml.restype = _c_int
    lib.dbrxq_moe.argtypes = [_vp, _c_int, _c_int, _c_int, _c_int, _vp, _vp, _vp, _c_int, _vp, _c_int, _c_int]
    lib.dbrxq_moe.restype = _c_int
    lib.dbrxq_moe_float.argtypes = [_vp, _c_int, _c_int, _c_int, _c_int, _vp, _vp, _vp, _vp, _vp, _c_int, _c_int, _vp,
                                    _c_int, _c_int]
    lib.dbrxq_moe_float.restype = _c_int
    lib.dbrxq_act_span.argtypes = [_c_int, _c_int]
    lib.dbrxq_act_span.restype = _c_int
    return lib


def unavailable_reason() -> str | None:
    """Why the C kernel cannot be used here, or None when it can."""
    return None if load() is not None else "dbrxq C kernel could not be built (see log)"
