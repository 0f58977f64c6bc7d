"""How long one call takes: wall clock on CPU; CUDA-graph kernel time plus eager time on CUDA.

The runner only sees :func:`timer_for` and the :class:`Timer` protocol, so a better method (hardware
counters, L2 flushing, a fixed clock) can be added here without touching anything else.

* Wall clock (the eager time on CUDA, and the host-overhead measurement): after warm-up, each
  sample times a batch of calls long enough (>= 1 ms) that the clock's resolution does not matter,
  and divides by the batch size; on CUDA the batch ends with a synchronize, so host overhead
  (launches, argument checks) counts.
* CPU cells (``WallClockTimer``): wall clock as above, caches warm by default. Warm caches favour
  a small weight: a sparse weight of a few MiB (4096x4096 at density 0.1 is 6.7 MiB in float32)
  stays in the last-level cache from one repeat to the next, while the dense one (64 MiB) cannot,
  which overstates the speed-up of a model with more than one layer. ``--flush-caches``
  (``TimingConfig.flush_cpu_caches``) reads a buffer of twice the last-level cache (at least 64
  MiB; reads leave clean lines) before every timed call, outside the timed region, each sample one
  call. That errs the other way: the flush also evicts the interpreter's and torch's own state,
  so every call pays a fixed cold-start cost (tens of µs for ``F.linear``, more for an op with
  more Python around it), which weighs most on the shortest calls. A model's layers see hot code
  and cold weights, which neither method gives exactly. ``l2_flushed`` records which ran.
* CUDA graphs (``triton.testing.do_bench_cudagraph``): the calls are captured into one graph and
  replayed, which removes host overhead and leaves kernel time. If that fails (an op that syncs
  with the host cannot be captured; triton may be missing), the eager time stands in, with
  ``method="eager"`` and ``graph_failure`` saying why.
* L2 flush: ``do_bench_cudagraph`` does not flush the L2 cache (``do_bench`` does), so a weight
  that fits in L2 (50 MiB on H100) would be read from cache on every replay after the first. The
  graph therefore zeroes a 256 MiB buffer before every call, and the flush's own graph time, measured
  alone, is subtracted from each sample (:func:`subtract_flush`). ``Timing.l2_flushed`` records it.

Sampling stops after ``repeats`` samples, or earlier, once at least three are in and the
measurement has used its time budget, which bounds the cost of slow cells.

What was timed can be checked: ``measure`` hands each timing phase's last output to ``on_output``
(outside the timed region), so that the runner checks a call made after the first one (a tuner
that picks another configuration later, a stateful implementation). The wall-clock loop keeps its
last call's result in a local variable (no extra call, no wrapper). The CUDA-graph path keeps the
result of the last call captured into the graph: its tensors live in the graph's memory pool and
every replay writes them, so after the last replay they hold a replay's output; keeping them costs
nothing at replay time (Python runs only during capture).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np
import torch

from .errors import describe_error

MIN_SAMPLES = 3
MIN_SAMPLE_SECONDS = 1e-3
MAX_CALLS_PER_SAMPLE = 1000
CUDA_GRAPH_REPLAYS = 10  # do_bench_cudagraph replays its graph this many times
# Labels of the outputs handed to ``on_output``: which timed call they come from.
LAST_TIMED_CALL = "the last timed call"
LAST_EAGER_CALL = "the last eager timed call"
GRAPH_REPLAY = "a CUDA graph replay"
L2_FLUSH_BYTES = 256 * 2**20  # several times the L2 of any GPU in the peak table (H100/H200: 50 MiB)
CPU_FLUSH_MIN_BYTES = 64 * 2**20  # the CPU flush reads max(this, 2 x last-level cache)
MIN_KERNEL_MS = 1e-6  # floor of a flush-corrected sample, so that a time is never zero or negative


@dataclass(frozen=True)
class TimingConfig:
    warmup: int  # untimed calls before sampling (the correctness call already ran once)
    repeats: int  # most samples taken
    budget_s: float  # stop sampling after this long, once MIN_SAMPLES are in
    flush_cpu_caches: bool = False  # CPU: flush the caches before every timed call (see the module docstring)


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles of the samples."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    method: str  # "wall_clock" (CPU), "cuda_graph", or "eager" when CUDA graph timing failed
    eager_median_ms: Optional[float] = None  # CUDA only: host overhead included
    graph_failure: Optional[str] = None  # CUDA only: why there is no CUDA graph time
    l2_flushed: bool = False  # caches flushed before every call (CUDA graph: L2; CPU: last-level cache)


# Called as on_output(label, output) right after a timing phase, with that phase's last output.
OutputSink = Callable[[str, object], None]


class Timer(Protocol):
    def measure(self, fn: Callable[[], object], on_output: Optional[OutputSink] = None) -> Timing: ...


def _summarize(samples_ms: list[float], method: str, eager_median_ms: Optional[float] = None) -> Timing:
    median, p20, p80 = np.percentile(samples_ms, [50, 20, 80])
    return Timing(float(median), float(p20), float(p80), len(samples_ms), method, eager_median_ms)


def _wall_clock_samples(fn: Callable[[], object], config: TimingConfig, synchronize: Callable[[], None]) -> list[float]:
    return _samples_and_last_output(fn, config, synchronize)[0]


def _samples_and_last_output(
    fn: Callable[[], object], config: TimingConfig, synchronize: Callable[[], None]
) -> tuple[list[float], object]:
    """The wall-clock samples of ``fn``, and the output of its last timed call."""
    for _ in range(config.warmup):
        fn()
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    one_call = time.perf_counter() - start
    calls = max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_SECONDS / max(one_call, 1e-9))))
    deadline = time.perf_counter() + config.budget_s
    samples_ms: list[float] = []
    while len(samples_ms) < config.repeats:
        start = time.perf_counter()
        for _ in range(calls):
            output = fn()  # a local store where the result was discarded: no cost to the timing
        synchronize()
        samples_ms.append((time.perf_counter() - start) * 1e3 / calls)
        if len(samples_ms) >= MIN_SAMPLES and time.perf_counter() > deadline:
            break
    return samples_ms, output


def last_level_cache_bytes() -> Optional[int]:
    """The size of this CPU's largest cache (Linux sysfs, as seen from CPU 0), or None if unknown."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()  # e.g. "32768K"
        scale = units.get(text[-1:], 1)
        digits = text[:-1] if scale != 1 else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=None)


