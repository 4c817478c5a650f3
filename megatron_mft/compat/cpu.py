"""Run megatron-core 0.16 on a CPU-only machine (tests, the demo). Inactive when CUDA exists.

megatron-core hard-codes CUDA in a few ways that no config flag turns off
(see ../shared/docs/megatron-core-on-cpu.md, beside the repository):

* ~150 allocations pass ``device=torch.cuda.current_device()`` or ``device="cuda"``;
  ``.cuda()`` calls move tensors;
* the optimizers and DDP compare ``param.type()`` with ``"torch.cuda.FloatTensor"`` strings;
* the RNG tracker saves/restores CUDA generator states, and attention always forks it;
* schedules and p2p call ``torch.cuda.synchronize()`` and create CUDA streams/events.

``activate()`` redirects exactly these: a ``TorchFunctionMode`` rewrites CUDA device arguments
to CPU and answers ``Tensor.type()`` in CUDA names; ``torch.cuda`` helpers that only
synchronise or query become CPU no-ops; the RNG tracker uses the CPU generator. It is a no-op
when ``torch.cuda.is_available()``, so GPU runs execute megatron-core untouched.

Device-placement test mode (:func:`cuda_redirected_to`): the same redirects, but to a device that
is *not* the CPU (``meta``). A model built under it with ``use_cpu_initialization=False`` holds
on the CPU exactly the tensors that a GPU run would leave on the host, which is the class of
bug a plain CPU run cannot see.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
#: where "CUDA" tensors go: the CPU, or another device in the placement test mode
_target = _CPU
_lock = threading.Lock()
_active = False
_mode: "_CudaToCpuMode | None" = None

_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA device arguments to the target device (CPU); report tensor types with CUDA
    names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _target
        if kwargs.get("pin_memory"):  # megatron pins host tensors before .cuda() (e.g. CP RoPE)
            kwargs["pin_memory"] = False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if name.startswith(f"torch.{_target.type}."):  # placement test mode
                return "torch.cuda." + name[len(f"torch.{_target.type}."):]
            return _TYPE_NAMES.get(name, name)
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _target) + tuple(args[2:])
        if func is torch.Tensor.cuda:
            return args[0] if _target == _CPU else args[0].to(_target)
        return func(*args, **kwargs)


def _cpu_rng_state(*_args, **_kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(state, *_args, **_kwargs):
    torch.set_rng_state(state)


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))


class _NullEvent:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NullStream(_NullEvent):
    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):  # megatron's MoE token dispatcher (DtoH split sizes)
        return _NullEvent()


def _patch_cuda_module() -> None:
    c = torch.cuda
    c.current_device = lambda: _target
    c.synchronize = lambda *a, **k: None
    c.empty_cache = lambda: None
    c.set_device = lambda *a, **k: None
    c.device_count = lambda: 0
    c.Event = _NullEvent
    c.Stream = _NullStream
    c.current_stream = lambda *a, **k: _NullStream()
    c.default_stream = lambda *a, **k: _NullStream()
    c.stream = lambda *a, **k: contextlib.nullcontext()
    c.memory_allocated = lambda *a, **k: 0
    c.max_memory_allocated = lambda *a, **k: 0
    c.reset_peak_memory_stats = lambda *a, **k: None


def activate() -> bool:
    """Apply the CPU redirects once per process; return True when they are (now) active."""
    global _active, _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _active:
            return True
        _patch_cuda_module()
        _patch_rng()
        _mode = _CudaToCpuMode()
        _mode.__enter__()
        _active = True
    return True



@contextlib.contextmanager
def cuda_redirected_to(device: str | torch.device = "meta"):
    """Device-placement test mode: while active, every CUDA allocation and move (megatron's
    ``device=torch.cuda.current_device()``, ``.cuda()``, ``.to("cuda")``) lands on ``device``
    instead of the CPU. Build a model here with ``use_cpu_initialization=False``: anything left
    on the CPU would have stayed on the host on a GPU. Needs the shim active (CPU machine)."""
    global _target
    if not _active:
        raise RuntimeError("cuda_redirected_to needs the CPU shim (activate() on a machine without CUDA)")
    previous, _target = _target, torch.device(device)
    try:
        yield _target
    finally:
        _target = previous
