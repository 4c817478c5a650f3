"""PeftPlan: what the recipe asks of PEFT, in the order it asks.

    plan = PeftPlan(run.peft, env)
    layer = plan.layer_spec(run.model)            # local layer spec with adapter linears swapped in
    chunks = build_model_chunks(..., layer=layer)
    load_model_weights(path, chunks) / hf_init    # QLoRA: quantised layer by layer on arrival
    plan.prepare(chunks)                           # freeze, seed adapters, (quantise), count
    print(plan.memory_report(arch, run))           # trainable share + expected memory per GPU
    ... a few steps ...
    print(plan.peak_memory_line())                 # measured peak
"""

from __future__ import annotations

import hashlib
import logging
import resource
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_mft.peft.layerwise import base_templates, load_group
from megatron_mft.compat import Environment
from megatron_mft.config import ModelConfig, PeftConfig
from megatron_mft.config.presets import ArchSpec
from megatron_mft.peft.layers import LORA_LAYERS, LoraColumnParallelLinear, LoraRowParallelLinear
from megatron_mft.model.builder import resolve_dtype
from megatron_mft.peft.memory import (estimate_memory, fmt_bytes, format_estimate, layer_linears, lora_params,
                                      lora_params_per_layer)
from megatron_mft.peft.nf4 import NF4Weight

log = logging.getLogger(__name__)


def _slots(spec: ModuleSpec) -> dict:
    """target name -> the submodules objects holding that slot in a decoder-layer spec. A dense
    MLP has one fc1/fc2 pair; megatron's MoE layer has one per routed expert (the experts' shared
    MLPSubmodules: each local expert of SequentialMLP builds from it) and one in the shared expert.
    The router is no slot: it stays frozen."""
    attn = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp
    if getattr(mlp.submodules, "experts", None) is not None:  # megatron's MoESubmodules
        experts = mlp.submodules.experts
        if not (isinstance(experts, ModuleSpec) and experts.module is SequentialMLP):
            name = getattr(experts, "module", experts)
            refused = TypeError(f"peft: the MoE experts of this layer spec are {getattr(name, '__name__', name)}; "
                                f"adapters on linear_fc1/linear_fc2 wrap SequentialMLP's per-expert linears (the "
                                f"local layer spec), not TEGroupedMLP's grouped GEMM (PeftPlan.layer_spec builds "
                                f"the local spec)")
            return {"linear_qkv": [attn], "linear_proj": [attn], "linear_fc1": refused, "linear_fc2": refused}
        mlps = [experts.submodules]
        if isinstance(mlp.submodules.shared_experts, ModuleSpec):
            mlps.append(mlp.submodules.shared_experts.submodules)
    else:
        mlps = [mlp.submodules]
    return {"linear_qkv": [attn], "linear_proj": [attn], "linear_fc1": mlps, "linear_fc2": mlps}


def adapter_spec(base: ModuleSpec, cfg: PeftConfig, quantize: bool) -> ModuleSpec:
    """Swap ``cfg.target_modules`` slots of a (local) layer spec for adapter linears; a copy.
    On an MoE layer ``linear_fc1``/``linear_fc2`` mean every routed expert's (one adapter per
    expert) and the shared expert's."""
    import copy

    spec = copy.deepcopy(base)
    slots = _slots(spec)
    params = dict(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora, quantize=quantize)
    for target in cfg.target_modules:
        if isinstance(slots[target], Exception):
            raise slots[target]
        for owner in slots[target]:
            cur = getattr(owner, target)
            cls = cur.module if isinstance(cur, ModuleSpec) else cur
            if cls is ColumnParallelLinear:
                new = LoraColumnParallelLinear
            elif cls is RowParallelLinear:
                new = LoraRowParallelLinear
            else:
                raise TypeError(f"peft: slot {target} holds {cls}, expected megatron's Column/RowParallelLinear "
                                f"(the local layer spec)")
            extra = {"fused_gate_up": True} if target == "linear_fc1" else {}
            setattr(owner, target, ModuleSpec(module=new, params={**params, **extra}))
    return spec


