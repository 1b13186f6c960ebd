"""Backend registry and selection.

Every op family ("attention", "layer_norm") has a set of named backends. A backend is a
module that defines the op's functions (see ``OPS``) and, optionally,

    unsupported(fn: str, *tensors, **kwargs) -> str | None

which returns None when it can run that call of its function ``fn`` (e.g. "add_layer_norm"),
else one sentence saying why not, and

    auto_passes(fn: str, *tensors, **kwargs) -> bool

which ``auto`` alone asks: True when the next backend in its order serves this call better (the
``chunked`` loss passes logits small enough to hold at once to the materialised one). A user
who names the backend still gets it.
Modules are imported lazily, so a missing optional package (triton, flash_attn) only
matters to the user who asks for that backend.

Selection order for one call: the call's ``backend=``, then ``use_backend(...)``, then the
environment variable ``GPT_KERNELS`` (e.g. ``attention=triton,layer_norm=torch``; read once,
when this module is imported, and again by ``reload_env``), then ``auto``. A backend the user
named that cannot run the call is an error, never a silent fallback; ``auto`` walks a
preference list and takes the first backend that can.

Resolving a call is memoised for eager calls (one-token decoding pays for it per layer);
code that torch.compile traces resolves afresh, so its graph guards only on the selection.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

# op family -> the functions every backend of that family defines
OPS: dict[str, tuple[str, ...]] = {
    "attention": ("attention",),
    "layer_norm": ("layer_norm", "add_layer_norm"),
    "linear_cross_entropy": ("linear_cross_entropy",),
}

# op family -> backend name -> module implementing it. Adding a backend is one line here.
REGISTRY: dict[str, dict[str, str]] = {
    "attention": {
        "torch": "gptforge.kernels.reference",
        "sdpa": "gptforge.kernels.sdpa",
        "flash_attn": "gptforge.kernels.flash_attn_backend",
        "triton": "gptforge.kernels.triton.attention",
    },
    "layer_norm": {
        "torch": "gptforge.kernels.reference",
        "triton": "gptforge.kernels.triton.layer_norm",
    },
    "linear_cross_entropy": {
        "torch": "gptforge.kernels.reference",
        "chunked": "gptforge.kernels.chunked_cross_entropy",
        "triton": "gptforge.kernels.triton.linear_cross_entropy",
    },
}

# What ``auto`` tries, in order, per op family and device type.
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "attention": {"cuda": ("triton", "sdpa", "torch"), "cpu": ("sdpa", "torch")},
    "layer_norm": {"cuda": ("triton", "torch"), "cpu": ("torch",)},
    "linear_cross_entropy": {"cuda": ("triton", "chunked", "torch"), "cpu": ("chunked", "torch")},
}

ENV_VAR = "GPT_KERNELS"


class BackendError(ValueError):
    """A named backend does not exist, is not installed, or cannot run this call."""


# The choices of the active ``use_backend`` blocks, innermost last. A plain module-level list
# rather than a ContextVar because torch.compile can read (and guard on) globals but cannot
# trace ContextVar.get; the price is that a choice applies to the whole process, not per thread.
_overrides: list[dict[str, str]] = []
_modules: dict[str, ModuleType | Exception] = {}


def _check_choice(op: str, name: str) -> None:
    if op not in REGISTRY:
        raise BackendError(f"unknown op family {op!r}; expected one of {sorted(REGISTRY)}")
    if name != "auto" and name not in REGISTRY[op]:
        choices = ["auto", *REGISTRY[op]]
        raise BackendError(f"unknown {op} backend {name!r}; expected one of {choices}")


def _load(op: str, name: str) -> ModuleType:
    """Import a backend's module, or raise a BackendError naming what is missing."""
    path = REGISTRY[op][name]
    if path not in _modules:
        try:
            _modules[path] = importlib.import_module(path)
        except ImportError as err:  # the optional package behind the backend is absent
            _modules[path] = err
    module = _modules[path]
    if isinstance(module, Exception):
        missing = getattr(module, "name", None) or str(module)
        raise BackendError(
            f"{op} backend {name!r} needs the package {missing!r}, which is not installed "
            f"here ({module}); install it or choose another backend: "
            f"{[b for b in REGISTRY[op] if b != name]}"
        )
    return module


