"""Faster CPU replacements for `nn.Linear`: oneDNN-prepacked weights, int4 and int8 weight-only layers.

All are inference-only modules that keep `in_features` and `out_features`, so code that
reads a layer's width (vocabulary checks) still works. Their weights are opaque tensors
outside `parameters()`: a converted model cannot be saved, moved to another device or
trained, and `copy.deepcopy` of it is not supported.

Why they exist (measured with `python -m benchmarks.speed`, see docs/BENCHMARKS.md):

- `PackedLinear` runs `torch.ops.mkldnn._linear_pointwise` on a weight that oneDNN has
  reordered once at load time. torch's default float32 path calls MKL, which repacks the
  weight on every call with more than one input row. On the 2-core AMD EPYC development
  machine, a 5-token forward pass of SmolLM2-135M cost about 1.9 times a 1-token pass
  with MKL and about 1.2 times with the prepacked weights. That ratio is the cost of
  verifying 4 draft tokens in speculative decoding. A row's result also no longer
  depends on how many rows are in the batch (see `PackedLinear`).
- `Int4Linear` stores int4 weights in groups of 32 input channels, each group with a
  scale and an offset (asymmetric round-to-nearest between the group's min and max), and
  multiplies with `torch.ops.aten._weight_int4pack_mm_for_cpu` in bfloat16. It reads an
  eighth of the float32 bytes, which is what makes a cheap self-draft.
- `Int8Linear` stores int8 weights with one symmetric scale per output channel and
  multiplies with `torch.ops.aten._weight_int8pack_mm` in bfloat16. It reads a quarter
  of the float32 bytes. With float32 inputs that kernel was about 15 times slower than
  with bfloat16 ones on the development machine, so the inputs are cast.

NOTE: `_reorder_linear_weight`, `_linear_pointwise`, `_convert_weight_to_int4pack_for_cpu`,
`_weight_int4pack_mm_for_cpu` and `_weight_int8pack_mm` are private torch operators (the ones torch.compile and
torchao use on CPU). They are tested with torch 2.13 only and may change in later releases.
"""

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

_PACKING_BATCH_HINT = 16
INT4_GROUP_SIZE = 32
# int4 codes 0..15, stored by the kernel as (code - 8) times the scale plus the group's zero
_INT4_LEVELS = 15
_INT4_MIDPOINT = 8
# `_convert_weight_to_int4pack_for_cpu` packs output rows in blocks of 16
_INT4_OUTPUT_MULTIPLE = 16
# symmetric int8 codes -127..127, so that negating a weight negates its code
_INT8_LEVELS = 127


def prepack_available() -> bool:
    """Return whether this torch build has oneDNN (mkldnn) on this CPU."""
    return torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """A bias-optional linear layer whose weight oneDNN has reordered once, for CPU inference.

    `dtype` is the weight's compute dtype (float32 or bfloat16). Inputs of another dtype
    are cast to it, and the output is cast back to the input's dtype.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None):
        super().__init__()
        weight = linear.weight.detach()
        self.compute_dtype = dtype or weight.dtype
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # The batch-size hint picks oneDNN's weight layout. With hint 1 (torch 2.13, AMD EPYC),
        # 1-row products ran 25% slower than with any hint from 2 to 64, and a row's result
        # depended on the number of rows. Every hint from 2 to 64 gave the same fast layout.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(
            weight.to(self.compute_dtype).contiguous(), _PACKING_BATCH_HINT
        )
        self.packed_bias = None if linear.bias is None else linear.bias.detach().to(self.compute_dtype).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        y = torch.ops.mkldnn._linear_pointwise(
            x.to(self.compute_dtype), self.packed_weight, self.packed_bias, "none", [], ""
        )
        return y.to(input_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.compute_dtype}"


def int4_supported(linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> bool:
    """Return whether a layer fits the int4 kernel: whole groups along the input, outputs a multiple of 16."""
    return linear.in_features % group_size == 0 and linear.out_features % _INT4_OUTPUT_MULTIPLE == 0


def quantize_int4_weight(
    weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a (N, K) weight to int4 codes per group of `group_size` input channels.

    Returns (codes, scales, zeros): codes (N, K) int32 in 0..15, and per group scales and
    zeros (N, K / group_size) float32 such that weight ~= (codes - 8) * scale + zero.
    The scale spans the group's min to max in 15 steps, so both extremes are exact up to
    rounding; a constant group gets scale 1.
    """
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low = groups.amin(dim=-1, keepdim=True)  # (N, G, 1)
    high = groups.amax(dim=-1, keepdim=True)
    scales = (high - low) / _INT4_LEVELS
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round((groups - low) / scales).clamp(0, _INT4_LEVELS).to(torch.int32)
    zeros = low + _INT4_MIDPOINT * scales
    return codes.reshape(out_features, in_features), scales.squeeze(-1), zeros.squeeze(-1)


