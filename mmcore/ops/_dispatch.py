"""Declarative backend dispatch (DESIGN.md, "Rules that keep it simple").

Each op lists its backends in default order -- Triton/CUDA, then the C++ CPU kernels, then the PyTorch
reference. A backend declares the devices and dtypes it runs on, whether it can run on this machine at
all, and optionally a per-call check (head dims, modes, ...). The op runs the first backend that fits.
``backend=`` or the environment variable ``MMCORE_BACKEND`` forces one; a forced backend that cannot run
raises :class:`BackendError` with the reason, and nothing ever falls back silently.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mmcore import _extension

# Default order. flash_attn and xformers are optional peers some ops can dispatch to when they are installed;
# they follow mmcore's own GPU kernels until GPU measurements say otherwise.
BACKENDS = ("triton", "cuda", "flash_attn", "xformers", "cpp", "torch")
ENV_VAR = "MMCORE_BACKEND"


class BackendError(RuntimeError):
    """No backend can run a call, or the forced one cannot."""


class ArgumentTypeError(TypeError, ValueError):
    """An op's argument of the wrong type or dtype. A TypeError as Python has it, and a ValueError too, so that
    ``except ValueError`` catches every bad argument an op in ``mmcore.ops`` rejects (numpy's AxisError is both a
    ValueError and an IndexError in the same way)."""


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``), as the tests do."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    return None


def _needs_triton(device_type: str) -> str | None:
    missing = _triton_missing()
    if missing:
        return missing
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device_type == "cpu":
        return None if triton_interpret() else "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return f"Triton does not run on {device_type} tensors"


def _needs_cpp(device_type: str) -> str | None:
    return _extension.C_ERROR


def _needs_cuda_build(device_type: str) -> str | None:
    if _extension.C_ERROR:
        return _extension.C_ERROR
    if not _extension.cuda_built():
        return "mmcore._C was built without CUDA (CPU torch, no CUDA toolkit, or MMCORE_SKIP_CUDA_BUILD=1)"
    return None if torch.cuda.is_available() else "no CUDA device"


def _needs_package(name: str, device_type: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return f"{name} is not installed (an optional extra)"
    return None if torch.cuda.is_available() else "no CUDA device"


_NEEDS: dict[str, Callable[[str], str | None]] = {
    "triton": _needs_triton,
    "cuda": _needs_cuda_build,
    "cpp": _needs_cpp,
    "flash_attn": lambda device_type: _needs_package("flash_attn", device_type),
    "xformers": lambda device_type: _needs_package("xformers", device_type),
    "torch": lambda device_type: None,
}


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    name: one of BACKENDS. fn: called with the op's arguments. devices: device types it runs on.
    dtypes: the input dtypes it takes (None: any). check: optional per-call test returning why these
    arguments are unsupported, or None. auto_on_cpu: whether default dispatch may pick it for CPU tensors
    (False for Triton, whose CPU path is the interpreter). needs: optional test of this machine beyond the
    backend kind's own (e.g. that the extension has a kernel for this op), returning why not, or None.
    """

    name: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None = None
    check: Callable[..., str | None] | None = None
    auto_on_cpu: bool = True
    needs: Callable[[str], str | None] | None = None

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise ValueError(f"unknown backend {self.name!r}; expected one of {BACKENDS}")

    def unavailable(self, device_type: str) -> str | None:
        """Why this backend cannot run on this machine for ``device_type`` tensors, or None."""
        missing = _NEEDS[self.name](device_type)
        if missing is None and self.needs is not None:
            missing = self.needs(device_type)
        return missing

    def why_not(self, device_type: str, dtype: torch.dtype | None, args: tuple, kwargs: dict) -> str | None:
        """None when this backend can run this call here, else the reason it cannot."""
        if device_type not in self.devices:
            return f"runs on {'/'.join(self.devices)} tensors, not {device_type}"
        missing = self.unavailable(device_type)
        if missing:
            return missing
        if self.dtypes is not None and dtype is not None and dtype not in self.dtypes:
            return f"does not take {dtype} (takes {', '.join(str(d) for d in self.dtypes)})"
        if self.check is not None:
            return self.check(*args, **kwargs)
        return None