def _why_not(module: ModuleType, op: str, fn: str, args: tuple, kwargs: dict) -> str | None:
    check = getattr(module, "unsupported", None)
    return check(fn, *args, **kwargs) if check is not None else None


def _parse_env_text(raw: str) -> dict[str, str]:
    choice: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        op, sep, name = item.partition("=")
        if not sep:
            raise BackendError(
                f"{ENV_VAR}={raw!r}: expected comma-separated op=backend pairs, "
                "e.g. 'attention=triton,layer_norm=torch'"
            )
        op, name = op.strip(), name.strip()
        _check_choice(op, name)
        choice[op] = name
    return choice


def _read_env() -> dict[str, str] | str:
    """GPT_KERNELS parsed, or the sentence saying what is wrong with it (raised at selection)."""
    try:
        return _parse_env_text(os.environ.get(ENV_VAR, "").strip())
    except BackendError as err:
        return str(err)


# The choice in GPT_KERNELS, read once, when this module is imported: reading the environment
# on every call cost ~5% of a one-token decoding step, and reading it lazily inside code that
# torch.compile traces would make the graph guard on (and recompile after) that first read.
# ``reload_env`` re-reads it; within a process, ``use_backend`` is the way to switch.
_env_choice: dict[str, str] | str = _read_env()


def reload_env() -> None:
    """Read GPT_KERNELS again (after changing ``os.environ``)."""
    global _env_choice
    _env_choice = _read_env()
    _selection_changed()


def _env() -> dict[str, str]:
    if isinstance(_env_choice, str):
        raise BackendError(_env_choice)
    return _env_choice


def selected(op: str, backend: str | None = None) -> str:
    """The backend name in force for ``op`` (may be "auto"), following the selection order."""
    if backend is not None:
        _check_choice(op, backend)
        return backend
    for choice in reversed(_overrides):
        if op in choice:
            return choice[op]
    return _env().get(op, "auto")


# (op, fn, the call's backend=, device type) -> the function that runs every such call,
# under the current use_backend blocks and GPT_KERNELS: every kernel call resolves, and for a
# one-token decoding step the selection and the walk below cost as much as the kernel itself.
# Only answers that do not depend on the call's tensors are kept (no backend's ``unsupported``
# or ``auto_passes`` had a say); a change of selection (use_backend, reload_env) empties it.
# Eager calls only: code that torch.compile traces never reads or writes it (see ``resolve``).
_resolved: dict[tuple[str, str, str | None, str, tuple[str, ...]], object] = {}
_selection_epoch = 0  # bumped with every change of selection (see _selection_changed)


def _selection_changed() -> None:
    global _selection_epoch
    _selection_epoch += 1
    _resolved.clear()


def resolve(op: str, fn: str, backend: str | None, args: tuple, kwargs: dict):
    """Return the function ``fn`` of the backend that will run this call."""
    if torch.compiler.is_compiling():
        # Traced code walks the selection afresh; the walk costs nothing at run time, and dynamo
        # then guards on the selection itself (use_backend's choices, GPT_KERNELS), which stays
        # put from step to step. Through the memo it would guard on a dict that the first call
        # fills and every use_backend empties: a recompile each time.
        return _resolve(op, fn, selected(op, backend), args, kwargs)[0]
    # the keywords' names: a tensor passed by keyword (attention's cu_seqlens) is there only when
    # given, and asks for more than a plain call does (names alone: 0.5 us less per call than
    # picking out the tensors)
    key = (op, fn, backend, args[0].device.type, tuple(kwargs))
    found = _resolved.get(key)
    if found is None:
        epoch = _selection_epoch
        found, fixed = _resolve(op, fn, selected(op, backend), args, kwargs)
        if fixed and epoch == _selection_epoch:  # not if another thread changed the selection meanwhile
            _resolved[key] = found
    return found


