"""Greedy decoding against transformers `generate(do_sample=False)`, token for token."""

import pytest
import torch
from tiny import ARCHITECTURES, GEMMA3_SLIDING_WINDOW, make_tiny_model, random_prompt

from decoding import GreedyStats, greedy_generate

PAD_ID = 0

# prompt lengths of the batched tests; the longest exceeds Gemma 3's sliding window
BATCH_PROMPT_LENGTHS = (13, 5, 9)
assert max(BATCH_PROMPT_LENGTHS) > GEMMA3_SLIDING_WINDOW

_MODELS: dict[str, torch.nn.Module] = {}


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Run tiny-model tests on one intra-op thread; the slow real-model tests keep the default.

    A tiny model's matrices are too small to split across threads. On a busy
    2-core machine, the waiting OpenMP workers made one beam test take 0.35 s
    instead of 0.02 s.
    """
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(arch: str) -> torch.nn.Module:
    """Return the tiny model of `arch`, built once per test session."""
    if arch not in _MODELS:
        _MODELS[arch] = make_tiny_model(arch)
    return _MODELS[arch]


def left_pad(prompts: list[torch.Tensor], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (1, T_i) prompts into a left-padded (B, T) batch and its attention mask."""
    max_len = max(prompt.shape[1] for prompt in prompts)
    input_ids = torch.full((len(prompts), max_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), max_len), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        length = prompt.shape[1]
        input_ids[row, max_len - length :] = prompt[0]
        attention_mask[row, max_len - length :] = 1
    return input_ids, attention_mask


def batch_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [random_prompt(length, seed=seed) for seed, length in enumerate(BATCH_PROMPT_LENGTHS)]
    return left_pad(prompts)


def hf_greedy(model, input_ids, attention_mask, max_new_tokens, eos_token_id=None, pad_token_id=PAD_ID):
    """Return transformers' greedy continuation (generated ids only)."""
    output = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return output[:, input_ids.shape[1] :]


def row_lengths(new_ids: torch.Tensor, eos_ids: list[int]) -> list[int]:
    """Return each row's length up to and including its first EOS, from the ids alone."""
    lengths = []
    for row in new_ids.tolist():
        ends = [i for i, token in enumerate(row) if token in eos_ids]
        lengths.append(ends[0] + 1 if ends else len(row))
    return lengths


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("max_new_tokens", [1, 2, 17])
def test_greedy_unbatched_matches_hf(arch, max_new_tokens):
    model = tiny(arch)
    input_ids = random_prompt(11, seed=3)

    ours, stats = greedy_generate(model, input_ids, max_new_tokens=max_new_tokens)
    expected = hf_greedy(model, input_ids, None, max_new_tokens)

    assert torch.equal(ours, expected)
    assert ours.shape == (1, max_new_tokens)
    assert stats.new_tokens == max_new_tokens
    assert stats.target_forward_calls == max_new_tokens


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("max_new_tokens", [1, 2, 17])
def test_greedy_batched_left_padding_matches_hf(arch, max_new_tokens):
    model = tiny(arch)
    input_ids, attention_mask = batch_prompts()

    ours, stats = greedy_generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens)
    expected = hf_greedy(model, input_ids, attention_mask, max_new_tokens)

    assert torch.equal(ours, expected)
    assert ours.shape == (len(BATCH_PROMPT_LENGTHS), max_new_tokens)
    assert stats.new_tokens == len(BATCH_PROMPT_LENGTHS) * max_new_tokens


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_batched_equals_each_row_alone(arch):
    model = tiny(arch)
    input_ids, attention_mask = batch_prompts()

    batched, _ = greedy_generate(model, input_ids, attention_mask, max_new_tokens=9)

    for row, length in enumerate(BATCH_PROMPT_LENGTHS):
        alone, _ = greedy_generate(model, input_ids[row : row + 1, -length:], max_new_tokens=9)
        assert torch.equal(batched[row : row + 1], alone), f"row {row}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_per_row_eos_matches_hf(arch):
    model = tiny(arch)
    input_ids, attention_mask = batch_prompts()
    max_new_tokens = 12
    free_run = hf_greedy(model, input_ids, attention_mask, max_new_tokens)
    # an id the model really produces: the third token of row 1
    eos_id = int(free_run[1, 2])

    ours, stats = greedy_generate(
        model, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=PAD_ID
    )
    expected = hf_greedy(model, input_ids, attention_mask, max_new_tokens, eos_token_id=eos_id)

    assert torch.equal(ours, expected)
    lengths = row_lengths(ours, [eos_id])
    assert lengths[1] <= 3
    assert ours[1, lengths[1] - 1] == eos_id
    assert (ours[1, lengths[1] :] == PAD_ID).all()
    # another row keeps growing after row 1 ended
    assert max(lengths) > lengths[1]
    assert stats.new_tokens == sum(lengths)
    # the steps run until the longest row ends: prefill plus one call per later step
    assert stats.target_forward_calls == ours.shape[1]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_eos_list_matches_hf(arch):
    model = tiny(arch)
    input_ids, attention_mask = batch_prompts()
    free_run = hf_greedy(model, input_ids, attention_mask, 10)
    eos_ids = [int(free_run[0, 4]), int(free_run[2, 1])]

    ours, stats = greedy_generate(
        model, input_ids, attention_mask, max_new_tokens=10, eos_token_id=eos_ids, pad_token_id=PAD_ID
    )
    expected = hf_greedy(model, input_ids, attention_mask, 10, eos_token_id=eos_ids)

    assert torch.equal(ours, expected)
    assert stats.new_tokens == sum(row_lengths(ours, eos_ids))


