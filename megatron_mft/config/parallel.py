"""Parallel layout: tensor, pipeline (optionally interleaved), data parallel, sequence parallel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class ParallelConfig:
    #: Tensor-parallel size (heads and KV groups must divide by it).
    tp: int = 1
    #: Pipeline-parallel size (layers must divide by pp * vpp).
    pp: int = 1
    #: Virtual pipeline stages per rank (interleaved 1F1B); None = plain 1F1B.
    vpp: Optional[int] = None
    #: Sequence parallelism (needs tp > 1): norms/dropout on sequence shards.
    sp: bool = False
    #: Shard optimizer state over data-parallel ranks (megatron DistributedOptimizer).
    distributed_optimizer: bool = True
    #: Expert parallelism (MoE): routed experts split over this many ranks of the data-parallel
    #: dimension; megatron's token dispatcher moves tokens between them.
    ep: int = 1
    #: Tensor parallelism inside each expert; null = 1 (experts whole on each expert rank).
    etp: Optional[int] = None
    #: Context parallelism: every sequence split over this many ranks (2 x cp load-balanced
    #: chunks per sequence); sequence and packed sample lengths are padded to multiples of 2 x cp.
    cp: int = 1
    #: Transformer Engine's CP attention: p2p (ring), a2a or allgather. Without TE the
    #: all-gather-KV core attention (megatron_mft/model/cp_attention.py) is used whatever this says.
    cp_comm_type: Literal["p2p", "a2a", "allgather"] = "p2p"

    @property
    def expert_tp(self) -> int:
        return self.etp or 1

    @property
    def virtual_stages(self) -> Optional[int]:
        """megatron's ``virtual_pipeline_model_parallel_size``: vpp, only with pipeline parallelism."""
        return self.vpp if self.pp > 1 else None

    def world_problems(self, world_size: int) -> list[str]:
        """What keeps this layout from starting on ``world_size`` processes: the one rule for the
        preflight check and ``init_parallel`` (megatron's: world % (tp pp cp) and % (etp ep pp))."""
        p = []
        for names, size in ((("tp", "pp", "cp"), self.tp * self.pp * self.cp),
                            (("etp", "ep", "pp"), self.expert_tp * self.ep * self.pp)):
            if size > 1 and world_size % size:
                keys = " x ".join(f"parallel.{n}" for n in names)
                values = " x ".join(str(v) for v in ((self.tp, self.pp, self.cp) if names[0] == "tp"
                                                     else (self.expert_tp, self.ep, self.pp)))
                how = (f"started as one process: launch {size} (or a multiple) processes, e.g. torchrun "
                       f"--nproc_per_node {size} {_this_program()} ..." if world_size == 1
                       else f"got {world_size} processes")
                p.append(f"{keys} = {values} needs a multiple of {size} processes; {how}")
        return p

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel replicas: what is left of the world after TP, PP and CP."""
        return world_size // (self.tp * self.pp * self.cp)

    def validate(self) -> list[str]:
        p = []
        for name in ("tp", "pp", "ep", "cp"):
            if getattr(self, name) < 1:
                p.append(f"parallel.{name}: must be >= 1")
        if self.vpp is not None and self.vpp < 1:
            p.append("parallel.vpp: must be >= 1 or null")
        if self.vpp is not None and self.vpp > 1 and self.pp < 2:
            p.append("parallel.vpp: virtual stages need parallel.pp >= 2")
        if self.sp and self.tp < 2:
            p.append("parallel.sp: sequence parallelism needs parallel.tp >= 2")
        if self.etp is not None and self.etp < 1:
            p.append("parallel.etp: must be >= 1 or null")
        return p


def layout_problems(arch, tp: int, pp: int, vpp: Optional[int] = None, *, tp_name: str = "parallel.tp",
                    pp_name: str = "parallel.pp", ep: int = 1, etp: Optional[int] = None,
                    ep_name: str = "parallel.ep") -> list[str]:
    """What keeps ``arch`` (an ArchSpec) from splitting over TP x PP (x virtual stages): the one
    rule set for training configs and checkpoint conversion; ``*_name`` label the messages."""
    p = []
    if tp >= 1 and arch.num_attention_heads % tp:
        p.append(f"{tp_name}: {tp} does not divide num_attention_heads {arch.num_attention_heads}")
    if tp >= 1 and arch.num_query_groups % tp:
        p.append(f"{tp_name}: {tp} does not divide num_query_groups {arch.num_query_groups}")
    p += expert_layout_problems(arch, tp, ep, etp, ep_name)
    stages = pp * (vpp or 1)
    if stages >= 1 and arch.num_layers % stages:
        p.append(f"{pp_name}: num_layers {arch.num_layers} not divisible by pp*vpp = {stages}")
    return p


def expert_layout_problems(arch, tp: int, ep: int, etp: Optional[int], ep_name: str = "parallel.ep") -> list[str]:
    """Expert-parallel rules (MoE): experts divide over EP, expert TP splits the expert MLP, and
    megatron's MoE under tensor parallelism needs sequence parallelism's token split (checked by
    the caller that knows ``sp``)."""
    p = []
    if not arch.num_experts and (ep > 1 or (etp or 1) > 1):
        asked = [f"{ep_name}={ep}"] * (ep > 1) + [f"parallel.etp={etp}"] * ((etp or 1) > 1)  # only what was set
        p.append(f"{ep_name if ep > 1 else 'parallel.etp'}: expert parallelism ({', '.join(asked)}) needs a "
                 f"mixture-of-experts model (num_experts > 0)")
    elif arch.num_experts:
        if ep >= 1 and arch.num_experts % ep:
            p.append(f"{ep_name}: {ep} does not divide num_experts {arch.num_experts}")
        if etp and etp >= 1 and arch.expert_ffn % etp:
            p.append(f"parallel.etp: {etp} does not divide the expert hidden size {arch.expert_ffn}")
        if (etp or 1) > 1 and arch.linear_bias:
            p.append(f"parallel.etp: {etp} with linear biases (model.linear_bias): megatron's MoE layer supports "
                     f"biases only at parallel.etp: 1")
    return p


def _this_program() -> str:
    """How torchrun would start the running command: ``-m megatron_mft.train`` for a module run
    (``python -m``), the script's path for a script (a bench), ``-m megatron_mft.train`` otherwise."""
    import os
    import sys

    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name.removesuffix(".__main__")
        return f"-m {name}" if name.startswith("megatron_mft") else "-m megatron_mft.train"
    script = getattr(main, "__file__", None)
    return os.path.relpath(script) if script and script.endswith(".py") else "-m megatron_mft.train"