def iter_adapters(chunks) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name within its chunk, module) of every adapter linear."""
    for c in chunks:
        for name, m in c.named_modules():
            if isinstance(m, LORA_LAYERS):
                yield name, m


def global_adapter_names(chunk) -> Iterator[tuple[str, torch.nn.Module]]:
    """(layout-independent name, module): the layer index is the global one (PP/VPP offsets
    applied), e.g. ``decoder.layers.17.mlp.linear_fc1`` on any stage that holds layer 17; a
    routed expert's is ``decoder.layers.17.mlp.experts.5.linear_fc1`` with the global expert
    index (EP offset applied: the canonical checkpoint name) on whichever EP rank holds expert 5."""
    for _, layer in chunk.named_modules():
        if isinstance(layer, TransformerLayer):
            offsets = {}
            for sub, m in layer.named_modules():
                if isinstance(m, SequentialMLP):
                    offsets[f"{sub}.local_experts."] = (f"{sub}.", m.ep_group.rank() * m.num_local_experts)
            for sub, m in layer.named_modules():
                if isinstance(m, LORA_LAYERS):
                    for local, (head, first) in offsets.items():
                        if sub.startswith(local):
                            index, rest = sub[len(local):].split(".", 1)
                            sub = f"{head}{first + int(index)}.{rest}"
                    yield f"decoder.layers.{layer.layer_number - 1}.{sub}", m


def merge_adapters(chunks, keep_original: bool = False) -> int:
    """Fold every adapter into its base weight shard (TP-aware: each rank merges its own shard,
    B_shard @ A or B @ A_shard, with no communication; fp32 arithmetic). QLoRA bases become dense
    merged Parameters (the NF4 codes are kept for un-merging). Returns the number merged."""
    n = 0
    for _, m in iter_adapters(chunks):
        m.merge_(keep_original=keep_original)
        n += 1
    return n


def unmerge_adapters(chunks) -> int:
    """Undo :func:`merge_adapters` (exact for QLoRA and with ``keep_original``; otherwise within
    fp32 rounding of W + d - d)."""
    n = 0
    for _, m in iter_adapters(chunks):
        m.unmerge_()
        n += 1
    return n


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _slice_planner_cls():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
        """Requests exactly the given (key, global offset, destination) slices."""

        def __init__(self, path, items):
            super().__init__()
            self.path = path
            self.items = items
            self.dests = {(key, tuple(offset)): dest for key, offset, dest in items}

        def create_local_plan(self):
            requests = []
            for key, offset, dest in self.items:
                md = self.metadata.state_dict_metadata.get(key)
                if md is None:
                    raise KeyError(f"base checkpoint {self.path} has no tensor {key!r}")
                end = [o + n for o, n in zip(offset, dest.shape)]
                if len(md.size) != len(offset) or any(e > n for e, n in zip(end, md.size)):
                    raise ValueError(f"{key}: checkpoint shape {tuple(md.size)} does not hold the slice at "
                                     f"{tuple(offset)} of shape {tuple(dest.shape)}")
                chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=dest.shape)
                requests += create_read_items_for_chunk_list(key, md, [chunk])
            return LoadPlan(requests)

        def resolve_tensor(self, read_item):
            # detach: destinations may be Parameters; the reader writes into a plain view of them
            dest = self.dests[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))].detach()
            for dim, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                dest = dest.narrow(dim, o, n)
            return dest

        def commit_tensor(self, read_item, tensor):
            pass

    return SlicePlanner


_SLICE_PLANNER = None


def _read_slices(path, items: list) -> None:
    """Read checkpoint slices in place: ``items`` are (key, global offset, destination) with the
    destination shaped like the slice (prepended axes included). torch DCP with a planner that
    requests exactly these chunks; collective over the default group (every rank calls it the
    same number of times). Used instead of ``dist_checkpointing.load`` because torch's
    ShardedTensor cannot describe a slice of a layer-stacked tensor on a world of one process."""
    import torch.distributed.checkpoint as dcp

    global _SLICE_PLANNER
    if _SLICE_PLANNER is None:
        _SLICE_PLANNER = _slice_planner_cls()
    planner = _SLICE_PLANNER(path, items)
    try:
        dcp.load({}, storage_reader=dcp.FileSystemReader(str(path)), planner=planner,
                 no_dist=not torch.distributed.is_initialized())
    finally:
        # DCP may keep the planner in reference cycles for a while: drop the big references now
        planner.items, planner.dests = [], {}


def _load_sharded_template(path, template: dict) -> dict:
    """Load a flat megatron sharded template (ShardedTensors, ShardedTensorFactories) into its
    own data tensors and return {key: tensor} as ``dist_checkpointing.load`` would."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    items, finish = [], {}
    for key, v in template.items():
        built = v.build() if isinstance(v, ShardedTensorFactory) else v
        for sh in nested_values(built) if isinstance(built, (dict, list)) else [built]:
            if not isinstance(sh, ShardedTensor) or sh.flattened_range is not None:
                raise TypeError(f"{key}: cannot read {type(sh).__name__} slices")
            if not sh.data.is_contiguous():
                raise ValueError(f"{key}: destination is not contiguous")
            dest = sh.data.view((1,) * sh.prepend_axis_num + tuple(sh.local_shape))
            items.append((sh.key, tuple(sh.global_offset), dest))
        finish[key] = (v, built)
    _read_slices(path, items)
    out = {}
    for key, (v, built) in finish.items():
        if isinstance(v, ShardedTensorFactory):
            out[key] = v.merge_fn(dict_list_map_inplace(lambda sh: sh.data, built))
        else:
            out[key] = v.data
    return out


