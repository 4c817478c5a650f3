"""QLoRA base weights: one tensor-parallel shard of a frozen linear weight stored as NF4 with
double quantisation (bitsandbytes), and the matmul that dequantises it on the fly.

Storage per element: 4 bits of NF4 code, plus one 8-bit absmax per block of 64 elements, plus
one fp32 absmax (and a shared fp32 offset) per 256 absmax values (the "double quantisation" of
QLoRA): 0.5 + 1/64 + 4/(64*256) = 0.5159 bytes.

The dense weight exists only inside :class:`_NF4Matmul`'s forward and backward (one layer's
linear at a time); autograd saves the packed codes, never the dense weight, and no weight
gradient is computed.
"""

from __future__ import annotations

from typing import Optional

import torch

#: bytes per element of an NF4 + double-quantised weight (blocksize 64, nested blocksize 256)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


def _bnb_functional():
    import bitsandbytes.functional as bnbf  # imported lazily: only QLoRA needs it

    return bnbf


#: absmax values per block of the second (8-bit) quantisation
NESTED_BLOCKSIZE = 256


def _double_quantize(state, bnbf):
    """QLoRA's double quantisation of the fp32 absmax values of ``state`` (one per block of 64):
    minus their mean, in blocks of 256, each block scaled by its absmax and rounded to the
    nearest value of the signed 8-bit dynamic map. Done here with torch ops (bucketize on the
    map's midpoints, as bitsandbytes' pure-torch backend does) instead of bitsandbytes'
    ``compress_statistics``: its CPU kernel (0.50.2) picked a neighbour of the nearest value for 5
    of 307 blocks of tests/test_nf4_reference.py's weight. The resulting state is bitsandbytes' own
    nested QuantState, so ``dequantize_4bit`` reads it unchanged on any device."""
    absmax = state.absmax.float()
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    blocks = -(-n // NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(centred, (0, blocks * NESTED_BLOCKSIZE - n)).view(blocks, NESTED_BLOCKSIZE)
    absmax2 = padded.abs().amax(dim=1)  # zero padding never raises a block's max
    scaled = (padded / absmax2.clamp_min(1e-38)[:, None]).clamp(-1, 1).reshape(-1)[:n]
    code = bnbf.create_dynamic_map(signed=True).to(device=absmax.device, dtype=torch.float32)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    nested = bnbf.QuantState(absmax=absmax2, code=code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    return bnbf.QuantState(absmax=q, shape=state.shape, code=state.code, blocksize=state.blocksize,
                           quant_type=state.quant_type, dtype=state.dtype, offset=offset, state2=nested)


class NF4Weight:
    """A quantised weight shard. Not a Parameter (it is never trained); a module keeps it in the
    slot where megatron's linear keeps ``weight`` so the base forward passes it to
    ``_forward_impl`` unchanged."""

    def __init__(self, packed: torch.Tensor, state, shape: torch.Size, dtype: torch.dtype):
        self.packed = packed
        self.state = state
        self.shape = torch.Size(shape)
        self.dtype = dtype  # dtype of the dense weight it stands for (the compute dtype)

    # ------------------------------------------------------------------ construction
    @classmethod
    def quantize(cls, dense: torch.Tensor) -> "NF4Weight":
        """Quantise ``dense`` (any float dtype, on its own device) to NF4, double-quantised."""
        bnbf = _bnb_functional()
        with torch.no_grad():
            src = dense.detach().contiguous()
            # Quantise the flat storage: blocks of 64 consecutive elements, as on CUDA. (On the
            # CPU, bitsandbytes 0.50.2 quantises a 2-D tensor whose rows are not a multiple of
            # 64 with 0.24 relative error instead of 0.09; flat input avoids it.)
            packed, state = bnbf.quantize_4bit(src.reshape(-1), quant_type="nf4", compress_statistics=False)
            state = _double_quantize(state, bnbf)
        return cls(packed, state, src.shape, src.dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense shard (a new tensor) in ``dtype`` (default: the original dtype)."""
        bnbf = _bnb_functional()
        out = bnbf.dequantize_4bit(self.packed, self.state)
        return out.to(dtype or self.dtype).reshape(self.shape)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def device(self) -> torch.device:
        return self.packed.device

    def named_tensors(self):
        """(name, tensor) of everything held: packed codes and the quantisation state (what the
        device-placement check walks, see megatron_mft.model.placement)."""
        s = self.state
        items = [("packed", self.packed), ("absmax", s.absmax), ("code", s.code),
                 ("offset", getattr(s, "offset", None))]
        if getattr(s, "state2", None) is not None:
            items += [("state2.absmax", s.state2.absmax), ("state2.code", s.state2.code)]
        return [(n, t) for n, t in items if torch.is_tensor(t)]

    def numel(self) -> int:
        return self.shape.numel()

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def nbytes(self) -> int:
        """Bytes actually held: packed codes, absmax codes, nested absmax, code books, offset."""
        return sum(t.numel() * t.element_size() for _, t in self.named_tensors())

    def __repr__(self) -> str:
        return f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class _NF4Matmul(torch.autograd.Function):
    """y = x @ dequant(W)^T; dx = dy @ dequant(W). W is frozen: no weight gradient, and only the
    packed codes are kept for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
        ctx.weight = weight
        w = weight.dequantize(x.dtype)
        return torch.nn.functional.linear(x, w)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.weight.dequantize(grad_out.dtype)
        return grad_out.matmul(w), None


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: Optional[torch.Tensor] = None, *,
               allreduce_dgrad: bool = False, sequence_parallel: bool = False, tp_group=None) -> torch.Tensor:
    """The NF4 counterpart of megatron's ``linear_with_frozen_weight`` with its tensor-parallel
    communication, built from megatron's autograd mappings: under sequence parallelism the input
    is all-gathered along the sequence (reduce-scattered in backward); otherwise, when
    ``allreduce_dgrad``, the input gradient is all-reduced over the tensor-parallel group."""
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        gather_from_sequence_parallel_region)

    if sequence_parallel:
        x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=tp_group)
    elif allreduce_dgrad:
        x = copy_to_tensor_model_parallel_region(x, group=tp_group)
    out = _NF4Matmul.apply(x, weight)
    if bias is not None:
        out = out + bias
    return out
