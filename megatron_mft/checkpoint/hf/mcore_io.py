"""megatron-core dist checkpoints, written and read one tensor at a time.

The layout of a checkpoint is taken from the model itself: :func:`build_template` builds our
GPTModel at tensor/pipeline size 1 on the ``meta`` device (no memory; 70B takes a fraction of a
second) and asks it for ``sharded_state_dict()``. That gives, for every tensor, the dist
checkpoint key, global shape and chunk offsets that training will look for, and the
ShardedObjects (``_extra_state``) it expects to find. Tensors are addressed by a *canonical
name*: the checkpoint key with the global layer index inserted after ``decoder.layers.``.

Writing (:func:`write_dist_checkpoint`): torch.distributed.checkpoint's file writer asks the
planner for each item's data only when it writes that item, so the planner here produces
tensors on demand (``produce(canonical)``) and keeps at most one megatron tensor alive. The
result is an ordinary megatron ``torch_dist`` checkpoint (``.metadata``, ``__0_0.distcp``,
``common.pt``, ``metadata.json``), saved in the TP=1/PP=1 layout, which megatron reshards
into any TP/PP layout on load (the vocabulary rows included: embedding and output layer
allow a padded global shape).

Reading (:class:`DistCheckpoint`): one tensor per ``dist_checkpointing.load`` call, through the
template entry (so megatron's own factories, e.g. the gated fc1 split, undo its layout), into
a tensor of the stored dtype.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_mft.checkpoint.hf.families import ConversionError
from megatron_mft.compat import Environment
from megatron_mft.config import ModelConfig, ParallelConfig, PeftConfig

#: The template is always megatron's local spec on the CPU: a fixed, machine-independent layout
#: (its checkpoint keys equal the Transformer Engine spec's).
TEMPLATE_ENV = Environment(cuda=False, te=False, flash_attn=False, apex=False, device_name="meta (template)")

_LAYERS = "decoder.layers."


def canonical_name(key: str, layer: Optional[int]) -> str:
    """``decoder.layers.mlp.linear_fc1.weight`` at layer 3 -> ``decoder.layers.3.mlp.linear_fc1.weight``."""
    if layer is None:
        return key
    if not key.startswith(_LAYERS):
        raise ValueError(f"{key}: layer-stacked key outside decoder.layers")
    return f"{_LAYERS}{layer}.{key[len(_LAYERS):]}"


def shards_of(entry) -> list:
    """The ShardedTensors of a template/state-dict entry (a factory is built on its data)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(entry, ShardedTensorFactory):
        built = entry.build()
        out = []
        stack = [built]
        while stack:
            x = stack.pop(0)
            if isinstance(x, ShardedTensor):
                out.append(x)
            elif isinstance(x, dict):
                stack.extend(x.values())
            elif isinstance(x, (list, tuple)):
                stack.extend(x)
            else:
                raise TypeError(f"unexpected factory output {type(x)}")
        return out
    return [entry]


def layer_of(sh) -> Optional[int]:
    """Global layer index of a layer-stacked ShardedTensor (its first prepended axis)."""
    if sh.prepend_axis_num == 0:
        return None
    return int(sh.global_offset[0])


def entry_canonical(entry) -> str:
    first = shards_of(entry)[0]
    if first.flattened_range is not None:
        raise ConversionError("unsupported sharded tensor:", [f"{first.key} is flattened (optimizer-style)"])
    name = canonical_name(first.key, layer_of(first))
    if first.prepend_axis_num == 2:  # routed experts: layer and expert axes (megatron's MoE layer)
        name = name.replace(".experts.experts.", f".experts.{int(first.global_offset[1])}.", 1)
    return name