def load_base_weights(path, chunks) -> None:
    """Load base weights from a megatron dist checkpoint (torch_dist format, any TP/PP layout)
    one decoder layer at a time, every rank in step: a quantised linear gets a dense template
    for its shard only while its own layer loads and quantises the loaded shard at once (its
    ``load_state_dict`` hook), so beyond the quantised model at most one layer is dense.
    Adapters (``.lora_``) are not read: a base checkpoint need not have them."""
    for chunk in chunks:
        for template in base_templates(chunk):  # together: every base entry of the chunk
            if not template:  # e.g. a middle pipeline stage has no embedding or output layer
                continue
            state = _load_sharded_template(path, template)  # a key absent from the checkpoint raises
            del template
            load_group(chunk, state, f"base checkpoint {path}")
            del state


class PeftPlan:
    """PEFT for one run: ``cfg`` is the ``peft`` config section (contract keys: method, rank,
    alpha, dropout, target_modules, rslora)."""

    def __init__(self, cfg: PeftConfig, env: Environment, *, seed: Optional[int] = None):
        problems = cfg.validate()
        if cfg.method == "none":
            problems.append("peft.method: PeftPlan needs lora or qlora")
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg = cfg
        self.env = env
        self.quantized = cfg.method == "qlora"
        #: adapters are drawn from (seed, global parameter name): same values on every layout
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self.chunks: Optional[list] = None
        self.counts: Optional[dict] = None

    # ------------------------------------------------------------------ model construction
    def layer_spec(self, model: ModelConfig) -> ModuleSpec:
        """The decoder-layer spec with adapter linears in the target slots. Adapters wrap
        megatron's own Column/RowParallelLinear, i.e. the local spec; under the TE backend PEFT
        keeps TE's final norm but uses the local layer (flash-attn or SDPA core attention,
        separate RMSNorm), whose checkpoint keys match TE's."""
        from megatron_mft.model.specs import attention_backend, layer_spec

        backend = attention_backend(model, self.env, local_only=True)
        arch = model.arch()
        return adapter_spec(layer_spec(backend, arch.normalization, arch), self.cfg, self.quantized)

    def prepare(self, chunks, *, init_adapters: bool = True) -> None:
        """Freeze every parameter but the adapters; draw the adapters from (seed, global name)
        so TP=1 and TP=2 (and any PP split) start identically; QLoRA: quantise any targeted base
        weight still dense. Collective over the model-parallel group (the parameter count)."""
        found = 0
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                p.requires_grad_(".lora_" in name)
            _embedding_output_requires_grad(chunk)
            for gname, m in global_adapter_names(chunk):
                found += 1
                if init_adapters:
                    m.reset_adapters(torch.Generator().manual_seed(_seed_for(self.seed, gname)))
                if self.quantized and not m.quantized:
                    m.quantize_base_()
        if not found:
            raise RuntimeError("peft: no adapter layers in the model; build it with plan.layer_spec(...)")
        self.chunks = chunks
        self.counts = count_parameters(chunks)
        log.info(self.trainable_line())

    # ------------------------------------------------------------------ reports
    def trainable_line(self) -> str:
        c = self.counts
        if c is None:
            raise RuntimeError("call prepare(chunks) first")
        cfg = self.cfg
        base = f", base of the targets in NF4 ({c['nf4'] / 1e6:.2f}M params)" if self.quantized else ""
        return (f"peft: {cfg.method} r={cfg.rank} alpha={cfg.alpha:g} scaling={self._scaling():g} dropout={cfg.dropout:g} "
                f"on {','.join(cfg.target_modules)}: trainable {c['trainable']:,} of {c['total']:,} parameters "
                f"({100 * c['trainable'] / max(c['total'], 1):.3f}%){base}")

    def _scaling(self) -> float:
        from megatron_mft.peft.layers import lora_scaling

        return lora_scaling(self.cfg.rank, self.cfg.alpha, self.cfg.rslora)

    def memory_report(self, arch: ArchSpec, run_cfg) -> str:
        """Trainable share, then expected parameter / gradient / optimizer / activation memory
        per GPU for this layout (formulas: megatron_mft.peft.memory), then what this rank holds
        now. Call on every rank (no collectives here; prepare() did the counting)."""
        par = run_cfg.parallel
        dp = ps.get_data_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        param_bytes = resolve_dtype(run_cfg.model.precision, self.env).itemsize
        est = estimate_memory(arch, method=self.cfg.method, rank=self.cfg.rank, targets=self.cfg.target_modules,
                              tp=par.tp, pp=par.pp, dp=dp, vpp=par.vpp, sp=par.sp,
                              seq_length=run_cfg.data.seq_length, micro_batch=run_cfg.train.micro_batch_size,
                              recompute=run_cfg.model.recompute, distributed_optimizer=par.distributed_optimizer,
                              param_bytes=param_bytes, ep=par.ep)
        lines = []
        if self.counts is not None:
            lines.append(self.trainable_line())
            hand = lora_params(arch, self.cfg.rank, self.cfg.target_modules)
            per_layer = lora_params_per_layer(arch, self.cfg.rank, self.cfg.target_modules)
            terms = " + ".join(f"{x.target}({x.in_features}+{x.out_features})"
                               + {"expert": f" x {x.copies} experts", "shared": " shared expert"}.get(x.group, "")
                               for x in layer_linears(arch) if x.target in self.cfg.target_modules)
            lines.append(f"peft: hand count {arch.num_layers} layers x r={self.cfg.rank} x [{terms}] = "
                         f"{arch.num_layers} x {per_layer:,} = {hand:,}")
        lines.append(f"peft: expected memory per GPU (tp={par.tp} pp={par.pp} dp={dp} sp={par.sp} "
                     f"s={run_cfg.data.seq_length} b={run_cfg.train.micro_batch_size} recompute={run_cfg.model.recompute}, "
                     f"{param_bytes}-byte params/activations, CUDA context not included): "
                     + format_estimate(est))
        lines.append("peft: " + self.resident_line())
        return "\n".join(lines)

    def resident_line(self) -> str:
        """What this rank's model holds now (parameters, NF4 codes)."""
        if self.chunks is None:
            return "model not prepared"
        c = local_bytes(self.chunks)
        return (f"model on this rank: dense params {fmt_bytes(c['dense'])}, NF4 base {fmt_bytes(c['nf4'])}, "
                f"trainable {fmt_bytes(c['trainable'])}")

    def peak_memory_line(self) -> str:
        """Measured peak on this rank: CUDA max allocated/reserved, or the process's peak RSS on
        the CPU (ru_maxrss, which also counts Python, torch and the data pipeline)."""
        if torch.cuda.is_available() and self.env.cuda:
            alloc = torch.cuda.max_memory_allocated()
            resv = torch.cuda.max_memory_reserved()
            return (f"peak memory (GPU {torch.cuda.current_device()}): allocated {fmt_bytes(alloc)}, "
                    f"reserved {fmt_bytes(resv)}")
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return f"peak memory (CPU process, ru_maxrss): {fmt_bytes(rss_kb * 1024)}"


