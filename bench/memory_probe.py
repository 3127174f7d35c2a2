"""Peak memory a piece of code allocates above what was live when it started.

CPU: from the allocator's own events (``torch.profiler`` with ``profile_memory=True``),
replayed in time order, so copies a kernel makes internally (``torch.multinomial``'s, a
dtype cast inside autograd) count as well as the tensors Python sees. CUDA:
``torch.cuda.max_memory_allocated`` above the bytes allocated at the start. Used by
``bench/loss_memory.py`` and the memory tests (``tests/unit/test_weight_grad.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn: Callable[[], Any], device: str = "cpu") -> tuple[Any, int]:
    """(``fn()``, its peak bytes above the start on ``device``)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - start
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda event: event[0]):
        live += nbytes
        peak = max(peak, live)
    return result, peak
