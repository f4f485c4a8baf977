"""A fused one-pass C loop for EWC's gradient update on CPU (``cpu_kernel=True`` of
``lf.ElasticWeightConsolidation`` and ``lf.EWC``).

For float32 tensors of ``n`` elements it computes, element by element,

    g <- g + (lam * F) * (theta - theta*),

with the roundings of the explicit loss's gradient (``lam * F`` rounded, times the rounded
difference, rounded, added to ``g``): no fused multiply-add, no reassociation. It reads ``g``,
``F``, ``theta`` and ``theta*`` once and writes ``g`` once, where PyTorch's ops need a workspace and
two passes; the update is memory-bound, so fewer bytes moved is what makes it cheaper.

The library is compiled once per process, on first use, with the system C compiler (``$CC``, else
``cc``, ``gcc`` or ``clang``) in a private temporary directory that is removed once the library is
loaded. Without a working compiler (or on Windows) :func:`load` returns ``None`` and the caller
falls back to PyTorch's ops.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch
from torch import Tensor

_SOURCE = r"""
#include <stdint.h>
void lf_ewc_add(float *g, const float *f, const float *p, const float *a, float lam, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        float d = p[i] - a[i];
        float c = lam * f[i];
        g[i] = g[i] + c * d;
    }
}
"""
# -ffp-contract=off: an FMA would round c * d + g once instead of twice, unlike autograd.
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")

Kernel = Callable[[int, int, int, int, float, int], None]
_kernel: Kernel | None = None
_tried = False


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def load() -> Kernel | None:
    """The compiled kernel ``f(g_ptr, f_ptr, p_ptr, a_ptr, lam, n)``, or ``None`` if it cannot be
    built here (tried once per process)."""
    global _kernel, _tried
    if _tried:
        return _kernel
    _tried = True
    cc = _compiler()
    if cc is None or sys.platform == "win32":
        return None
    tmp = tempfile.mkdtemp(prefix="lightning_fisher_")  # mode 0700: no one else can swap the .so
    try:
        src, lib = os.path.join(tmp, "ewc.c"), os.path.join(tmp, "ewc.so")
        with open(src, "w") as fh:
            fh.write(_SOURCE)
        # -march=native vectorises for this CPU (the library never leaves this process); some
        # compilers/architectures refuse it, then the portable build.
        for extra in (("-march=native",), ()):
            done = subprocess.run(
                [cc, *_FLAGS, *extra, src, "-o", lib], capture_output=True, timeout=60
            )
            if done.returncode == 0:
                break
        else:
            return None
        fn = ctypes.CDLL(lib).lf_ewc_add
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the loaded library stays mapped
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_float, ctypes.c_int64]
    fn.restype = None
    _kernel = fn
    return _kernel


def fits(t: Tensor) -> bool:
    """Whether the kernel may read or write ``t`` through its data pointer: a dense contiguous
    float32 CPU tensor."""
    return (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.layout == torch.strided
        and t.is_contiguous()
    )