def dequantize_int4_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Return the float32 (N, K) weight that int4 codes and their group scales and zeros stand for."""
    out_features, in_features = codes.shape
    group_size = in_features // scales.shape[1]
    groups = codes.reshape(out_features, -1, group_size).float()  # (N, G, group_size)
    weight = (groups - _INT4_MIDPOINT) * scales[..., None] + zeros[..., None]
    return weight.reshape(out_features, in_features)


class Int4Linear(nn.Module):
    """A linear layer with int4 weights in groups of 32 input channels, computed in bfloat16 on CPU.

    The output has the input's dtype. A bias, if any, is added in the input's dtype.
    """

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        if not int4_supported(linear, group_size):
            raise ValueError(
                f"int4 needs in_features divisible by {group_size} and out_features divisible by "
                f"{_INT4_OUTPUT_MULTIPLE}, "
                f"got {linear.in_features} -> {linear.out_features}"
            )
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.group_size = group_size

        codes, scales, zeros = quantize_int4_weight(linear.weight, group_size)
        self.packed_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # the kernel reads (G, N, 2) pairs of scale and zero
        self.scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().bfloat16()
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        *leading, in_features = x.shape
        rows = x.reshape(-1, in_features).to(torch.bfloat16)  # (rows, K)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed_weight, self.group_size, self.scales_and_zeros)
        y = y.to(input_dtype).reshape(*leading, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(input_dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def quantize_int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a (N, K) weight to int8 codes with one symmetric scale per output row.

    Returns (codes, scales): codes (N, K) int8 in -127..127 and scales (N,) bfloat16,
    such that weight ~= codes * scale. Each scale is the row's largest magnitude over
    127, rounded up to a bfloat16 value first, so the kernel's bfloat16 scales are exact
    and no code is clipped. An all-zero row gets scale 1.
    """
    weight = weight.detach().float()
    largest = weight.abs().amax(dim=1)
    scales = torch.where(largest > 0, largest / _INT8_LEVELS, torch.ones_like(largest))
    scales_bf16 = scales.bfloat16()
    # round up: a scale rounded down would push the row's largest value past 127
    too_small = scales_bf16.float() < scales
    scales_bf16[too_small] = torch.nextafter(scales_bf16[too_small], torch.full_like(scales_bf16[too_small], torch.inf))
    codes = torch.round(weight / scales_bf16.float()[:, None]).clamp(-_INT8_LEVELS, _INT8_LEVELS).to(torch.int8)
    return codes.contiguous(), scales_bf16


class Int8Linear(nn.Module):
    """A linear layer with int8 weights, one scale per output channel, computed in bfloat16 on CPU.

    Only the weights are quantized: inputs are rounded to bfloat16, not to int8. The
    output has the input's dtype, and a bias, if any, is added in the input's dtype.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight_codes, self.scales = quantize_int8_weight(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        *leading, in_features = x.shape
        rows = x.reshape(-1, in_features).to(torch.bfloat16)  # (rows, K)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_codes, self.scales)
        y = y.to(input_dtype).reshape(*leading, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(input_dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _replace_linears(model: nn.Module, convert) -> int:
    """Replace each `nn.Linear` child of every module by `convert(qualified_name, linear)`; return how many."""
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            qualified_name = f"{parent_name}.{child_name}" if parent_name else child_name
            setattr(parent, child_name, convert(qualified_name, child))
            replaced += 1
    return replaced


def prepack_linears(model: nn.Module) -> int:
    """Replace every float `nn.Linear` of a CPU model by a `PackedLinear` in place; return how many.

    Layers already converted (int8 or int4) are left alone. A tied output head gets
    its own packed copy of the embedding matrix, and the embedding stays as it is.
    """
    return _replace_linears(model, lambda _name, linear: PackedLinear(linear))


def quantize_int4(model: nn.Module) -> nn.Module:
    """Convert a float32 CPU causal LM, in place, into an int4 draft; return it.

    Every `nn.Linear` except the output head becomes an `Int4Linear`. The output head
    stays in bfloat16 (prepacked), because rounding it to 4 bits changes the argmax
    far more often than the other layers do. Layers whose shape the int4 kernel
    does not take are prepacked in bfloat16 too. Embeddings, norms and attention stay
    in float32.
    """
    head = model.get_output_embeddings()
    counts = {"int4": 0, "bfloat16": 0}

    def convert(_name: str, linear: nn.Linear) -> nn.Module:
        if linear is head or not int4_supported(linear):
            counts["bfloat16"] += 1
            return PackedLinear(linear, torch.bfloat16)
        counts["int4"] += 1
        return Int4Linear(linear)

    _replace_linears(model, convert)
    logger.debug("int4 draft: %d int4 layers, %d bfloat16 layers", counts["int4"], counts["bfloat16"])
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """Convert a float32 CPU causal LM, in place, into an int8 draft; return it.

    Every `nn.Linear`, the output head included, becomes an `Int8Linear`. A tied
    output head gets its own int8 copy, and embeddings, norms and attention stay in
    float32.
    """
    count = _replace_linears(model, lambda _name, linear: Int8Linear(linear))
    logger.debug("int8 draft: %d int8 layers", count)
    return model