_OPS: dict[str, Op] = {}


class Op:
    """An op with ordered backends. ``op(device_type, dtype, *args, backend=None, **kwargs)`` dispatches."""

    def __init__(self, name: str, backends: Sequence[Backend]):
        order = [b.name for b in backends]
        if order != sorted(order, key=BACKENDS.index) or len(set(order)) != len(order):
            raise ValueError(f"op {name!r}: backends must be unique and in the order {BACKENDS}, got {order}")
        self.name = name
        self.backends = {b.name: b for b in backends}
        if name in _OPS:
            raise ValueError(f"op {name!r} is already declared")
        _OPS[name] = self

    def select(
        self,
        device_type: str,
        dtype: torch.dtype | None,
        args: tuple = (),
        kwargs: dict | None = None,
        backend: str | None = None,
    ) -> Backend:
        kwargs = kwargs or {}
        forced = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
        if forced is not None:
            source = "backend=" if backend is not None else f"{ENV_VAR}="
            if forced not in BACKENDS:
                raise ValueError(f"{source}{forced!r} is not a backend; expected one of {BACKENDS}")
            chosen = self.backends.get(forced)
            if chosen is None:
                raise BackendError(
                    f"{source}{forced!r} was forced, but op {self.name!r} has no {forced!r} backend "
                    f"(it has: {', '.join(self.backends)})"
                )
            reason = chosen.why_not(device_type, dtype, args, kwargs)
            if reason:
                raise BackendError(f"{source}{forced!r} was forced, but it cannot run op {self.name!r} here: {reason}")
            return chosen
        reasons = []
        for b in self.backends.values():
            if device_type == "cpu" and not b.auto_on_cpu:
                reasons.append(f"{b.name}: not chosen by default for CPU tensors (force it with backend=)")
                continue
            reason = b.why_not(device_type, dtype, args, kwargs)
            if reason is None:
                return b
            reasons.append(f"{b.name}: {reason}")
        raise BackendError(
            f"no backend can run op {self.name!r} on {device_type} ({dtype}):\n  " + "\n  ".join(reasons)
        )

    def __call__(self, device_type: str, dtype: torch.dtype | None, *args, backend: str | None = None, **kwargs):
        return self.select(device_type, dtype, args, kwargs, backend).fn(*args, **kwargs)

    def available(self, device_type: str) -> list[str]:
        """Backends that can run on this machine for ``device_type`` tensors (ignoring per-call checks)."""
        return [
            b.name for b in self.backends.values() if device_type in b.devices and b.unavailable(device_type) is None
        ]


def extension_kernel(op_name: str) -> Callable[[str], str | None]:
    """A ``needs`` test: the extension registered a kernel for ``mmcore::<op_name>`` on that device.

    Looked up once, when the op is declared (the extension is loaded by then), so that dispatch stays plain
    Python that torch.compile traces without graph breaks."""
    registered = {
        device: torch._C._dispatch_has_kernel_for_dispatch_key(f"mmcore::{op_name}", key)
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    }

    def needs(device_type: str) -> str | None:
        if registered.get(device_type, False):
            return None
        return f"mmcore._C has no {device_type} kernel for {op_name} (rebuild: pip install --no-build-isolation -e .)"

    return needs


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_backends(op_name: str, device: str | torch.device | None = None) -> list[str]:
    """The backends among ``BACKENDS`` that can run ``op_name`` here, in default order, for tensors on ``device``
    (default: ``cuda`` when a GPU is visible, else ``cpu``); ``"flash_attn"`` and ``"xformers"`` only where those
    packages are installed and can run on the GPU. On CPU,
    ``"triton"`` appears only under ``TRITON_INTERPRET=1``, and default dispatch still never picks it."""
    if op_name not in _OPS:
        raise ValueError(f"unknown op {op_name!r}; mmcore ops: {', '.join(sorted(_OPS))}")
    device_type = torch.device(device).type if device is not None else default_device_type()
    return _OPS[op_name].available(device_type)


def ops() -> dict[str, Op]:
    """All declared ops by name."""
    return dict(_OPS)