def _resolve(op: str, fn: str, name: str, args: tuple, kwargs: dict):
    """``resolve``'s walk. Also says whether the answer holds for every call on this device
    type: true when no backend's ``unsupported`` or ``auto_passes`` check had a say."""
    if name != "auto":
        module = _load(op, name)
        reason = _why_not(module, op, fn, args, kwargs)
        if reason is not None:
            raise BackendError(f"{op} backend {name!r} cannot run this call: {reason}")
        return getattr(module, fn), not hasattr(module, "unsupported")
    device = args[0].device.type
    order = AUTO_ORDER[op].get(device, AUTO_ORDER[op]["cpu"])
    fixed = True  # until a backend's check depends on the call
    passed = None  # the first backend that could run the call but passed it on: taken if no later one can
    for candidate in order:
        try:
            module = _load(op, candidate)
        except BackendError:
            continue  # not installed: the same answer for every call
        passes = getattr(module, "auto_passes", None)
        fixed = fixed and not hasattr(module, "unsupported") and passes is None
        if _why_not(module, op, fn, args, kwargs) is None:
            if passes is None or not passes(fn, *args, **kwargs):
                return getattr(module, fn), fixed
            passed = passed or getattr(module, fn)
    if passed is not None:
        return passed, fixed
    raise BackendError(f"no {op} backend can run this call on {device}; tried {list(order)}")


@contextlib.contextmanager
def use_backend(**choice: str) -> Iterator[None]:
    """Choose backends for the enclosed code: ``with use_backend(attention="sdpa"): ...``."""
    for op, name in choice.items():
        _check_choice(op, name)
        _preload(op, name)
    _overrides.append(dict(choice))
    _selection_changed()
    try:
        yield
    finally:
        _overrides.pop()
        _selection_changed()


def _preload(op: str, name: str) -> None:
    """Import the backend modules this choice may use now, outside any traced code:
    ``torch.compile(fullgraph=True)`` cannot trace an import at the first kernel call."""
    if name != "auto":
        _load(op, name)  # a named backend that is not installed fails here, early
        return
    for candidate in dict.fromkeys(c for order in AUTO_ORDER[op].values() for c in order):
        try:
            _load(op, candidate)
        except BackendError:
            pass  # auto skips what is not installed


def available_backends(op: str, device: str | torch.device = "cpu") -> list[str]:
    """Backends of ``op`` whose packages are installed and that can run on ``device``.

    Checked with a small fp32 probe call's arguments; a backend may still refuse a
    particular call (a head dim it does not support, say).
    """
    _check_choice(op, "auto")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return []
    names = []
    for name in REGISTRY[op]:
        try:
            module = _load(op, name)
        except BackendError:
            continue
        args, kwargs = _probe_args(op, device)
        if _why_not(module, op, OPS[op][0], args, kwargs) is None:
            names.append(name)
    return names


def _probe_args(op: str, device: torch.device) -> tuple[tuple, dict]:
    meta = dict(device=device, dtype=torch.float32)
    if op == "attention":
        q = torch.empty(1, 1, 1, 64, **meta)
        return (q, q, q), dict(causal=True, dropout_p=0.0, scale=0.125)
    if op == "linear_cross_entropy":
        h = torch.empty(1, 64, **meta)
        return (h, h, torch.zeros(1, dtype=torch.long, device=device)), dict(ignore_index=-100, reduction="mean")
    x = torch.empty(1, 64, **meta)
    return (x, x[0], x[0]), dict(eps=1e-5)


# The PyTorch backends are cheap to import and are what ``auto`` runs on the CPU.
for _op, _name in (
    ("attention", "torch"), ("attention", "sdpa"), ("layer_norm", "torch"),
    ("linear_cross_entropy", "torch"), ("linear_cross_entropy", "chunked"),
):
    _load(_op, _name)
