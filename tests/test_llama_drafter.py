"""LlamaDraftRunner against transformers' forward pass, and LlamaDrafter inside speculative decoding."""

import copy
import logging

import pytest
import torch
from tiny import make_tiny_model, random_prompt

from decoding.speculative import IncrementalModel, ModelDrafter, speculative_generate
from experiments.linear_kernels import prepack_linears, quantize_int4, quantize_int8
from experiments.llama_drafter import LlamaDrafter, LlamaDraftRunner, lean_runner_supported, model_drafter

EOS_ID = 2
PAD_ID = 0
NEW_TOKENS = 24


def hf_greedy(model, prompt, max_new_tokens=NEW_TOKENS):
    with torch.inference_mode():
        output = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        )
    return output[:, prompt.shape[1] :]


def hf_logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits[0]  # (T, V)


def test_runner_logits_match_transformers():
    model = make_tiny_model("llama")
    runner = LlamaDraftRunner(model)
    ids = random_prompt(12)
    expected = hf_logits(model, ids)

    # a prefill block, one token, then a block of three, as speculative decoding feeds them
    runner.start(16)
    actual = torch.cat([runner.forward(ids[:, :8], 8), runner.forward(ids[:, 8:9]), runner.forward(ids[:, 9:], 3)])

    assert runner.length == 12
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantize", [quantize_int4, quantize_int8])
def test_runner_fused_projections_match_modules(quantize):
    # The runner fuses q, k and v (and gate and up) into one low-bit product. The
    # model's own forward pass calls each layer with the same weights.
    model = quantize(copy.deepcopy(make_tiny_model("llama")))
    runner = LlamaDraftRunner(model)
    ids = random_prompt(10)
    expected = hf_logits(model, ids)

    runner.start(16)
    actual = torch.cat([runner.forward(ids[:, :7], 7), runner.forward(ids[:, 7:], 3)])

    assert runner.projection_dtype == torch.bfloat16
    # bfloat16 products summed in another order: about 3 significant digits
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize(("quantize", "fused"), [(quantize_int8, True), (quantize_int4, False)])
def test_fusion_checked_against_layers(quantize, fused, caplog):
    # the tiny model's k and v projections have 16 outputs: int8 codes stack at any
    # size, but int4's packed layout does not stack below its block of output rows
    model = quantize(copy.deepcopy(make_tiny_model("llama")))

    with caplog.at_level(logging.DEBUG, logger="experiments.llama_drafter"):
        LlamaDraftRunner(model)

    fallback = [record for record in caplog.records if "differs from the layers" in record.getMessage()]
    assert (fallback == []) is fused


def test_runner_crop_then_refeed_is_unchanged():
    runner = LlamaDraftRunner(make_tiny_model("llama"))
    ids = random_prompt(10)
    runner.start(16)
    runner.forward(ids[:, :6], 1)
    first = runner.forward(ids[:, 6:], 4)

    # overwrite the last four positions with other tokens, then go back and feed the originals
    runner.crop(6)
    runner.forward(random_prompt(4, seed=5), 4)
    runner.crop(6)
    again = runner.forward(ids[:, 6:], 4)

    assert torch.equal(again, first)


def test_runner_copy_from_target_cache():
    model = make_tiny_model("llama")
    ids = random_prompt(10)
    state = IncrementalModel(model, "target")
    state.extend_to(ids, 9)

    runner = LlamaDraftRunner(model)
    runner.start(16)
    runner.copy_from(state.cache, 9)
    logits = runner.forward(ids[:, 9:10])

    assert runner.length == 10
    torch.testing.assert_close(logits[0], hf_logits(model, ids)[-1], rtol=1e-4, atol=1e-4)


def test_runner_rejects_overflow():
    runner = LlamaDraftRunner(make_tiny_model("llama"))
    runner.start(4)
    with pytest.raises(ValueError, match="room for 4 positions, but 5 are needed"):
        runner.forward(random_prompt(5))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma3", "stablelm"])
def test_other_architectures_not_supported(arch):
    model = make_tiny_model(arch)

    assert lean_runner_supported(model) is False
    assert model_drafter(model) is model
    with pytest.raises(ValueError, match="use ModelDrafter instead"):
        LlamaDraftRunner(model)


