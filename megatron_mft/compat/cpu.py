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

It also skips collectives on single-rank process groups (:func:`_skip_single_rank_collectives`):
megatron issues them unconditionally (~11 per step at TP=DP=1: vocab-parallel CE, grad norm,
the distributed optimizer's grad reduce-scatter and param all-gather) and gloo runs each through
its worker thread, ~20 us idle but milliseconds when the cores are loaded; over one rank every
such collective is the identity, so skipping it changes no number.

The mode costs ~3 us per Python-level torch call, so it is popped where a step holds no CUDA
literal (:func:`_pause_mode_where_no_cuda_literal`): megatron's per-micro-batch forward/backward
of dense models and the optimizers' update; ~440 of ~2,100 calls a step still go through it.

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


_IDENTITY_OPS = {"SUM", "AVG", "MAX", "MIN", "PRODUCT", "BAND", "BOR", "BXOR"}


def _alone(group) -> bool:
    """True when ``group`` (None = the default group) holds this rank only, and no coalescing
    manager is collecting ops for it (that one expects every op it sees to run)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if group is None:
        if not dist.is_initialized():
            return False
        group = c10d._get_default_group()
    return (isinstance(group, dist.ProcessGroup) and group.size() == 1
            and group not in c10d._world.pg_coalesce_state)


def _identity_op(op) -> bool:
    return str(op).rsplit(".", 1)[-1] in _IDENTITY_OPS  # not PREMUL_SUM: it scales


def _skip_single_rank_collectives() -> None:
    """Synchronous collectives over a one-rank group return without entering gloo (exact: a
    reduction over one rank is its input, an all-gather/reduce-scatter over one rank a copy);
    megatron's DDP bucket groups skip their grad reduce-scatter/all-reduce and param all-gather
    over one rank (the shard is the whole buffer). Asynchronous calls, coalesced calls and
    groups of two or more ranks go to torch.distributed unchanged."""
    import torch.distributed as dist
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup as BucketGroup

    all_reduce, broadcast = dist.all_reduce, dist.broadcast
    all_gather, reduce_scatter = dist.all_gather_into_tensor, dist.reduce_scatter_tensor

    def all_reduce_(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not async_op and _identity_op(op) and _alone(group):
            return None
        return all_reduce(tensor, op=op, group=group, async_op=async_op)

    def broadcast_(tensor, src=None, group=None, async_op=False, **kw):
        if not async_op and _alone(group):
            return None
        return broadcast(tensor, src, group=group, async_op=async_op, **kw)

    def all_gather_(output_tensor, input_tensor, group=None, async_op=False):
        if not async_op and _alone(group):
            if output_tensor.data_ptr() != input_tensor.data_ptr():
                output_tensor.copy_(input_tensor.reshape(output_tensor.shape))
            return None
        return all_gather(output_tensor, input_tensor, group=group, async_op=async_op)

    def reduce_scatter_(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not async_op and _identity_op(op) and _alone(group):
            if output.data_ptr() != input.data_ptr():
                output.copy_(input.reshape(output.shape))
            return None
        return reduce_scatter(output, input, op=op, group=group, async_op=async_op)

    dist.all_reduce, dist.broadcast = all_reduce_, broadcast_
    dist.all_gather_into_tensor, dist.reduce_scatter_tensor = all_gather_, reduce_scatter_

    def bucket_group_alone(self) -> bool:
        group = (self.intra_distributed_optimizer_instance_group if self.ddp_config.use_distributed_optimizer
                 else self.data_parallel_group)
        return self.ddp_config.num_distributed_optimizer_instances == 1 and _alone(group)

    start_param_sync, start_grad_sync = BucketGroup.start_param_sync, BucketGroup.start_grad_sync

    def start_param_sync_(self, force_sync: bool = False):
        if not bucket_group_alone(self):
            return start_param_sync(self, force_sync)
        self.param_gather_handle = None  # the one rank's shard is the whole param buffer
        self.param_gather_dispatched = True

    def start_grad_sync_(self, force_all_reduce: bool = False):
        if not bucket_group_alone(self):
            return start_grad_sync(self, force_all_reduce)
        if self.is_first_batch and self.grad_reduce_handle is not None:
            return
        cfg = self.ddp_config
        if cfg.check_for_nan_in_grad or cfg.check_for_large_grads:
            self.check_grads(check_for_nan_or_inf=cfg.check_for_nan_in_grad,
                             check_for_large=cfg.check_for_large_grads)
        for bucket in self.buckets:  # what megatron does before the (identity) reduction
            if bucket.gradient_scaling_factor != 1.0:
                bucket.grad_data *= bucket.gradient_scaling_factor
        self.grad_reduce_handle = None

    BucketGroup.start_param_sync, BucketGroup.start_grad_sync = start_param_sync_, start_grad_sync_


#: pause the function mode where a step holds no CUDA literal (_pause_mode_where_no_cuda_literal;
#: a switch for paired measurements: tools/bench/engine_parts.py)
pause_mode = True


def _mode_on_top() -> bool:
    n = torch._C._len_torch_function_stack()
    return n > 0 and torch._C._get_function_stack_at(n - 1) is _mode


@contextlib.contextmanager
def _mode_paused():
    """Run the block without the function mode (every torch call then skips ~3 us of Python)."""
    torch._C._pop_torch_function_stack()
    try:
        yield
    finally:
        torch._C._push_on_torch_function_stack(_mode)


def _paused_when(step, dense_only: bool):
    """``step`` run without the function mode (when on, on the CPU, and on top of the stack);
    ``dense_only``: not for MoE models nor context parallelism (read from the step's ``config``
    argument): megatron's router allocates on ``device="cuda"`` and, at CP > 1, RoPE builds its CP
    slice with ``torch.tensor(..., pin_memory=True).cuda()`` (``rope_utils.get_pos_emb_on_this_cp_rank``)."""
    import inspect

    at = list(inspect.signature(step).parameters).index("config") if dense_only else -1

    def run(*args, **kwargs):
        if not pause_mode or _target != _CPU or not _mode_on_top():
            return step(*args, **kwargs)
        if dense_only:
            config = kwargs["config"] if "config" in kwargs else args[at]
            if getattr(config, "num_moe_experts", None) or (getattr(config, "context_parallel_size", 1) or 1) > 1:
                return step(*args, **kwargs)
        with _mode_paused():
            return step(*args, **kwargs)

    run.__wrapped__ = step
    return run


def _pause_mode_where_no_cuda_literal() -> None:
    """The mode intercepts every Python-level torch call (~2,100 per step on the tiny preset at
    TP=PP=1, ~3 us each), but most of a step holds no CUDA literal. Popped there:

    * megatron's per-micro-batch ``forward_step`` / ``backward_step`` of a dense model (the model,
      this package's model and loss code, autograd, DDP's grad hooks): in megatron-core 0.16.1
      their allocations use ``torch.cuda.current_device()``, patched to the CPU. Not for MoE
      models: the aux-loss tracker allocates on ``device="cuda"`` inside the router's forward; not
      at CP > 1: RoPE's CP slice is built with ``.cuda()`` (unpacked rows, forward).
    * the megatron optimizers' ``zero_grad`` / ``prepare_grads`` / ``step_with_ready_grads``
      (grad and param copies, torch's AdamW, the param all-gather; their CUDA literals are in
      ``__init__`` and checkpoint loading).

    What still needs the mode stays under it: the schedules' ``torch.zeros(device="cuda")``, the
    grad norm and clipping (``param.grad.type()`` checks, ``device="cuda"`` buffers), model
    building, checkpointing. Never in the device-placement test mode (its redirects are the point)."""
    from megatron.core.optimizer import distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import schedules

    schedules.forward_step = _paused_when(schedules.forward_step, dense_only=True)
    schedules.backward_step = _paused_when(schedules.backward_step, dense_only=True)
    for cls in (optimizer.MegatronOptimizer, optimizer.MixedPrecisionOptimizer,
                optimizer.Float16OptimizerWithFloat16Params, optimizer.FP32Optimizer, optimizer.ChainedOptimizer,
                distrib_optimizer.DistributedOptimizer):
        for name in ("zero_grad", "prepare_grads", "step_with_ready_grads"):
            if name in cls.__dict__:
                setattr(cls, name, _paused_when(cls.__dict__[name], dense_only=False))


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
        _skip_single_rank_collectives()
        _mode = _CudaToCpuMode()
        _mode.__enter__()
        _pause_mode_where_no_cuda_literal()
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