def _cold_samples_and_last_output(
    fn: Callable[[], object], flush: Callable[[], object], config: TimingConfig
) -> tuple[list[float], object]:
    """Wall-clock samples of single calls of ``fn``, each after ``flush()`` (not timed)."""
    for _ in range(config.warmup):
        fn()
    deadline = time.perf_counter() + config.budget_s
    samples_ms: list[float] = []
    while len(samples_ms) < config.repeats:
        flush()
        start = time.perf_counter()
        output = fn()
        samples_ms.append((time.perf_counter() - start) * 1e3)
        if len(samples_ms) >= MIN_SAMPLES and time.perf_counter() > deadline:
            break
    return samples_ms, output


class WallClockTimer:
    """CPU: wall time per call, caches warm or flushed before every call (see the module docstring)."""

    def __init__(self, config: TimingConfig) -> None:
        self.config = config
        self._flush_buffer: Optional[torch.Tensor] = None

    def _flush_caches(self) -> None:
        if self._flush_buffer is None:
            size = max(CPU_FLUSH_MIN_BYTES, 2 * (last_level_cache_bytes() or 0))
            self._flush_buffer = torch.ones(size // 4, dtype=torch.float32)
        self._flush_buffer.sum()

    def measure(self, fn: Callable[[], object], on_output: Optional[OutputSink] = None) -> Timing:
        if self.config.flush_cpu_caches:
            samples_ms, output = _cold_samples_and_last_output(fn, self._flush_caches, self.config)
        else:
            samples_ms, output = _samples_and_last_output(fn, self.config, lambda: None)
        if on_output is not None:
            on_output(LAST_TIMED_CALL, output)
        return replace(_summarize(samples_ms, "wall_clock"), l2_flushed=self.config.flush_cpu_caches)


def subtract_flush(samples_ms: list[float], flush_ms: float) -> list[float]:
    """Per-call times of ``flush + fn`` graphs minus the flush's own time, floored at MIN_KERNEL_MS."""
    return [max(sample - flush_ms, MIN_KERNEL_MS) for sample in samples_ms]


class CudaTimer:
    """CUDA: kernel time through CUDA graphs with L2 flushed, and eager time (host overhead included)."""

    def __init__(self, config: TimingConfig) -> None:
        self.config = config
        self._flush_buffer: Optional[torch.Tensor] = None
        self._flush_ms: Optional[float] = None

    def _flush_l2(self) -> None:
        if self._flush_buffer is None:
            self._flush_buffer = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
        self._flush_buffer.zero_()

    def _graph_samples(self, fn: Callable[[], object]) -> list[float]:
        from triton.testing import do_bench_cudagraph

        # do_bench_cudagraph spends about CUDA_GRAPH_REPLAYS * rep milliseconds.
        rep_ms = max(1.0, self.config.budget_s * 1e3 / CUDA_GRAPH_REPLAYS)
        return [float(sample) for sample in do_bench_cudagraph(fn, rep=rep_ms, return_mode="all")]

    def measure(self, fn: Callable[[], object], on_output: Optional[OutputSink] = None) -> Timing:
        eager_samples_ms, eager_output = _samples_and_last_output(fn, self.config, torch.cuda.synchronize)
        eager = _summarize(eager_samples_ms, "eager")
        if on_output is not None:
            on_output(LAST_EAGER_CALL, eager_output)
        del eager_output
        captured: list[object] = []  # the output of the last call captured into the graph

        def flushed() -> None:
            self._flush_l2()
            captured[:] = [fn()]

        try:
            if self._flush_ms is None:  # the same for every cell: measured once
                self._flush_ms = float(np.median(self._graph_samples(self._flush_l2)))
            samples_ms = subtract_flush(self._graph_samples(flushed), self._flush_ms)
        except Exception as error:  # capture unsupported by this op, or no triton: keep the eager time
            torch.cuda.synchronize()
            return replace(eager, eager_median_ms=eager.median_ms, graph_failure=describe_error(error))
        # Outside the try: an error of the caller's check is not a failure of the graph timing.
        if on_output is not None and captured:
            on_output(GRAPH_REPLAY, captured[0])
        return replace(_summarize(samples_ms, "cuda_graph", eager.median_ms), l2_flushed=True)


def timer_for(device: torch.device, config: TimingConfig) -> Timer:
    return CudaTimer(config) if device.type == "cuda" else WallClockTimer(config)
