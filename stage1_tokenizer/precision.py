"""Whether bf16 autocast pays off on a device, measured once per process, and an autocast that uses it only then.

CPUs with native bf16 (AVX512-BF16, AMX, Arm BF16) run bf16 matmuls and convolutions several times faster than
fp32; CPUs without it (AVX2-only x86, for one) emulate bf16 and run it 10-100x *slower*. The flags are not a
reliable guide across vendors and torch builds, so we time it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch
import torch.nn.functional as F

# Set to 1 or 0 to skip the measurement and force the answer (e.g. to pin the precision across machines).
OVERRIDE_ENV = "VQGEN_CPU_BF16"


def _best_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up: kernel selection, oneDNN primitive creation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def _cpu_bf16_is_fast() -> bool:
    override = os.environ.get(OVERRIDE_ENV)
    if override is not None:
        if override not in ("0", "1"):
            raise ValueError(f"{OVERRIDE_ENV}={override!r} is not allowed; expected 0 or 1")
        return override == "1"
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(256, 256, generator=generator)
    images = torch.randn(8, 32, 16, 16, generator=generator).contiguous(memory_format=torch.channels_last)
    kernel = torch.randn(32, 32, 3, 3, generator=generator).contiguous(memory_format=torch.channels_last)

    def work(dtype: torch.dtype):
        a, x, w = matrix.to(dtype), images.to(dtype), kernel.to(dtype)
        return lambda: (a @ a, F.conv2d(x, w, padding=1))

    with torch.no_grad():
        fp32, bf16 = _best_time(work(torch.float32)), _best_time(work(torch.bfloat16))
    # Demand a clear win: where the two are close, fp32 is the better choice (no rounding, same speed).
    return bf16 * 1.25 < fp32


def bf16_is_fast(device: torch.device | str) -> bool:
    """True where bf16 autocast makes matmuls and convolutions clearly faster than fp32 on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_bf16_is_fast()
    return False


def fast_autocast(device: torch.device | str):
    """bf16 autocast on `device` where it is faster there (see `bf16_is_fast`), else a no-op context."""
    device = torch.device(device)
    if bf16_is_fast(device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