def test_model_drafter_for_llama():
    model = make_tiny_model("llama")

    assert isinstance(model_drafter(model), LlamaDrafter)
    assert isinstance(model_drafter(make_tiny_model("gpt2"), min_confidence=0.5), ModelDrafter)
    assert lean_runner_supported(copy.deepcopy(model).to(torch.bfloat16)) is False


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_speculative_with_llama_drafter_matches_hf(k, share):
    target = make_tiny_model("llama", seed=0)
    drafter = LlamaDrafter(make_tiny_model("llama", seed=1), share_target_cache=share)
    prompt = random_prompt(9)

    new_ids, stats = speculative_generate(target, drafter, prompt, k=k, max_new_tokens=NEW_TOKENS, eos_token_id=EOS_ID)

    assert torch.equal(new_ids, hf_greedy(target, prompt))
    assert stats.new_tokens == new_ids.shape[1]


def test_shared_cache_skips_draft_prefill():
    target = make_tiny_model("llama")
    prompt = random_prompt(9)

    _, shared = speculative_generate(target, LlamaDrafter(target), prompt, k=4, max_new_tokens=NEW_TOKENS)
    _, own = speculative_generate(
        target, LlamaDrafter(target, share_target_cache=False), prompt, k=4, max_new_tokens=NEW_TOKENS
    )

    # the same model drafts, so every draft token is accepted either way
    assert shared.acceptance_rate == 1.0
    assert own.acceptance_rate == 1.0
    # without sharing, the draft spends one extra call on its prompt prefill
    assert own.draft_forward_calls == shared.draft_forward_calls + 1


def test_shared_cache_not_used_for_other_shapes():
    drafter = LlamaDrafter(make_tiny_model("llama"))
    other = IncrementalModel(make_tiny_model("qwen2"), "target")

    assert drafter.use_target_cache(other) is False
    assert drafter.use_target_cache(IncrementalModel(make_tiny_model("llama", seed=3), "target")) is True


@pytest.mark.parametrize("quantize", [quantize_int4, quantize_int8])
def test_quantized_drafts_match_hf(quantize):
    target = copy.deepcopy(make_tiny_model("llama"))
    prepack_linears(target)
    draft = quantize(copy.deepcopy(make_tiny_model("llama")))
    prompt = random_prompt(9)

    new_ids, stats = speculative_generate(target, model_drafter(draft), prompt, k=4, max_new_tokens=NEW_TOKENS)

    assert torch.equal(new_ids, hf_greedy(target, prompt))
    assert stats.drafted > 0


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_runs_repeat_with_seed(temperature):
    target = make_tiny_model("llama", seed=0)
    drafter = LlamaDrafter(make_tiny_model("llama", seed=1))
    prompt = random_prompt(9)

    runs = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(123)
        new_ids, _ = speculative_generate(
            target, drafter, prompt, k=4, max_new_tokens=NEW_TOKENS, temperature=temperature, generator=generator
        )
        runs.append(new_ids)

    assert torch.equal(runs[0], runs[1])


# --- the real SmolLM2-135M-Instruct with its int4 draft --------------------------------

SMOLLM2_QUESTIONS = (
    "What is the capital of France?",
    "Who wrote the play Romeo and Juliet?",
    "when was the last time anyone was on the moon",
)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_smollm2_int4_llama_drafter_matches_greedy(smollm2, smollm2_int4, k):
    from decoding import greedy_generate
    from experiments.prompts import render_prompt

    drafter = model_drafter(smollm2_int4.model)
    assert isinstance(drafter, LlamaDrafter)
    eos_ids = [smollm2.tokenizer.eos_token_id]
    accepted = drafted = 0
    for question in SMOLLM2_QUESTIONS:
        batch = render_prompt(smollm2.tokenizer, [question], "Answer the question with a short phrase.")
        expected, _ = greedy_generate(
            smollm2.model, batch["input_ids"], batch["attention_mask"], max_new_tokens=24, eos_token_id=eos_ids
        )
        actual, stats = speculative_generate(
            smollm2.model, drafter, batch["input_ids"], batch["attention_mask"], k=k, max_new_tokens=24,
            eos_token_id=eos_ids,
        )
        assert torch.equal(actual, expected), question
        accepted += stats.accepted
        drafted += stats.drafted

    # the int4 draft reproduces nearly every greedy token of its float32 target
    assert accepted / drafted > 0.7
