"""Launch-configuration tuning for the Triton kernels, cached in memory and on disk.

Each launcher (bsr_forward.py, nm_forward.py, ...) has a heuristic configuration (:class:`Config`:
rows per tile, output tile width, warps, pipeline stages) and a short list of candidates. The first
call of a *key* on a CUDA device times the candidates (``triton.testing.do_bench``) and keeps the
fastest, in memory and in a JSON file, so that later calls, and later processes, do not tune again.

Key: ``(kernel, M bucket, N, K, block size or n:m, density bucket, dtype, GPU name)``, with M (the
flattened input rows) rounded up to a power of two and the density of kept blocks rounded up to one
of :data:`DENSITY_BUCKETS`, so that nearby shapes share a tuning run; float32 keys end with the
float32 multiply, ``"tf32"`` or ``"ieee"`` (torch's TF32 setting, :func:`tf32_enabled`), so that a
choice measured under one is not reused under the other. (Files written before that field hold
float32 entries without it: they are no longer matched, and are tuned again once.)

Where tuning is skipped (the heuristic configuration is used, and nothing is stored):

* ``SPARSEKERNELS_AUTOTUNE=0``;
* CPU tensors (the Triton interpreter: speed does not matter there, so one small config);
* fake or meta tensors (torch.compile tracing, shape inference) and CUDA graph capture (a benchmark
  cannot run there); a key that was tuned before still gets its tuned configuration.

File: ``SPARSEKERNELS_TUNE_CACHE`` if set, else ``~/.cache/sparsekernels/triton-tune-<gpu>.json``. It is
written atomically (a temporary file in the same folder, then ``os.replace``), merged with what
another process may have written since it was read. An unreadable or malformed file is ignored with
a warning (and rewritten at the next tuning).

Hot path: after the first call of a key, :meth:`Tuner.choose` is one dict lookup on a tuple of ints
and strings: no allocation on the device, no synchronisation.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch

__all__ = [
    "Config", "Heuristic", "resolve_heuristic", "Tuner", "DENSITY_BUCKETS", "DISPATCH_PATHS", "density_bucket",
    "m_bucket", "tuner", "gpu_name", "tf32_enabled",
]

FILE_VERSION = 1
# The forward paths dispatch.py chooses between: the Triton kernel, the CUDA C++ op, dense F.linear.
DISPATCH_PATHS = ("sparse", "cuda", "dense")
DENSITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


@dataclass(frozen=True)
class Config:
    """One launch configuration: ``block_rows`` input rows per program, ``tile`` output columns per
    program (TILE of the block kernels, BLOCK_OUT of the N:M kernels), ``num_warps``, ``num_stages``."""

    block_rows: int
    tile: int
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        return cls(**{name: int(data[name]) for name in ("block_rows", "tile", "num_warps", "num_stages")})


Heuristic = Union[Config, Callable[[], Config]]


def resolve_heuristic(heuristic: Heuristic) -> Config:
    """The Config of a heuristic given as a Config or as a callable returning one."""
    return heuristic() if callable(heuristic) else heuristic


def m_bucket(rows: int) -> int:
    """``rows`` rounded up to a power of two (1 for 0 or 1)."""
    return 1 << max(int(rows) - 1, 0).bit_length()


def density_bucket(density: float) -> float:
    """The smallest of :data:`DENSITY_BUCKETS` not below ``density`` (so 0.1 -> 0.1, 0.11 -> 0.2)."""
    for bucket in DENSITY_BUCKETS:
        if density <= bucket + 1e-9:
            return bucket
    return DENSITY_BUCKETS[-1]


_gpu_names: dict = {}


def gpu_name(device: torch.device) -> str:
    """The device's name (``torch.cuda.get_device_name``), cached; ``"cpu"`` for host tensors."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = _gpu_names.get(index)
    if name is None:
        name = _gpu_names[index] = torch.cuda.get_device_name(index)
    return name


def tf32_enabled() -> bool:
    """Whether torch lets its own float32 CUDA matmuls use TF32: the Triton kernels then multiply
    float32 tiles in TF32 too (``_common.dot_mode``), and tuning and dispatch keys say so.

    torch with the new API (2.11 and 2.13 have it) reads the setting of either API through
    ``torch.backends.cuda.matmul.fp32_precision`` (``"tf32"``, ``"ieee"``, or ``"none"``: the
    default, full precision; the legacy ``allow_tf32 = True`` reads back as ``"tf32"``, a global
    ``torch.backends.fp32_precision`` is inherited). The legacy ``allow_tf32`` must not be read
    there: once the new API has set ``"tf32"``, reading it raises "mix of the legacy and new APIs".
    Older torch has only ``allow_tf32``."""
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:  # torch before the fp32_precision API
        return bool(matmul.allow_tf32)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "gpu"


