"""LoRA on megatron-core's tensor-parallel linears, by composition.

``LoraColumnParallelLinear`` / ``LoraRowParallelLinear`` *are* megatron's
``ColumnParallelLinear`` / ``RowParallelLinear`` (subclasses: same constructor arguments, same
``weight`` and sharding, same ``(output, bias)`` forward), plus a low-rank branch::

    y = base(x) + scaling * B(A(dropout(x)))      scaling = alpha / r  (rsLoRA: alpha / sqrt(r))

PEFT swaps them into a layer spec's linear slots (``megatron_mft.peft.plan``); nothing else in
the model changes.

Naming (the Hugging Face export relies on it): ``<path>.weight`` is the base weight (shape and
sharding of megatron's layer), ``<path>.lora_A.weight`` is ``[r, in(_shard)]`` and
``<path>.lora_B.weight`` is ``[out(_shard), r]``.

Sharding and communication (t = tensor-parallel size, s = sequence, SP = sequence parallel):

==========  ====================  ====================  =============================================
layer       A                     B                     branch communication
==========  ====================  ====================  =============================================
column      replicated [r, in]    split dim 0           no SP: copy-to-TP on h=A(x) (bwd all-reduce);
                                  [out/t, r]            SP: A on the local sequence shard, then
                                                        all-gather h [s, b, r] (bwd reduce-scatter)
row         split dim 1           replicated [out, r]   no SP: all-reduce h (bwd identity);
            [r, in/t]                                   SP: reduce-scatter h along s (bwd all-gather)
==========  ====================  ====================  =============================================

Communication is on the rank-r activation ``h``, never on the hidden-size input. Gradients of
the replicated adapter are identical on every TP rank without SP; with SP they are partial sums
over sequence shards, so that weight is marked ``sequence_parallel`` and megatron's
``finalize_model_grads`` all-reduces it over the TP group (as for the norms).

MoE: the same classes sit in every routed expert's fc1/fc2 (megatron's SequentialMLP builds them
with ``is_expert``; megatron's token dispatcher moves the tokens, so with expert TP 1 the branch
needs no communication) and in the shared expert; under expert parallelism an expert's adapters
are reduced over the expert-data-parallel group (``allreduce=False``, as megatron marks the
expert weights). Expert TP > 1 is refused.

QLoRA: with ``quantize=True`` the frozen base weight shard is kept as :class:`NF4Weight` in the
``weight`` slot and megatron's forward runs unchanged except for the matmul
(``_forward_impl``), which dequantises on the fly.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from typing import Optional

import torch
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                  set_tensor_model_parallel_attributes)
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region,
                                                    gather_from_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region,
                                                    scatter_to_tensor_model_parallel_region)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_mft.peft.nf4 import NF4Weight, nf4_linear

_init_counter = itertools.count()



def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * B @ A in fp32: the one merge delta, for training-time merges and HF export."""
    return (b.float() @ a.float()) * scaling