def region(full: torch.Tensor, sh, name: str) -> torch.Tensor:
    """The part of the TP=1 tensor ``full`` that ShardedTensor ``sh`` holds (its local shape).

    The global shape may have more rows than ``full`` where megatron pads (vocabulary rows,
    ``allow_shape_mismatch``): rows beyond ``full`` are zeros."""
    p = sh.prepend_axis_num
    gshape = tuple(sh.global_shape[p:])
    offs = tuple(sh.global_offset[p:])
    local = tuple(sh.local_shape)
    fshape = tuple(full.shape)
    if fshape != gshape:
        padded_rows = sh.allow_shape_mismatch and fshape[1:] == gshape[1:] and fshape[0] <= gshape[0]
        if not padded_rows:
            raise ConversionError("shape mismatch between the mapped tensor and the megatron model:",
                                  [f"{name}: mapped tensor is {list(fshape)}, the model's global tensor is "
                                   f"{list(gshape)}"])
        out = torch.zeros(local, dtype=full.dtype)
        r0, r1 = offs[0], min(offs[0] + local[0], fshape[0])
        if r1 > r0:
            idx = (slice(r0, r1),) + tuple(slice(o, o + n) for o, n in zip(offs[1:], local[1:]))
            out[: r1 - r0] = full[idx]
        return out
    return full[tuple(slice(o, o + n) for o, n in zip(offs, local))]


@dataclass
class Template:
    """The TP=1/PP=1 checkpoint layout of a model config (meta tensors, no memory)."""

    tensors: dict  # canonical name -> ShardedTensor | ShardedTensorFactory
    objects: list  # ShardedObjects
    #: canonical adapter path (e.g. decoder.layers.0.self_attention.linear_qkv) -> its scaling
    lora_scaling: dict = field(default_factory=dict)

    def names(self, adapters: bool = False) -> list[str]:
        return [n for n in self.tensors if (".lora_" in n) == adapters]


def build_template(model_cfg: ModelConfig, peft_cfg: Optional[PeftConfig] = None) -> Template:
    """Needs torch.distributed and megatron's parallel state initialised with TP=1, PP=1."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_mft.model import build_model_chunks
    from megatron_mft.model.specs import layer_spec

    if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("build_template needs megatron's parallel state at TP=1, PP=1")
    cfg = dataclasses.replace(model_cfg, precision="fp32", attention_backend="sdpa", recompute="none", hf_init=None)
    layer = None
    if peft_cfg is not None and peft_cfg.method != "none":
        from megatron_mft.peft import adapter_spec

        # quantize=False: an NF4 base has the same names and sharding; the template never computes
        layer = adapter_spec(layer_spec("sdpa", cfg.arch().normalization, cfg.arch()), peft_cfg, quantize=False)
    with torch.device("meta"):
        (chunk,) = build_model_chunks(cfg, ParallelConfig(), TEMPLATE_ENV, layer=layer)
    tensors, objects = {}, []
    for _, entry in _flat(chunk.sharded_state_dict()):
        if isinstance(entry, ShardedObject):
            objects.append(entry)
            continue
        tensors[entry_canonical(entry)] = entry
    scaling = {}
    if layer is not None:
        from megatron_mft.peft import global_adapter_names

        scaling = {name: float(m.scaling) for name, m in global_adapter_names(chunk)}
    return Template(tensors=tensors, objects=objects, lora_scaling=scaling)


def _flat(sd, prefix=""):
    if isinstance(sd, dict):
        for k, v in sd.items():
            yield from _flat(v, f"{prefix}{k}.")
    elif isinstance(sd, (list, tuple)):
        for i, v in enumerate(sd):
            yield from _flat(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], sd


# ----------------------------------------------------------------------------------- writing
def write_dist_checkpoint(out_dir: str | Path, template: Template, produce: Callable[[str], torch.Tensor],
                          dtype: torch.dtype, on_tensor: Optional[Callable[[str], None]] = None) -> int:
    """Write the template's non-adapter tensors with data from
    ``produce(canonical) -> TP=1 tensor``, streaming. Returns the number of bytes written."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = template.names()
    items, lookup, blobs = [], {}, {}
    total = 0
    for name in names:
        for sh in shards_of(template.tensors[name]):
            p = sh.prepend_axis_num
            offsets = torch.Size(sh.global_offset)
            sizes = torch.Size((1,) * p + tuple(sh.local_shape))
            items.append(WriteItem(
                index=MetadataIndex(sh.key, offsets), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                                            properties=TensorProperties(dtype=dtype),
                                            size=torch.Size(sh.global_shape))))
            lookup[(sh.key, tuple(offsets))] = (name, sh, sizes)
            total += sizes.numel() * torch.empty((), dtype=dtype).element_size()
    for obj in template.objects:  # what the model's _extra_state would be: None for local linears
        buf = io.BytesIO()
        torch.save([obj.data], buf)
        blobs[obj.unique_key] = buf
        items.append(WriteItem(index=MetadataIndex(obj.unique_key), type=WriteItemType.BYTE_IO))

    class StreamingPlanner(DefaultSavePlanner):
        """Plans from the template; resolves each item's data when the writer reaches it.

        The file writer keeps a reference to every tensor it wrote (one per checkpoint key, for
        its safetensors mode), which would pin the embedding, the output layer and a layer's
        worth of tensors. The serial writer resolves item n+1 only after writing item n, so
        item n's storage is released then."""

        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.current: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)
            self.written: Optional[torch.Tensor] = None

        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items=list(items))
            return self.plan

        def resolve_data(self, write_item):
            if self.written is not None:
                self.written.untyped_storage().resize_(0)
                self.written = None
            if write_item.type == WriteItemType.BYTE_IO:
                return blobs[write_item.index.fqn]
            name, sh, sizes = lookup[(write_item.index.fqn, tuple(write_item.index.offset))]
            if self.current[0] != name:
                self.current = (None, None)  # free the previous tensor before producing the next
                self.current = (name, produce(name))
                if on_tensor is not None:
                    on_tensor(name)
            t = region(self.current[1], sh, name).to(dtype).reshape(sizes)
            if not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
                t = t.contiguous().clone()  # owns exactly its bytes
            self.written = t
            return t

    # per_thread_copy_ahead=0: the serial loader (resolve, write, resolve, ...) also on CUDA hosts
    writer = dcp.FileSystemWriter(str(out), single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0)
    dcp.save({}, storage_writer=writer, planner=StreamingPlanner(), no_dist=True)
    torch.save({}, out / "common.pt")
    save_config(CheckpointingConfig("torch_dist", 1), str(out))
    return total