def _do_bench(fn: Callable[[], None]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20))


def _env_enabled(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "off", "no")


def tuning_enabled() -> bool:
    """False when ``SPARSEKERNELS_AUTOTUNE=0``."""
    return _env_enabled("SPARSEKERNELS_AUTOTUNE")


def can_measure(device: torch.device, tensors: Iterable[torch.Tensor]) -> bool:
    """Whether a benchmark may run now: real CUDA tensors, eager, not capturing a CUDA graph."""
    from torch._subclasses.fake_tensor import is_fake

    if device.type != "cuda" or torch.compiler.is_compiling():
        return False
    if any(is_fake(tensor) for tensor in tensors):
        return False
    return not torch.cuda.is_current_stream_capturing()


class Tuner:
    """Tuned configurations and dispatch decisions, in memory and in one JSON file per GPU.

    ``timer(fn) -> milliseconds`` times a callable (default ``triton.testing.do_bench``);
    ``measurable(device, tensors)`` says whether timing may run (default :func:`can_measure`);
    ``path`` overrides the cache file. Tests inject all three to run the logic on CPU.
    """

    def __init__(self, path: Optional[os.PathLike] = None, timer: Optional[Callable] = None,
                 measurable: Optional[Callable] = None) -> None:
        self._path = None if path is None else Path(path)
        self.timer = timer or _do_bench
        self.measurable = measurable or can_measure
        self._configs: dict = {}  # (kernel key tuple + gpu) -> Config; the hot-path lookup
        self._dispatch: dict = {}  # (dispatch key tuple + gpu) -> "sparse" | "dense"
        self._loaded: dict = {}  # gpu -> the file's content as read (dict of sections)
        self._lock = threading.Lock()
        self.tuning_runs = 0  # how many keys were tuned by this object (for tests and the benchmark)
        # Bumped whenever an answer of choose() or decide() may change (an entry stored in memory,
        # memory cleared): the eager launch plans (eager.py) hold answers and check it per call.
        self.generation = 0

    # ------------------------------------------------------------------ file
    def path(self, gpu: str) -> Path:
        if self._path is not None:
            return self._path
        env = os.environ.get("SPARSEKERNELS_TUNE_CACHE")
        if env:
            return Path(env).expanduser()
        return Path.home() / ".cache" / "sparsekernels" / f"triton-tune-{_file_safe(gpu)}.json"

    def _read(self, gpu: str) -> dict:
        """The file's ``{"configs": {...}, "dispatch": {...}}`` for ``gpu`` (empty when missing or bad)."""
        path = self.path(gpu)
        empty = {"configs": {}, "dispatch": {}}
        try:
            text = path.read_text()
        except FileNotFoundError:
            return empty
        except OSError as error:
            warnings.warn(f"sparsekernels: cannot read the tuning cache {path}: {error}; ignoring it", stacklevel=3)
            return empty
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
                raise ValueError(f"expected a JSON object with version {FILE_VERSION}")
            sections = {name: data.get(name, {}) for name in ("configs", "dispatch")}
            if not all(isinstance(section, dict) for section in sections.values()):
                raise ValueError("'configs' and 'dispatch' must be objects")
            for entry in sections["configs"].values():
                Config.from_dict(entry)
            for entry in sections["dispatch"].values():
                if entry.get("path") not in DISPATCH_PATHS:
                    raise ValueError(f"bad dispatch entry {entry!r}")
            return sections
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            warnings.warn(f"sparsekernels: ignoring the corrupted tuning cache {path} ({error})", stacklevel=3)
            return empty

    def _sections(self, gpu: str) -> dict:
        sections = self._loaded.get(gpu)
        if sections is None:
            sections = self._loaded[gpu] = self._read(gpu)
        return sections

    def _reads_file(self, device: torch.device) -> bool:
        """Whether ``choose`` and ``decide`` look in the file after memory: on a GPU, or wherever a file
        was named (``path=`` or ``SPARSEKERNELS_TUNE_CACHE``)."""
        return device.type == "cuda" or self._path is not None or bool(os.environ.get("SPARSEKERNELS_TUNE_CACHE"))

    def _write(self, gpu: str, section: str, key: str, entry: dict) -> None:
        """Add one entry and rewrite the file atomically, merged with its current content."""
        path = self.path(gpu)
        with self._lock:
            current = self._read(gpu)
            current[section][key] = entry
            self._sections(gpu)[section][key] = entry
            payload = {"version": FILE_VERSION, "gpu": gpu, **current}
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
                with os.fdopen(handle, "w") as file:
                    json.dump(payload, file, indent=1, sort_keys=True)
                os.replace(temporary, path)
            except OSError as error:
                warnings.warn(f"sparsekernels: cannot write the tuning cache {path}: {error}", stacklevel=3)

    @staticmethod
    def _full_key(key: tuple, gpu: str) -> tuple:
        """``key`` (whose last field is the dtype) with the GPU's name and, for float32, how float32
        tiles are multiplied: ``"tf32"`` or ``"ieee"`` (:func:`tf32_enabled`). A configuration or a
        dense-or-sparse decision measured with TF32 multiplies (faster, in the kernels and in cuBLAS
        alike) says nothing about full-precision ones."""
        if key[-1] == "torch.float32":
            return key + (gpu, "tf32" if tf32_enabled() else "ieee")
        return key + (gpu,)

    @staticmethod
    def _text_key(key: tuple) -> str:
        return "|".join(str(part) for part in key)

    # ------------------------------------------------------------------ configurations
    def choose(self, key: tuple, device: torch.device, tensors: Iterable[torch.Tensor], heuristic: Heuristic,
               candidates: Callable[[], list], run: Callable[[Config], None]) -> Config:
        """The configuration for ``key`` (without the GPU, which is added here).

        Memory first, then the file; else, where timing may run, every candidate is timed with
        ``run(config)`` and the fastest stored; else the heuristic (not stored: it may depend on
        facts that tests patch, and it is cheap). ``heuristic`` may be a callable returning the
        Config, evaluated only on a miss (a launcher's hot path then skips it).
        """
        gpu = gpu_name(device)
        full_key = self._full_key(key, gpu)
        config = self._configs.get(full_key)
        if config is not None:
            return config
        if self._reads_file(device):
            stored = self._sections(gpu)["configs"].get(self._text_key(full_key))
            if stored is not None:
                config = self._configs[full_key] = Config.from_dict(stored)
                self.generation += 1
                return config
        heuristic = resolve_heuristic(heuristic)
        if not tuning_enabled() or not self.measurable(device, tensors):
            return heuristic
        config, timings = self._tune(heuristic, candidates(), run)
        self._configs[full_key] = config
        self.generation += 1
        self._write(gpu, "configs", self._text_key(full_key), {**asdict(config), "ms": timings.get(config)})
        return config

    def _tune(self, heuristic: Config, candidates: list, run: Callable[[Config], None]):
        self.tuning_runs += 1
        timings = {}
        for config in dict.fromkeys([heuristic, *candidates]):  # heuristic first, no duplicates
            try:
                timings[config] = float(self.timer(lambda config=config: run(config)))
            except Exception as error:  # a candidate that fails to compile or launch is skipped
                warnings.warn(f"sparsekernels: tuning candidate {config} failed: {error}", stacklevel=4)
        if not timings:
            return heuristic, {}
        return min(timings, key=timings.get), timings

    # ------------------------------------------------------------------ dispatch decisions
    def decide(self, key: tuple, device: torch.device, tensors: Iterable[torch.Tensor],
               measure: Callable[[], dict], default: str = "sparse") -> str:
        """The fastest path for a dispatch ``key``: memory, file, else ``measure()`` -> ``{path:
        milliseconds}`` where timing may run (stored), else ``default`` (not stored). Ties go to the
        path measured first."""
        gpu = gpu_name(device)
        full_key = self._full_key(key, gpu)
        path = self._dispatch.get(full_key)
        if path is not None:
            return path
        if self._reads_file(device):
            stored = self._sections(gpu)["dispatch"].get(self._text_key(full_key))
            if stored is not None:
                path = self._dispatch[full_key] = stored["path"]
                self.generation += 1
                return path
        if not self.measurable(device, tensors):
            return default
        times = {name: float(ms) for name, ms in measure().items()}
        path = min(times, key=times.get)
        self._dispatch[full_key] = path
        self.generation += 1
        self._write(gpu, "dispatch", self._text_key(full_key),
                    {"path": path, **{f"{name}_ms": ms for name, ms in times.items()}})
        return path

    def clear_memory(self) -> None:
        """Forget everything held in memory (the file stays): as a fresh process would start."""
        self._configs.clear()
        self._dispatch.clear()
        self._loaded.clear()
        self.generation += 1


tuner = Tuner()
