"""Beam search against transformers `generate(num_beams=..., do_sample=False)`: sequences and scores."""

import contextlib
import itertools

import pytest
import torch
from test_greedy import (  # noqa: F401 - the autouse fixture applies to this module too
    PAD_ID,
    batch_prompts,
    hf_greedy,
    one_thread_for_tiny_models,
    row_lengths,
    smollm2_batch,
    tiny,
)
from tiny import ARCHITECTURES, random_prompt

from decoding import BeamStats, beam_search

SCORE_TOLERANCE = 1e-4

# transformers 5.25 fills a beam-search output after EOS with the EOS id when the pad id
# is 0, so the parity tests pass a non-zero pad id and both sides write it
HF_PAD_ID = 7

SETTINGS_GRID = list(itertools.product([2, 4], [0.5, 1.0, 2.0], [True, False, "never"]))


@contextlib.contextmanager
def count_forward_calls(model):
    """Count the model's forward calls inside the block into the yielded list's length."""
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


def hf_beam(model, input_ids, attention_mask, *, num_beams, max_new_tokens, length_penalty=1.0,
            early_stopping=False, eos_token_id=None, pad_token_id=HF_PAD_ID):
    """Return transformers' best beam (generated ids only), its length-penalised scores and its forward calls."""
    with count_forward_calls(model) as calls:
        output = model.generate(
            input_ids,
            attention_mask=attention_mask,
            num_beams=num_beams,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return output.sequences[:, input_ids.shape[1] :], output.sequences_scores, len(calls)


def eos_ids_from_greedy(model, input_ids, attention_mask) -> list[int]:
    """Return two ids the model really produces early on: greedy tokens of rows 0 and 1."""
    free_run = hf_greedy(model, input_ids, attention_mask, 4)
    return [int(free_run[0, 2]), int(free_run[1, 3])]


def assert_matches_hf(ours, stats, expected, expected_scores, expected_calls):
    assert torch.equal(ours, expected)
    # the same number of steps, so the stopping rule ends the search where transformers does
    assert stats.target_forward_calls == expected_calls
    assert isinstance(stats, BeamStats)
    assert len(stats.sequence_scores) == ours.shape[0]
    scores = torch.tensor(stats.sequence_scores)
    assert torch.allclose(scores, expected_scores.float(), atol=SCORE_TOLERANCE, rtol=0.0), (
        f"{scores.tolist()} != {expected_scores.tolist()}"
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(("num_beams", "length_penalty", "early_stopping"), SETTINGS_GRID)
def test_beam_batched_eos_matches_hf(arch, num_beams, length_penalty, early_stopping):
    model = tiny(arch)
    input_ids, attention_mask = batch_prompts()
    eos_ids = eos_ids_from_greedy(model, input_ids, attention_mask)
    settings = dict(
        num_beams=num_beams, max_new_tokens=10, length_penalty=length_penalty,
        early_stopping=early_stopping, eos_token_id=eos_ids, pad_token_id=HF_PAD_ID,
    )

    ours, stats = beam_search(model, input_ids, attention_mask, **settings)
    expected, expected_scores, expected_calls = hf_beam(model, input_ids, attention_mask, **settings)

    assert_matches_hf(ours, stats, expected, expected_scores, expected_calls)
    assert stats.new_tokens == sum(row_lengths(ours, eos_ids))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("max_new_tokens", [1, 2, 9])
def test_beam_no_eos_matches_hf(arch, max_new_tokens):
    model = tiny(arch)
    input_ids, attention_mask = batch_prompts()
    settings = dict(num_beams=3, max_new_tokens=max_new_tokens, length_penalty=1.0, early_stopping=False)

    ours, stats = beam_search(model, input_ids, attention_mask, **settings)
    expected, expected_scores, expected_calls = hf_beam(model, input_ids, attention_mask, **settings)

    assert_matches_hf(ours, stats, expected, expected_scores, expected_calls)
    assert ours.shape == (input_ids.shape[0], max_new_tokens)
    assert stats.new_tokens == input_ids.shape[0] * max_new_tokens
    assert stats.target_forward_calls == max_new_tokens


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("max_new_tokens", [1, 2, 9])
def test_beam_unbatched_matches_hf(arch, max_new_tokens):
    model = tiny(arch)
    input_ids = random_prompt(12, seed=4)
    eos_ids = eos_ids_from_greedy(model, torch.cat([input_ids, input_ids]), None)[:1]
    settings = dict(num_beams=2, max_new_tokens=max_new_tokens, early_stopping=True, eos_token_id=eos_ids)

    ours, stats = beam_search(model, input_ids, pad_token_id=HF_PAD_ID, **settings)
    expected, expected_scores, expected_calls = hf_beam(model, input_ids, None, **settings)

    assert_matches_hf(ours, stats, expected, expected_scores, expected_calls)


def test_beam_eos_cases_are_exercised():
    """The EOS grid above must contain early ends, or it would only test the length limit."""
    model = tiny("llama")
    input_ids, attention_mask = batch_prompts()
    eos_ids = eos_ids_from_greedy(model, input_ids, attention_mask)
    ended_early = 0

    for num_beams, length_penalty, early_stopping in SETTINGS_GRID:
        ours, _ = beam_search(
            model, input_ids, attention_mask, num_beams=num_beams, max_new_tokens=10,
            length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos_ids,
            pad_token_id=HF_PAD_ID,
        )
        ended_early += sum(length < 10 for length in row_lengths(ours, eos_ids))

    assert ended_early >= len(SETTINGS_GRID)


def test_beam_score_matches_forced_logprob():
    """The returned score is sum(log p) / length ** length_penalty of the returned tokens."""
    model = tiny("qwen2")
    input_ids = random_prompt(9, seed=8)
    length_penalty = 2.0

    new_ids, stats = beam_search(model, input_ids, num_beams=4, max_new_tokens=6, length_penalty=length_penalty)

    full = torch.cat([input_ids, new_ids], dim=1)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(full).logits[0, :-1].float(), dim=-1)  # (T + N - 1, V)
    prompt_len, num_new = input_ids.shape[1], new_ids.shape[1]
    token_log_probs = log_probs[prompt_len - 1 :].gather(-1, new_ids[0, :, None])  # (N, 1)
    expected = token_log_probs.sum().item() / num_new**length_penalty
    assert stats.sequence_scores[0] == pytest.approx(expected, abs=SCORE_TOLERANCE)


def test_beam_pads_with_pad_id_after_eos():
    model = tiny("gemma3")
    input_ids, attention_mask = batch_prompts()
    eos_ids = eos_ids_from_greedy(model, input_ids, attention_mask)

    ours, _ = beam_search(
        model, input_ids, attention_mask, num_beams=2, max_new_tokens=10,
        early_stopping=True, eos_token_id=eos_ids, pad_token_id=PAD_ID,
    )

    lengths = row_lengths(ours, eos_ids)
    assert min(lengths) < ours.shape[1]
    for row, length in enumerate(lengths):
        assert (ours[row, length:] == PAD_ID).all(), f"row {row}"


def test_beam_stats_to_dict():
    _, stats = beam_search(tiny("gpt2"), random_prompt(5), num_beams=2, max_new_tokens=3)

    as_dict = stats.to_dict()
    assert set(as_dict) == {"new_tokens", "target_forward_calls", "wall_time_s", "sequence_scores"}
    assert as_dict["new_tokens"] == 3
    assert as_dict["target_forward_calls"] == 3
    assert len(as_dict["sequence_scores"]) == 1
    assert as_dict["sequence_scores"][0] < 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_beams": 1}, r"num_beams must be an int >= 2, got 1 \(set beam.num_beams"),
        ({"num_beams": 0}, r"num_beams must be an int >= 2, got 0"),
        ({"num_beams": 2.0}, r"num_beams must be an int >= 2, got 2.0"),
        ({"early_stopping": "always"}, r"early_stopping must be true, false or \"never\", got 'always'"),
        ({"early_stopping": 1}, r"early_stopping must be true, false or \"never\", got 1"),
        ({"length_penalty": "long"}, r"length_penalty must be a finite number, got 'long' \(set beam.length_penalty\)"),
        ({"length_penalty": float("nan")}, r"length_penalty must be a finite number, got nan"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be >= 1, got 0 \(set generation.max_new_tokens\)"),
        ({"eos_token_id": -2}, r"eos_token_id must be None, an int >= 0"),
    ],
)
def test_beam_invalid_settings_raise(kwargs, message):
    settings = dict(num_beams=2, max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        beam_search(tiny("llama"), random_prompt(4), **settings)


# --- the real SmolLM2-135M-Instruct on chat prompts of real questions ---

SMOLLM2_NEW_TOKENS = 24


@pytest.mark.slow
def test_beam_smollm2_batched_matches_hf(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    batch = smollm2_batch(smollm2)
    settings = dict(
        num_beams=3, max_new_tokens=SMOLLM2_NEW_TOKENS, length_penalty=1.0, early_stopping=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=HF_PAD_ID,
    )

    ours, stats = beam_search(model, batch["input_ids"], batch["attention_mask"], **settings)
    expected, expected_scores, expected_calls = hf_beam(model, batch["input_ids"], batch["attention_mask"], **settings)

    assert_matches_hf(ours, stats, expected, expected_scores, expected_calls)
