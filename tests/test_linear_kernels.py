"""oneDNN-prepacked, int4 and int8 linear layers: values against nn.Linear, model conversion, decoding parity."""

import copy

import pytest
import torch
from tiny import make_tiny_model, random_prompt
from torch import nn

from decoding import beam_search, greedy_generate
from experiments.linear_kernels import (
    INT4_GROUP_SIZE,
    Int4Linear,
    Int8Linear,
    PackedLinear,
    dequantize_int4_weight,
    int4_supported,
    prepack_linears,
    quantize_int4,
    quantize_int4_weight,
    quantize_int8,
    quantize_int8_weight,
)

EOS_ID = 2


def linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64), (1, 1, 64)])
def test_packed_linear_matches_linear(shape, bias):
    layer = linear(64, 48, bias=bias)
    packed = PackedLinear(layer)
    x = torch.randn(*shape)

    with torch.inference_mode():
        expected = layer(x)
        actual = packed(x)

    assert actual.shape == expected.shape
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert (packed.in_features, packed.out_features) == (64, 48)


def test_packed_linear_rows_independent_of_batch():
    packed = PackedLinear(linear(576, 1536))
    x = torch.randn(1, 5, 576)

    with torch.inference_mode():
        batched = packed(x)
        one_by_one = torch.cat([packed(x[:, i : i + 1]) for i in range(5)], dim=1)

    assert torch.equal(batched, one_by_one)


def test_packed_linear_bfloat16_keeps_input_dtype():
    layer = linear(64, 32)
    packed = PackedLinear(layer, torch.bfloat16)
    x = torch.randn(4, 64)

    with torch.inference_mode():
        actual = packed(x)

    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, layer(x).detach(), rtol=2e-2, atol=2e-2)


