"""Autotuning within a budget: how many candidate configs a kernel tries, and its winners kept.

Triton's autotuner compiles and times every candidate config the first time a kernel meets a
new tuning key. Over a long training run that cost vanishes; when GPU time is counted in
minutes it does not. This module wraps ``triton.autotune`` so that a caller can

- ``limit_candidates(n)``: try only the first ``n`` configs of every list (the lists are
  ordered best guess first);
- ``only_candidate(i)``: run the i-th config and nothing else (to check each config's parity);
- ``winners()``: read which config won for every key, with the timings it won by;
- ``save(path)`` / ``load(path)``: keep the winners in a JSON file, so that a second run on the
  same machine (same device name and triton version) starts tuned and times nothing.

By default none of this changes anything: every config is a candidate and Triton times them
with its own benchmarker. Under Triton's interpreter the autotuner cannot use that (it needs a
GPU), so it times with the host clock; the kernels tune there only when a caller has limited
the candidates (the GPU suite's CPU rehearsal does), and otherwise launch one fixed config.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import triton

from gptforge.kernels.triton.common import INTERPRET

_max_candidates: int | None = None  # None: every config of a list
_only_index: int | None = None  # set: the index-th config of the (limited) list, alone
_bench_ms: int | None = None  # set: time each candidate for about this many ms (GPU)
_tuners: dict[tuple, _Tuned] = {}
# kernel name -> tuning key -> {"config": {...}, "timings_ms": {config label: ms}}
_winners: dict[str, dict[tuple, dict]] = {}


def limit_candidates(count: int | None, bench_ms: int | None = None) -> None:
    """Try at most ``count`` configs per kernel (None: all), timing each for about ``bench_ms``
    milliseconds (None: Triton's default). Kernels built before the call are rebuilt."""
    global _max_candidates, _bench_ms
    if count is not None and count < 1:
        raise ValueError(f"count must be a positive number of configs or None, got {count}")
    _max_candidates, _bench_ms = count, bench_ms
    _tuners.clear()


def limited() -> bool:
    """Whether a caller has restricted the candidates (the interpreter then tunes too)."""
    return _max_candidates is not None or _only_index is not None


@contextlib.contextmanager
def only_candidate(index: int) -> Iterator[None]:
    """Inside the block every kernel runs its ``index``-th candidate (counted within the
    limited list), or its last one when its list is shorter; nothing is timed."""
    global _only_index
    before = _only_index
    _only_index = index
    _tuners.clear()
    try:
        yield
    finally:
        _only_index = before
        _tuners.clear()


def candidate_count(configs: list) -> int:
    return len(configs) if _max_candidates is None else min(len(configs), _max_candidates)


def autotuned(name: str, fn, configs: list[triton.Config], key: list[str]) -> _Tuned:
    """``fn`` autotuned over ``configs`` as the current limits allow, memoised by name."""
    memo = (name, _max_candidates, _only_index)
    if memo not in _tuners:
        candidates = configs[: candidate_count(configs)]
        if _only_index is not None:
            candidates = [candidates[min(_only_index, len(candidates) - 1)]]
        bench = _host_clock_bench if INTERPRET else _gpu_bench if _bench_ms else None
        tuner = triton.autotune(candidates, key=key, do_bench=bench)(fn)
        for tuning_key, saved in _winners.get(name, {}).items():
            config = _matching(candidates, saved["config"])
            if config is not None:  # a winner from a saved file: start tuned for that key
                tuner.cache[tuning_key] = config
        _tuners[memo] = _Tuned(name, tuner, key)
    return _tuners[memo]


class _Tuned:
    """``kernel[grid](*args)`` as for a Triton kernel; notes every key it tunes."""

    def __init__(self, name: str, tuner, key_names: list[str]) -> None:
        self.name, self.tuner, self.key_names = name, tuner, key_names

    def __getitem__(self, grid) -> Callable:
        def launch(*args, **kwargs):
            known = len(self.tuner.cache)
            result = self.tuner[grid](*args, **kwargs)
            if len(self.tuner.cache) != known:  # this launch tuned a new key
                self._note_winners()
            return result

        return launch

    def _note_winners(self) -> None:
        mine = _winners.setdefault(self.name, {})
        timings = getattr(self.tuner, "configs_timings", None) or {}
        for tuning_key, config in self.tuner.cache.items():
            # new keys, and keys whose saved winner is no longer a candidate (re-tuned)
            if tuning_key not in mine or mine[tuning_key]["config"] != _as_dict(config):
                mine[tuning_key] = dict(
                    config=_as_dict(config),
                    timings_ms={label(c): _median(t) for c, t in timings.items()},
                    key_names=list(self.key_names),
                    tuned_here=True,
                )


def winners(tuned_here: bool = False) -> list[dict]:
    """Every tuned key: ``{"kernel", "key", "key_names", "config", "label", "timings_ms",
    "tuned_here"}``, the key's values in the order of ``key_names`` and then the dtypes of the
    tensor arguments (Triton's own key). ``tuned_here``: only those this process timed, not
    those it loaded."""
    return [
        dict(kernel=name, key=list(tuning_key), label=label(entry["config"]), **entry)
        for name, keys in _winners.items()
        for tuning_key, entry in keys.items()
        if entry.get("tuned_here") or not tuned_here
    ]


def save(path: str | Path, device: str) -> None:
    """Write the winners to ``path`` (atomically), merged with what the file already holds."""
    path = Path(path)
    kernels: dict[str, list] = {}
    if path.is_file():
        with contextlib.suppress(ValueError, OSError):
            old = json.loads(path.read_text())
            if old.get("device") == device and old.get("triton") == triton.__version__:
                kernels = old.get("kernels", {})
    for entry in winners():
        rows = kernels.setdefault(entry["kernel"], [])
        rows[:] = [r for r in rows if r["key"] != entry["key"]]
        rows.append({k: entry[k] for k in ("key", "key_names", "config", "timings_ms") if k in entry})
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(dict(device=device, triton=triton.__version__, kernels=kernels), indent=1) + "\n")
    os.replace(tmp, path)


