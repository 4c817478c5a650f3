"""Base weights loaded one decoder layer at a time: the walk shared by every base-weight source.

A QLoRA linear keeps its base weight quantised. It offers a dense tensor for its shard only
while its own layer's template is built (``dense_weight_template``) and quantises the shard it
receives in ``load_state_dict``. Building a template per layer and loading it before the next
therefore keeps at most one layer dense. Sources: a megatron dist checkpoint
(``peft.plan.load_base_weights``) and a Hugging Face folder (``checkpoint.hf.load``, which
imports this: peft comes before checkpoint in the package order).
"""

from __future__ import annotations

from typing import Any, Iterator


def is_base_key(key: str) -> bool:
    """A base weight: not an adapter tensor, not a module's ``_extra_state``."""
    return ".lora_" not in key and not key.endswith("_extra_state")


def base_templates(chunk) -> Iterator[dict[str, Any]]:
    """The chunk's base-weight sharded entries, ``{key: ShardedTensor | factory}``: first those
    outside the decoder layers (embedding, final norm, output layer), then one dict per decoder
    layer. Fill and load each (:func:`load_group`) before asking for the next."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_mft.peft.plan import iter_adapters

    decoder = getattr(chunk, "decoder", None)
    n_layers = len(decoder.layers) if decoder is not None else 0
    for layer in [None, *range(n_layers)]:
        quantised = [m for _, m in iter_adapters([decoder.layers[layer]])] if layer is not None else []
        for m in quantised:
            m.dense_weight_template = True
        try:
            sd = chunk.sharded_state_dict()
        finally:
            for m in quantised:
                m.dense_weight_template = False
        prefix = f"decoder.layers.{layer}."
        group = {}
        for key, entry in sd.items():  # megatron's sharded state dict of a model is flat
            if isinstance(entry, ShardedObject) or not is_base_key(key):
                continue
            if key.startswith(prefix) if layer is not None else not key.startswith("decoder.layers."):
                group[key] = entry
        del sd
        yield group


def load_group(chunk, state: dict, source: str) -> None:
    """``chunk.load_state_dict(state, strict=False)``, refusing keys the model does not have."""
    result = chunk.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{source} has keys the model does not have: {result.unexpected_keys[:8]}")