def test_int4_weight_round_trip_on_grid():
    # a weight already on a 4-bit grid per group, as a dequantized Q4_1 GGUF file is
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (32, 64))
    codes[:, ::INT4_GROUP_SIZE] = 0  # every group contains both extremes
    codes[:, 1::INT4_GROUP_SIZE] = 15
    scales = torch.rand(32, 64 // INT4_GROUP_SIZE) + 0.1
    lows = torch.randn(32, 64 // INT4_GROUP_SIZE)
    weight = (codes.reshape(32, 2, INT4_GROUP_SIZE).float() * scales[..., None] + lows[..., None]).reshape(32, 64)

    found_codes, found_scales, found_zeros = quantize_int4_weight(weight)

    assert torch.equal(found_codes, codes.int())
    torch.testing.assert_close(dequantize_int4_weight(found_codes, found_scales, found_zeros), weight)


def test_int4_constant_group_gets_scale_one():
    weight = torch.full((16, 32), 0.25)
    codes, scales, zeros = quantize_int4_weight(weight)

    assert torch.equal(scales, torch.ones(16, 1))
    assert torch.equal(dequantize_int4_weight(codes, scales, zeros), weight)


@pytest.mark.parametrize("bias", [True, False])
def test_int4_linear_matches_dequantized_weight(bias):
    layer = linear(64, 32, bias=bias)
    int4 = Int4Linear(layer)
    x = torch.randn(2, 3, 64)

    codes, scales, zeros = quantize_int4_weight(layer.weight)
    # the kernel reads scales and zeros in bfloat16
    weight = dequantize_int4_weight(codes, scales.bfloat16().float(), zeros.bfloat16().float())
    expected = x @ weight.T + (layer.bias.detach() if bias else 0.0)
    with torch.inference_mode():
        actual = int4(x)

    assert actual.shape == (2, 3, 32)
    assert actual.dtype == torch.float32
    # bfloat16 activations: about 3 significant digits
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize(
    ("in_features", "out_features", "supported"),
    [(64, 32, True), (576, 192, True), (48, 32, False), (64, 300, False), (64, 8, False)],
)
def test_int4_supported_shapes(in_features, out_features, supported):
    assert int4_supported(nn.Linear(in_features, out_features)) is supported


def test_int4_linear_rejects_unsupported_shape():
    with pytest.raises(ValueError, match="in_features divisible by 32"):
        Int4Linear(nn.Linear(48, 32))


def test_int8_weight_round_trip_on_grid():
    torch.manual_seed(0)
    codes = torch.randint(-127, 128, (16, 48), dtype=torch.int8)
    codes[:, 0] = 127  # every row reaches the largest code
    scales = (torch.rand(16) + 0.01).bfloat16()
    weight = codes.float() * scales.float()[:, None]

    found_codes, found_scales = quantize_int8_weight(weight)

    assert torch.equal(found_codes, codes)
    assert torch.equal(found_scales, scales)


def test_int8_scales_round_up_to_bfloat16():
    torch.manual_seed(0)
    weight = torch.randn(64, 40)

    codes, scales = quantize_int8_weight(weight)

    assert scales.dtype == torch.bfloat16
    assert (scales.float() * 127 >= weight.abs().amax(dim=1)).all()
    # no code is clipped, so each weight is within half a step of its code
    error = (codes.float() * scales.float()[:, None] - weight).abs()
    assert (error <= scales.float()[:, None] / 2 + 1e-7).all()


def test_int8_zero_row_gets_scale_one():
    codes, scales = quantize_int8_weight(torch.zeros(3, 8))

    assert torch.equal(scales.float(), torch.ones(3))
    assert torch.equal(codes, torch.zeros(3, 8, dtype=torch.int8))


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_dequantized_weight(bias):
    layer = linear(48, 40, bias=bias)
    int8 = Int8Linear(layer)
    x = torch.randn(2, 3, 48)

    codes, scales = quantize_int8_weight(layer.weight)
    expected = x @ (codes.float() * scales.float()[:, None]).T + (layer.bias.detach() if bias else 0.0)
    with torch.inference_mode():
        actual = int8(x)

    assert actual.shape == (2, 3, 40)
    assert actual.dtype == torch.float32
    # bfloat16 activations: about 3 significant digits
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-2


def test_quantize_int8_converts_every_linear():
    model = quantize_int8(copy.deepcopy(make_tiny_model("llama")))

    int8_layers = [module for module in model.modules() if isinstance(module, Int8Linear)]
    assert len(int8_layers) == 2 * 7 + 1
    assert not [module for module in model.modules() if type(module) is nn.Linear]
    assert model.get_output_embeddings() in int8_layers
    assert model.dtype == torch.float32


def test_prepack_replaces_every_linear():
    model = copy.deepcopy(make_tiny_model("llama"))
    count = prepack_linears(model)

    # 2 layers of 7 projections, plus lm_head
    assert count == 2 * 7 + 1
    assert not [module for module in model.modules() if type(module) is nn.Linear]
    assert model.get_output_embeddings().out_features == model.config.vocab_size


def test_quantize_int4_keeps_head_in_bfloat16():
    model = quantize_int4(copy.deepcopy(make_tiny_model("llama")))

    int4_layers = [module for module in model.modules() if isinstance(module, Int4Linear)]
    head = model.get_output_embeddings()
    assert len(int4_layers) == 2 * 7
    assert isinstance(head, PackedLinear)
    assert head.compute_dtype == torch.bfloat16
    assert model.dtype == torch.float32


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma3"])
def test_prepacked_model_greedy_matches_original(arch):
    original = make_tiny_model(arch)
    packed = copy.deepcopy(original)
    prepack_linears(packed)
    prompt = random_prompt(10)

    expected, _ = greedy_generate(original, prompt, max_new_tokens=12, eos_token_id=EOS_ID)
    actual, _ = greedy_generate(packed, prompt, max_new_tokens=12, eos_token_id=EOS_ID)

    assert torch.equal(actual, expected)


def test_prepacked_model_matches_hf_generate_batched():
    model = copy.deepcopy(make_tiny_model("llama"))
    prepack_linears(model)
    prompts = torch.cat([random_prompt(8, seed=1), random_prompt(8, seed=2)])
    mask = torch.ones_like(prompts)
    mask[1, :3] = 0

    ours, _ = greedy_generate(model, prompts, mask, max_new_tokens=8, eos_token_id=EOS_ID, pad_token_id=0)
    ours_beam, _ = beam_search(model, prompts, mask, num_beams=2, max_new_tokens=8, eos_token_id=EOS_ID, pad_token_id=0)
    with torch.inference_mode():
        reference = model.generate(prompts, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                   eos_token_id=EOS_ID, pad_token_id=0)
        reference_beam = model.generate(prompts, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                        num_beams=2, eos_token_id=EOS_ID, pad_token_id=0)

    assert torch.equal(ours, reference[:, prompts.shape[1] :])
    assert torch.equal(ours_beam, reference_beam[:, prompts.shape[1] :])
