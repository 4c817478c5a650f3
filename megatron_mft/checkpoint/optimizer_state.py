"""The distributed optimizer's checkpoint state in one layout-independent form.

megatron-core keeps MoE expert parameters in their own optimizer when the experts are split
over expert-parallel ranks (``allreduce=False``): at EP=1 the model has one distributed
optimizer, at EP>1 a ``ChainedOptimizer`` of two (dense, expert). Its ``sharded_state_dict``
mirrors that: one optimizer's dict at EP=1, ``{0: dense, 1: expert}`` with ``chained_0.`` /
``chained_1.`` key prefixes at EP=2, and per-optimizer parameter groups (told apart by
``is_expert_parallel``) in the common state. A checkpoint saved at one EP size therefore did not
load at another ("Different dict keys ... ([0, 1]) vs (['param_state'])" in megatron's
``apply_factory_merges``), although every per-parameter tensor is already canonical in the
``fully_reshardable`` format: named by the model tensor's global key, with the expert axis.

So the checkpoint holds only what is layout-free:

* ``param_state``: every sub-optimizer's ``fully_reshardable`` per-parameter tensors
  (``optimizer.state.{exp_avg,exp_avg_sq,...}.<model key>``, no ``chained_`` prefix) under
  rank-local keys ``"<sub-optimizer>.<param>"`` (dict keys are not part of the checkpoint; only
  the tensor keys are);
* ``step``: Adam's step count (the same for every parameter);
* ``grad_scaler``: the loss scaler's state where one exists (fp16).

Saving gathers each optimizer's state to its data-parallel rank 0 only, over megatron's gloo
groups in host memory (``distrib_optim_fully_reshardable_mem_efficient``). megatron's default for
this format all-gathers the whole state to every rank over NCCL: with one gradient bucket
(``overlap_grad_reduce`` off), a GPU receive buffer of 4 bytes per parameter of the chunk plus a
12-byte host copy on every rank, at every save (a 7B full fine-tune at DP=8: 28 GB more GPU memory
at the first checkpoint). Only DP rank 0's copy was ever written.

Parameter-group hyper-parameters are not stored: they come from the run's config and the LR
scheduler, which is restored from the common state and sets lr / weight decay on load. The
non-distributed optimizer (``parallel.distributed_optimizer: false``) keeps megatron's own
format, which reshards over TP/PP/DP but not between EP sizes.
"""

from __future__ import annotations

from typing import Any

SHARDING_TYPE = "fully_reshardable"
FORMAT = "mft-layout-free-1"
#: Canonical per-parameter layout (megatron's 'fully_reshardable'), without the chained-optimizer
#: key prefix, so the tensor keys do not depend on how megatron groups the parameters.
#: ``..._mem_efficient``: gathered on DP rank 0 only, by gloo (module docstring).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": SHARDING_TYPE, "chained_optim_avoid_prefix": True,
                      "distrib_optim_fully_reshardable_mem_efficient": True}


def _subs(optimizer) -> list:
    """The sub-optimizers that hold parameters on this rank."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [(i, o) for i, o in enumerate(subs) if getattr(o, "optimizer", None) is not None]


def _canonical(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = _subs(optimizer)
    return bool(subs) and all(isinstance(o, DistributedOptimizer) for _, o in subs)


def _step(sub) -> Any:
    groups = sub.state_dict()["optimizer"]["param_groups"]
    steps = {g["step"] for g in groups if g.get("step") is not None}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameter groups disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else None


def optimizer_sharded_state(optimizer, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
    """The optimizer's part of a checkpoint (also the load template when ``is_loading``)."""
    if not _canonical(optimizer):
        return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                            metadata=OPTIMIZER_METADATA)
    if hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()
    param_state, step, scaler = {}, None, None
    for i, sub in _subs(optimizer):
        sd = sub.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
        for j, tensors in (sd["param_state"] or {}).items():
            param_state[f"{i}.{j}"] = tensors
        step = _step(sub) if step is None else step
        if scaler is None and sd.get("grad_scaler") is not None:
            scaler = sd["grad_scaler"]
    out = {"format": FORMAT, "step": step}
    if param_state:  # DP ranks > 0 save none (gathered on DP rank 0); an empty dict would differ in the common state
        out["param_state"] = param_state
    if scaler is not None:
        out["grad_scaler"] = scaler
    return out


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load what :func:`optimizer_sharded_state` saved (``state``: the loaded optimizer part)."""
    if not _canonical(optimizer):
        optimizer.load_state_dict(state)
        return
    step = state["step"] if state.get("format") == FORMAT else _legacy_step(state)
    loaded = state["param_state"]
    for i, sub in _subs(optimizer):
        sd = sub.state_dict()  # this layout's parameter groups; the checkpoint gives the step
        for group in sd["optimizer"]["param_groups"]:
            group["step"] = step
        prefix = f"{i}."
        sd["param_state"] = {int(k[len(prefix):]): v for k, v in loaded.items() if k.startswith(prefix)}
        sd["param_state_sharding_type"] = SHARDING_TYPE
        if "grad_scaler" in state and getattr(sub, "grad_scaler", None) is not None:
            sd["grad_scaler"] = state["grad_scaler"]
        sub.load_state_dict(sd)
    if hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()


def _legacy_step(state: dict) -> Any:
    """The step of a checkpoint written before this format by a single distributed optimizer
    (dense models: its tensor keys are the same, its parameter groups carry the step)."""
    groups = (state.get("optimizer") or {}).get("param_groups") if isinstance(state.get("optimizer"), dict) else None
    steps = {g.get("step") for g in groups or []} - {None}
    if len(steps) != 1:
        raise RuntimeError("the checkpoint's optimizer state is in megatron's chained-optimizer format (written "
                           "before the layout-independent one), which this version does not read: start from its "
                           "weights only (train.init_checkpoint)")
    return steps.pop()


def is_chained_legacy(optimizer_common: object) -> bool:
    """A checkpoint written before the layout-free format by megatron's chained optimizer (MoE at
    EP > 1: dense and expert optimizers, keys 0, 1 ...): its tensor keys carry ``chained_N.``
    prefixes, which the layout-free load does not read."""
    return isinstance(optimizer_common, dict) and "format" not in optimizer_common \
        and "optimizer" not in optimizer_common and bool(optimizer_common)