def merged_weight(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """base + delta summed in fp32, rounded once to ``dtype``."""
    return (base.float() + delta).to(dtype)

class AdapterWeight(torch.nn.Module):
    """Holds one adapter matrix as ``.weight`` so its name is ``<path>.lora_A.weight``."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(rows, cols, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}"


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class _LoraMixin:
    """Adapter logic shared by the column- and row-parallel classes (placed before the megatron
    class in the MRO, so ``super()`` is the megatron layer)."""

    #: dim of the base weight split over TP (0 column, 1 row); which adapter is split, and its dim
    _base_axis: int
    _split_adapter: str
    _split_axis: int
    #: True inside ``adapters_disabled(chunks)``: the layer is its base (the DPO reference model)
    disabled: bool = False

    # ------------------------------------------------------------------ construction
    def _setup_lora(self, *, in_local: int, out_local: int, in_full: int, rank: int, alpha: float,
                    dropout: float, rslora: bool, quantize: bool) -> None:
        if self.is_expert and get_pg_size(self.tp_group) > 1:
            # megatron's token dispatcher does an expert linear's tensor-parallel communication
            # (explicit_expert_comm), which an adapter branch would have to join: not done
            raise NotImplementedError("LoRA on MoE experts with expert tensor parallelism (parallel.etp > 1) is not "
                                      "supported; use parallel.etp: 1")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        cfg = self.config
        device = None if cfg.use_cpu_initialization else torch.cuda.current_device()
        self.rank = rank
        self.alpha = float(alpha)
        self.rslora = bool(rslora)
        self.scaling = lora_scaling(rank, alpha, rslora)
        self.in_features_full = in_full
        self.lora_A = AdapterWeight(rank, in_local, cfg.params_dtype, device)
        self.lora_B = AdapterWeight(out_local, rank, cfg.params_dtype, device)
        self.lora_dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.merged = False
        self._nf4: Optional[NF4Weight] = None
        self._original_weight: Optional[torch.Tensor] = None
        #: loaders set this so sharded_state_dict offers a real (empty) dense tensor to load into
        self.dense_weight_template = False
        split = getattr(self, self._split_adapter).weight
        repl = getattr(self, "lora_B" if self._split_adapter == "lora_A" else "lora_A").weight
        set_tensor_model_parallel_attributes(split, True, self._split_axis, 1)
        # reduced over data parallelism like the base weight: a routed expert's adapters under
        # expert parallelism (each EP rank holds its own experts') over the expert-DP group only
        dp_reduce = not (self.is_expert and self.expert_parallel)
        for p in (split, repl):
            p.allreduce = dp_reduce
        # Replicated adapter under SP: its gradient is a partial sum over sequence shards.
        repl.sequence_parallel = bool(self.sequence_parallel)
        seed = (torch.initial_seed() * 1_000_003 + next(_init_counter)) % (2**63)
        self.reset_adapters(torch.Generator().manual_seed(seed))
        if quantize:
            self.quantize_base_()

    def reset_adapters(self, generator: torch.Generator) -> None:
        """A: kaiming-uniform (a=sqrt(5), peft's default) drawn as the *full* [r, in] matrix on
        the CPU from ``generator`` and then sliced, so every TP layout gets the same values;
        B: zeros (the adapter starts as the identity)."""
        bound = 1.0 / math.sqrt(self.in_features_full)
        full = torch.empty(self.rank, self.in_features_full, dtype=torch.float32)
        full.uniform_(-bound, bound, generator=generator)
        a = self.lora_A.weight
        if self._split_adapter == "lora_A":
            n = a.shape[1]
            r = get_pg_rank(self.tp_group)
            full = full[:, r * n:(r + 1) * n]
        with torch.no_grad():
            a.copy_(full.to(a.dtype))
            self.lora_B.weight.zero_()

    # ------------------------------------------------------------------ base weight storage
    @property
    def quantized(self) -> bool:
        return self._nf4 is not None

    def base_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense base weight shard (dequantised for QLoRA; merged value while merged)."""
        w = self.weight
        if isinstance(w, NF4Weight):
            return w.dequantize(dtype)
        return w.detach() if dtype is None else w.detach().to(dtype)

    def quantize_base_(self, dense: Optional[torch.Tensor] = None) -> None:
        """Store the base weight shard as NF4 (from ``dense``, or from the current dense weight)
        and free the dense copy. Re-quantises when already quantised."""
        if self.merged:
            raise RuntimeError("unmerge adapters before quantising the base weight")
        if dense is None:
            if not isinstance(self.weight, torch.nn.Parameter):
                return
            dense = self.weight.detach()
        shape = self._base_shape()
        if tuple(dense.shape) != tuple(shape):
            raise ValueError(f"base weight shard has shape {tuple(dense.shape)}, expected {tuple(shape)}")
        dtype = self.config.params_dtype
        device = self.lora_A.weight.device
        nf4 = NF4Weight.quantize(dense.to(device=device, dtype=dtype))
        if "weight" in self._parameters:
            del self._parameters["weight"]
        self.__dict__.pop("master_weight", None)
        self._nf4 = nf4
        self.__dict__["weight"] = nf4

    def dequantize_base_(self) -> None:
        """Turn the NF4 base back into a dense frozen Parameter (same values as the forward uses)."""
        if not self.quantized or self.merged:
            return
        dense = self._nf4.dequantize()
        self._nf4 = None
        self.__dict__.pop("weight", None)
        self._set_dense_weight(dense)

    def _set_dense_weight(self, dense: torch.Tensor) -> None:
        self.__dict__.pop("weight", None)
        p = torch.nn.Parameter(dense, requires_grad=False)
        set_tensor_model_parallel_attributes(p, True, self._base_axis, 1)
        p.allreduce = not (self.is_expert and self.expert_parallel)
        self.weight = p

    def _base_shape(self) -> torch.Size:
        if isinstance(self, ColumnParallelLinear):
            return torch.Size([self.output_size_per_partition, self.input_size])
        return torch.Size([self.output_size, self.input_size_per_partition])

    # ------------------------------------------------------------------ merge
    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A for this shard, in fp32 (local: no communication for either layer)."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def merge_(self, keep_original: bool = False) -> None:
        """Fold the adapter into the base weight shard (fp32 arithmetic). QLoRA: the merged weight
        becomes a dense Parameter; the NF4 codes are kept, so un-merging restores them exactly.
        ``keep_original`` keeps a copy of a dense base so un-merging is bit-exact too."""
        if self.merged:
            return
        delta = self.delta_weight()
        with torch.no_grad():
            if self.quantized:
                self._set_dense_weight(merged_weight(self._nf4.dequantize(torch.float32), delta, self._nf4.dtype))
            else:
                w = self.weight
                if keep_original:
                    self._original_weight = w.detach().clone()
                w.copy_(merged_weight(w, delta, w.dtype))
        self.merged = True

    def unmerge_(self) -> None:
        """Undo :meth:`merge_`."""
        if not self.merged:
            return
        with torch.no_grad():
            if self.quantized:
                del self._parameters["weight"]
                self.__dict__["weight"] = self._nf4
            elif self._original_weight is not None:
                self.weight.copy_(self._original_weight)
                self._original_weight = None
            else:
                w = self.weight
                w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    # ------------------------------------------------------------------ forward
    def _forward_impl(self, input, weight, *args, **kwargs):
        if isinstance(weight, NF4Weight):
            return nf4_linear(input, weight, kwargs.get("bias"), allreduce_dgrad=kwargs.get("allreduce_dgrad", False),
                              sequence_parallel=kwargs.get("sequence_parallel", False),
                              tp_group=kwargs.get("tp_group"))
        return super()._forward_impl(input, weight, *args, **kwargs)

    def _dropout(self, x: torch.Tensor, tp_distinct: bool) -> torch.Tensor:
        """Dropout on the adapter input. Where the input differs across TP ranks (row-parallel
        shards, SP sequence shards), draw from megatron's model-parallel RNG like its other
        sharded-region dropouts; where it is replicated, from the default RNG shared by TP ranks."""
        if isinstance(self.lora_dropout, torch.nn.Identity) or not self.training:
            return x
        if tp_distinct:
            with get_cuda_rng_tracker().fork():
                return self.lora_dropout(x)
        return self.lora_dropout(x)

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Base weight TP-split as in megatron; the split adapter along its axis; the replicated
        one as a replicated ShardedTensor; so adapter checkpoints reshard across TP/PP.

        A quantised (un-merged) base weight appears as a shape-only entry (meta tensor): adapter
        checkpoints drop it, and :func:`megatron_mft.peft.layerwise.base_templates` switches on
        ``dense_weight_template`` to receive dense weights into it."""
        sd = {}
        w = self.weight
        if isinstance(w, NF4Weight):
            dev = w.device if self.dense_weight_template else "meta"
            sd["weight"] = torch.empty(w.shape, dtype=w.dtype, device=dev)
        else:
            sd["weight"] = w
        if self.bias is not None:
            sd["bias"] = self.bias
        sd["lora_A.weight"] = self.lora_A.weight
        sd["lora_B.weight"] = self.lora_B.weight
        sd["_extra_state"] = self.get_extra_state()
        axes = {"weight": self._base_axis, f"{self._split_adapter}.weight": self._split_axis}
        if self._base_axis == 0:
            axes["bias"] = 0
        out = make_sharded_tensors_for_checkpoint(sd, prefix, axes, sharded_offsets, tp_group=self.tp_group,
                                                  dp_cp_group=(metadata or {}).get("dp_cp_group"))
        if getattr(self, "fused_gate_up", False):
            # SwiGLU fc1: each TP rank holds [gate_r; up_r] rows. megatron's MLP re-maps `weight`
            # so the checkpoint holds [gate; up]; B's rows follow the same layout.
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            key = f"{prefix}lora_B.weight"
            out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets,
                                                    (metadata or {}).get("singleton_local_shards", False))
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if isinstance(self.weight, NF4Weight):  # plain state_dict(): the dequantised base
            destination[prefix + "weight"] = self.weight.dequantize()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if isinstance(self.weight, NF4Weight) and key in state_dict:
            dense = state_dict.pop(key)  # quantise on arrival; the caller's dense copy can go
            self.quantize_base_(dense)
            del dense
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        q = ", base=NF4" if self.quantized else ""
        return f"lora_rank={self.rank}, scaling={self.scaling:g}{q}{', merged' if self.merged else ''}"


class LoraColumnParallelLinear(_LoraMixin, ColumnParallelLinear):
    """ColumnParallelLinear + LoRA: A replicated [r, in], B split like the output [out/t, r]."""

    _base_axis = 0
    _split_adapter = "lora_B"
    _split_axis = 0

    def __init__(self, input_size: int, output_size: int, *, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, rslora: bool = False, quantize: bool = False, fused_gate_up: bool = False,
                 **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        #: SwiGLU's fused [gate; up] fc1 (set by the spec for the linear_fc1 slot)
        self.fused_gate_up = bool(fused_gate_up and self.config.gated_linear_unit)
        self._setup_lora(in_local=input_size, out_local=self.output_size_per_partition, in_full=input_size,
                         rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, quantize=quantize)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        out, bias = super().forward(input_, weight, runtime_gather_output)
        if self.merged or self.disabled:
            return out, bias
        x = self._dropout(input_, tp_distinct=self.sequence_parallel)
        h = torch.nn.functional.linear(x, self.lora_A.weight)
        if self.sequence_parallel:
            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=self.tp_group)
        elif get_pg_size(self.tp_group) > 1:
            h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        y = torch.nn.functional.linear(h * self.scaling, self.lora_B.weight)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            y = gather_from_tensor_model_parallel_region(y, group=self.tp_group)
        return out + y, bias


class LoraRowParallelLinear(_LoraMixin, RowParallelLinear):
    """RowParallelLinear + LoRA: A split like the input [r, in/t], B replicated [out, r]."""

    _base_axis = 1
    _split_adapter = "lora_A"
    _split_axis = 1

    def __init__(self, input_size: int, output_size: int, *, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, rslora: bool = False, quantize: bool = False, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self._setup_lora(in_local=self.input_size_per_partition, out_local=output_size, in_full=input_size,
                         rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, quantize=quantize)

    def forward(self, input_):
        out, bias = super().forward(input_)
        if self.merged or self.disabled:
            return out, bias
        x = input_ if self.input_is_parallel else scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        x = self._dropout(x, tp_distinct=True)
        h = torch.nn.functional.linear(x, self.lora_A.weight)
        if self.sequence_parallel:
            h = reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
        elif get_pg_size(self.tp_group) > 1:
            h = reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        return out + torch.nn.functional.linear(h * self.scaling, self.lora_B.weight), bias


LORA_LAYERS = (LoraColumnParallelLinear, LoraRowParallelLinear)


@contextmanager
def adapters_disabled(chunks):
    """Run the base model: every LoRA layer of ``chunks`` skips its adapter inside the block
    (the DPO reference with LoRA/QLoRA: the same weights, no second copy). Merged adapters are
    part of the base weight and cannot be switched off: refused."""
    layers = [m for c in chunks for m in c.modules() if isinstance(m, LORA_LAYERS)]
    if any(m.merged for m in layers):
        raise RuntimeError("adapters_disabled: merged adapters are in the base weights; unmerge them first")
    for m in layers:
        m.disabled = True
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.disabled = False