# ----------------------------------------------------------------------------------- reading
class DistCheckpoint:
    """A megatron ``torch_dist`` checkpoint directory, read tensor by tensor."""

    def __init__(self, path: str | Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(path)
        cfg = self.path / "metadata.json"
        if not cfg.is_file() or not (self.path / ".metadata").is_file():
            raise ConversionError(f"{self.path} is not a megatron dist checkpoint:",
                                  ["expected metadata.json and .metadata (torch_dist format)"])
        backend = json.loads(cfg.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ConversionError(f"{self.path}:", [f"sharded backend {backend!r}; only torch_dist is read"])
        md = FileSystemReader(str(self.path)).read_metadata()
        self.tensors = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def load(self, template: Template, name: str) -> torch.Tensor:
        """The TP=1 tensor ``name`` (canonical), in the stored dtype.

        Layer-stacked entries are read as plain chunks of the stacked global tensor (no
        prepended axis): megatron's prepended-axis path assumes a full grid of shards over the
        world's ranks, which a single process reading one layer is not."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        entry = template.tensors[name]
        key = shards_of(entry)[0].key
        if key not in self.tensors:
            raise ConversionError(f"{self.path}:", [f"{name}: key {key} is not in the checkpoint"])
        data = torch.empty(tuple(entry.data.shape), dtype=self.dtype(key))
        if isinstance(entry, ShardedTensorFactory):
            shards = shards_of(dataclasses.replace(entry, data=data))  # views into ``data``
        else:
            shards = [dataclasses.replace(entry, data=data, dtype=data.dtype)]
        request, views = {}, {}
        for i, sh in enumerate(shards):
            p = sh.prepend_axis_num
            shape = (1,) * p + tuple(sh.local_shape)
            views[f"t{i}"] = sh.data
            request[f"t{i}"] = ShardedTensor(
                key=sh.key, data=sh.data.view(shape), dtype=sh.data.dtype, local_shape=shape,
                global_shape=tuple(sh.global_shape), global_offset=tuple(sh.global_offset),
                axis_fragmentations=sh.axis_fragmentations, replica_id=sh.replica_id, prepend_axis_num=0,
                allow_shape_mismatch=sh.allow_shape_mismatch)
        loaded = dist_checkpointing.load(request, str(self.path), validate_access_integrity=False)
        for k, view in views.items():
            if loaded[k].data_ptr() != view.data_ptr():
                view.copy_(loaded[k].reshape(view.shape))
        return data