def test_greedy_all_rows_end_early():
    model = tiny("llama")
    input_ids, attention_mask = batch_prompts()
    free_run = hf_greedy(model, input_ids, attention_mask, 8)
    eos_ids = free_run[:, 1].tolist()  # every row ends at its second token or earlier

    ours, stats = greedy_generate(
        model, input_ids, attention_mask, max_new_tokens=8, eos_token_id=eos_ids, pad_token_id=PAD_ID
    )
    expected = hf_greedy(model, input_ids, attention_mask, 8, eos_token_id=eos_ids)

    assert torch.equal(ours, expected)
    assert ours.shape[1] <= 2
    assert stats.target_forward_calls == ours.shape[1]


def test_greedy_pad_defaults_to_first_eos():
    model = tiny("qwen2")
    input_ids, attention_mask = batch_prompts()
    free_run = hf_greedy(model, input_ids, attention_mask, 6)
    eos_id = int(free_run[1, 1])

    ours, _ = greedy_generate(model, input_ids, attention_mask, max_new_tokens=6, eos_token_id=eos_id)

    length = row_lengths(ours, [eos_id])[1]
    assert length < ours.shape[1]
    assert (ours[1, length:] == eos_id).all()


def test_greedy_full_mask_equals_no_mask():
    model = tiny("gemma3")
    input_ids = torch.cat([random_prompt(10, seed=5), random_prompt(10, seed=6)])

    with_mask, _ = greedy_generate(model, input_ids, torch.ones_like(input_ids), max_new_tokens=7)
    without_mask, _ = greedy_generate(model, input_ids, max_new_tokens=7)

    assert torch.equal(with_mask, without_mask)
    assert torch.equal(with_mask, hf_greedy(model, input_ids, None, 7))


def test_greedy_stats_to_dict():
    model = tiny("gpt2")

    _, stats = greedy_generate(model, random_prompt(4), max_new_tokens=3)

    assert isinstance(stats, GreedyStats)
    as_dict = stats.to_dict()
    assert set(as_dict) == {"new_tokens", "target_forward_calls", "wall_time_s"}
    assert as_dict["new_tokens"] == 3
    assert as_dict["target_forward_calls"] == 3
    assert as_dict["wall_time_s"] > 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, r"max_new_tokens must be >= 1, got 0 \(set generation.max_new_tokens\)"),
        ({"max_new_tokens": -3}, r"max_new_tokens must be >= 1, got -3"),
        ({"max_new_tokens": 2.5}, r"max_new_tokens must be an int, got 2.5"),
        ({"max_new_tokens": 4, "eos_token_id": -1}, r"eos_token_id must be None, an int >= 0"),
        ({"max_new_tokens": 4, "eos_token_id": [2, "x"]}, r"eos_token_id must be None, an int >= 0"),
        ({"max_new_tokens": 4, "pad_token_id": -1}, r"pad_token_id must be None or an int >= 0"),
    ],
)
def test_greedy_invalid_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        greedy_generate(tiny("llama"), random_prompt(4), **kwargs)


def test_greedy_invalid_prompts_raise():
    model = tiny("llama")
    input_ids, attention_mask = batch_prompts()

    with pytest.raises(ValueError, match=r"left padding \(set tokenizer.padding_side = 'left'\)"):
        greedy_generate(model, input_ids, attention_mask.flip(-1), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids"):
        greedy_generate(model, input_ids, attention_mask[:, 1:], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids must be a 2-D \(batch, length\) tensor, got \(13,\)"):
        greedy_generate(model, input_ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids must be a LongTensor"):
        greedy_generate(model, input_ids.int(), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"at least one token per row"):
        greedy_generate(model, input_ids[:, :0], max_new_tokens=2)


# --- the real SmolLM2-135M-Instruct on chat prompts of real questions ---

NUM_QUESTIONS = 4
SMOLLM2_NEW_TOKENS = 24


def smollm2_batch(loaded):
    """Render the first questions of the shipped NQ-Open subset as a left-padded chat batch."""
    from experiments.data import load_dataset
    from experiments.prompts import render_prompt

    items = load_dataset("datasets/nq_open_subset.jsonl", limit=NUM_QUESTIONS)
    return render_prompt(loaded.tokenizer, [item.question for item in items])


@pytest.mark.slow
def test_greedy_smollm2_batched_matches_hf(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    batch = smollm2_batch(smollm2)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    ours, stats = greedy_generate(
        model, batch["input_ids"], batch["attention_mask"],
        max_new_tokens=SMOLLM2_NEW_TOKENS, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    expected = hf_greedy(
        model, batch["input_ids"], batch["attention_mask"], SMOLLM2_NEW_TOKENS, eos_token_id=eos_id, pad_token_id=pad_id
    )

    assert torch.equal(ours, expected)
    assert stats.new_tokens == sum(row_lengths(ours, [eos_id]))


@pytest.mark.slow
def test_greedy_smollm2_unbatched_matches_hf(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    batch = smollm2_batch(smollm2)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    for row in range(NUM_QUESTIONS):
        keep = batch["attention_mask"][row].bool()
        input_ids = batch["input_ids"][row : row + 1, keep]
        ours, _ = greedy_generate(
            model, input_ids, max_new_tokens=SMOLLM2_NEW_TOKENS, eos_token_id=eos_id, pad_token_id=pad_id
        )
        expected = hf_greedy(model, input_ids, None, SMOLLM2_NEW_TOKENS, eos_token_id=eos_id, pad_token_id=pad_id)
        assert torch.equal(ours, expected), f"question {row}: {tokenizer.decode(ours[0])!r}"