def load(path: str | Path, device: str) -> tuple[int, str]:
    """Take the winners saved in ``path``: (how many keys, and a sentence saying what was done).
    A file from another device or triton version is ignored, since its timings say nothing here."""
    path = Path(path)
    if not path.is_file():
        return 0, f"no tuning file at {path}: every key is tuned afresh"
    try:
        saved = json.loads(path.read_text())
        kernels = saved["kernels"]
    except (ValueError, KeyError, TypeError) as e:
        return 0, f"tuning file {path} is unreadable ({e}): ignored"
    if (saved.get("device"), saved.get("triton")) != (device, triton.__version__):
        return 0, (f"tuning file {path} is for {saved.get('device')} with triton {saved.get('triton')}, "
                   f"not {device} with triton {triton.__version__}: ignored")  # fmt: skip
    count = 0
    for name, rows in kernels.items():
        for row in rows:
            _winners.setdefault(name, {})[tuple(row["key"])] = dict(
                config=row["config"], timings_ms=row.get("timings_ms", {}), key_names=row.get("key_names", [])
            )
            count += 1
    _tuners.clear()  # rebuilt lazily, seeded with these winners
    return count, f"{count} tuned keys loaded from {path}"


def forget() -> None:
    """Drop every winner (tests)."""
    _winners.clear()
    _tuners.clear()


def label(config: triton.Config | dict) -> str:
    """``M128 N64 w4 s3 +tma`` for BLOCK_M=128, BLOCK_N=64, 4 warps, 3 stages, TMA=True."""
    d = config if isinstance(config, dict) else _as_dict(config)
    kwargs = d["kwargs"]
    blocks = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in sorted(kwargs.items()) if not isinstance(v, bool))
    switches = "".join(f" +{k.lower()}" for k, v in sorted(kwargs.items()) if v is True)
    return f"{blocks} w{d['num_warps']} s{d['num_stages']}{switches}"


def _as_dict(config: triton.Config) -> dict:
    return dict(kwargs=dict(config.kwargs), num_warps=config.num_warps, num_stages=config.num_stages)


def _matching(candidates: list[triton.Config], wanted: dict) -> triton.Config | None:
    return next((c for c in candidates if _as_dict(c) == wanted), None)


def _median(timing) -> float | None:
    """Triton's benchmarkers return the median first (or a bare number); None for a config
    that failed to run (Triton times it as infinity)."""
    ms = float(timing[0] if isinstance(timing, list | tuple) else timing)
    return ms if math.isfinite(ms) else None


def _gpu_bench(fn: Callable, quantiles=None):
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(1, _bench_ms // 4), rep=_bench_ms, quantiles=quantiles)


def _host_clock_bench(fn: Callable, quantiles=None) -> list[float]:
    """The interpreter's stand-in for a GPU timer: the median of three calls, in ms."""
    fn()  # the first call includes the interpreter's set-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(times)] * (len(quantiles) if quantiles else 1)