def _mark_requires_grad(module, args, output):
    if torch.is_tensor(output) and not output.requires_grad:
        output.requires_grad_(True)


def _embedding_output_requires_grad(chunk) -> None:
    """With the embedding frozen, its output would not require grad, and megatron's reentrant
    activation recompute (a checkpointed layer's output requires grad only if an input does)
    would then cut the graph: no adapter would get a gradient. Mark the embedding output as
    requiring grad (what transformers' enable_input_require_grads does); later pipeline stages
    receive activations that already require grad."""
    emb = getattr(chunk, "embedding", None)
    if emb is not None and not getattr(emb, "_peft_output_grad_hook", False):
        emb.register_forward_hook(_mark_requires_grad)
        emb._peft_output_grad_hook = True


def count_parameters(chunks) -> dict:
    """Model parameters counted once each across the model-parallel group: TP-split tensors
    (``tensor_model_parallel``) and NF4 shards on every TP rank, replicated ones on TP rank 0;
    summed over TP and PP ranks. Routed experts' tensors (distinct on every rank of megatron's
    expert-TP x EP x PP group) are summed over that group. Collective when torch.distributed is
    initialised."""
    tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    dense = [0, 0, 0]  # trainable, total, nf4
    expert = [0, 0, 0]
    for c in chunks:
        expert_ids = {id(t) for m in c.modules() if getattr(m, "is_expert", False) for t in m.parameters()}
        for _, p in c.named_parameters():
            is_expert = id(p) in expert_ids
            if is_expert or getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                into = expert if is_expert else dense
                into[1] += p.numel()
                if p.requires_grad:
                    into[0] += p.numel()
        for _, m in iter_adapters([c]):
            if isinstance(m.weight, NF4Weight):
                into = expert if m.is_expert else dense
                into[1] += m.weight.numel()
                into[2] += m.weight.numel()
    vec = torch.tensor(dense, dtype=torch.float64)
    ex = torch.tensor(expert, dtype=torch.float64)
    if torch.distributed.is_initialized() and ps.model_parallel_is_initialized():
        if torch.cuda.is_available():
            vec, ex = vec.cuda(), ex.cuda()
        torch.distributed.all_reduce(vec, group=ps.get_model_parallel_group())
        torch.distributed.all_reduce(ex, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    trainable, total, nf4 = (int(x) for x in (vec + ex).tolist())
    return {"trainable": trainable, "total": total, "nf4": nf4}


def local_bytes(chunks) -> dict:
    dense = trainable = nf4 = 0
    for c in chunks:
        for p in c.parameters():
            n = p.numel() * p.element_size()
            dense += n
            trainable += n if p.requires_grad else 0
        for _, m in iter_adapters([c]):
            if isinstance(m.weight, NF4Weight):
                nf4 += m.weight.nbytes()
    return {"dense": dense, "trainable": trainable, "nf4": nf4}
