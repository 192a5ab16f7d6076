"""Speculative decoding: greedy equivalence with transformers, caches, EOS, stats, errors, debug log."""

import json
import logging

import pytest
import torch
from tiny import ARCHITECTURES, GEMMA3_SLIDING_WINDOW, VOCAB_SIZE, make_tiny_model, random_prompt
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from decoding.prompt_lookup import PromptLookupDrafter
from decoding.speculative import (
    CombinedDrafter,
    DraftProposal,
    ModelDrafter,
    SpeculativeStats,
    speculative_generate,
)

EOS_ID = 2
PAD_ID = 0
NEW_TOKENS = 24
# longer than Gemma 3's sliding window, so its sliding layers must drop early keys
LONG_PROMPT = 20
assert LONG_PROMPT > GEMMA3_SLIDING_WINDOW

_MODELS: dict[tuple[str, int], torch.nn.Module] = {}


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """Return the tiny model of `arch` with weights from `seed`, built once per session."""
    if (arch, seed) not in _MODELS:
        _MODELS[arch, seed] = make_tiny_model(arch, seed=seed)
    return _MODELS[arch, seed]


def hf_greedy(model, input_ids, max_new_tokens, eos_token_id=EOS_ID):
    """Return transformers' greedy continuation (generated ids only)."""
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=PAD_ID,
    )
    return output[:, input_ids.shape[1] :]


def repetitive_prompt(length: int, period: int = 5, seed: int = 0) -> torch.Tensor:
    """Return a (1, length) prompt that repeats a random block, so prompt lookup finds matches."""
    block = random_prompt(period, seed=seed)
    return block.repeat(1, length // period + 1)[:, :length]


def check_stats_invariants(stats: SpeculativeStats, new_ids: torch.Tensor) -> None:
    assert stats.new_tokens == new_ids.shape[1]
    assert stats.new_tokens == stats.accepted + stats.rejected + stats.bonus_tokens + stats.undrafted_tokens
    assert stats.accepted == sum(stats.acceptance_histogram)
    assert stats.accepted <= stats.drafted
    assert stats.target_forward_calls >= stats.verification_calls
    json.dumps(stats.to_dict())


class OracleDrafter:
    """Drafter given the target's greedy output `reference` (1, N).

    At step s it proposes the reference tokens for the first `correct(s)` positions and
    a wrong token after them, so the accepted count of every step is known in advance.
    It records the sequence length at each call to `propose`.
    """

    def __init__(self, reference: torch.Tensor, prompt_len: int, correct=lambda step: 10**9):
        self.reference = reference[0]
        self.prompt_len = prompt_len
        self.correct = correct
        self.lengths: list[int] = []
        self.accepted_plan: list[int] = []

    def check_vocabulary(self, target):
        pass

    def begin(self, sequence, length, settings):
        return 0

    def propose(self, sequence, length, num_tokens, generator):
        step = len(self.lengths)
        self.lengths.append(length)
        start = length - self.prompt_len
        tokens = self.reference[start : start + num_tokens].clone()
        num_correct = min(self.correct(step), tokens.shape[0])
        if num_correct < tokens.shape[0]:
            # any token but the reference one is rejected by greedy verification
            tokens[num_correct] = (tokens[num_correct] + 1) % VOCAB_SIZE
        self.accepted_plan.append(num_correct)
        return DraftProposal(tokens=tokens, q=None, forward_calls=0)

    def rollback(self, sequence, length):
        return 0


# --- greedy equivalence with transformers on every tiny architecture ---


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_draft_model_matches_hf(arch, k):
    target, draft = tiny(arch, seed=0), tiny(arch, seed=1)
    for prompt_len in (1, 6, LONG_PROMPT):
        prompt = random_prompt(prompt_len, seed=prompt_len)
        expected = hf_greedy(target, prompt, NEW_TOKENS)

        ours, stats = speculative_generate(target, draft, prompt, k=k, max_new_tokens=NEW_TOKENS, eos_token_id=EOS_ID)

        assert torch.equal(ours, expected), f"prompt length {prompt_len}"
        check_stats_invariants(stats, ours)
        assert stats.cache_refills == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_prompt_lookup_matches_hf(arch, k):
    target = tiny(arch)
    drafted = 0
    for prompt_len in (6, LONG_PROMPT):
        prompt = repetitive_prompt(prompt_len, seed=prompt_len)
        expected = hf_greedy(target, prompt, NEW_TOKENS)

        ours, stats = speculative_generate(
            target, PromptLookupDrafter(max_ngram_size=3), prompt, k=k, max_new_tokens=NEW_TOKENS, eos_token_id=EOS_ID
        )

        assert torch.equal(ours, expected), f"prompt length {prompt_len}"
        check_stats_invariants(stats, ours)
        assert stats.draft_forward_calls == 0
        drafted += stats.drafted
    assert drafted > 0, "prompt lookup never proposed a token, so verification was not exercised"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_greedy_combined_drafter_matches_hf(arch):
    target = tiny(arch)
    prompt = repetitive_prompt(LONG_PROMPT, seed=3)
    expected = hf_greedy(target, prompt, NEW_TOKENS)
    drafter = CombinedDrafter(PromptLookupDrafter(), ModelDrafter(tiny(arch, seed=1)))

    ours, stats = speculative_generate(target, drafter, prompt, k=4, max_new_tokens=NEW_TOKENS, eos_token_id=EOS_ID)

    assert torch.equal(ours, expected)
    check_stats_invariants(stats, ours)
    assert stats.draft_forward_calls > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_confident_draft_stops_early(arch):
    target = tiny(arch)
    prompt = random_prompt(LONG_PROMPT, seed=12)
    expected = hf_greedy(target, prompt, NEW_TOKENS, eos_token_id=None)
    # the target as its own draft is right every time, so only the confidence rule stops it
    settings = dict(k=4, max_new_tokens=NEW_TOKENS, eos_token_id=None)

    full, full_stats = speculative_generate(target, ModelDrafter(target), prompt, **settings)
    early, early_stats = speculative_generate(target, ModelDrafter(target, min_confidence=0.9), prompt, **settings)

    assert torch.equal(full, expected)
    assert torch.equal(early, expected)
    assert early_stats.draft_forward_calls < full_stats.draft_forward_calls
    assert early_stats.acceptance_rate == 1.0
    check_stats_invariants(early_stats, early)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sampling_draft_greedy_target_matches_hf(arch):
    # a draft that samples (top_k=50, temperature 0.7) must not change a greedy target's output
    target, draft = tiny(arch), tiny(arch, seed=1)
    prompt = random_prompt(LONG_PROMPT, seed=7)
    expected = hf_greedy(target, prompt, NEW_TOKENS)

    for proposal in ("sample", "gumbel_topk", "greedy"):
        ours, stats = speculative_generate(
            target, draft, prompt, k=4, max_new_tokens=NEW_TOKENS, eos_token_id=EOS_ID, temperature=0.0,
            draft_temperature=0.7, draft_top_k=50, draft_proposal=proposal, generator=torch.Generator().manual_seed(0),
        )
        assert torch.equal(ours, expected), proposal
        check_stats_invariants(stats, ours)


def test_gemma3_uncroppable_cache_refills(monkeypatch, caplog):
    # without past recording a sliding-window cache past its window cannot be cropped
    monkeypatch.setattr(DynamicCache, "activate_past_recording", lambda self, **kwargs: None)
    target, draft = tiny("gemma3"), tiny("gemma3", seed=1)
    prompt = random_prompt(LONG_PROMPT, seed=11)
    expected = hf_greedy(target, prompt, NEW_TOKENS)

    with caplog.at_level(logging.WARNING, logger="decoding.speculative"):
        ours, stats = speculative_generate(target, draft, prompt, k=4, max_new_tokens=NEW_TOKENS, eos_token_id=EOS_ID)

    assert torch.equal(ours, expected)
    assert stats.cache_refills > 0
    assert "cannot be cropped" in caplog.text


def test_left_padding_is_removed():
    target, draft = tiny("llama"), tiny("llama", seed=1)
    prompt = random_prompt(9, seed=4)
    padded = torch.cat([torch.full((1, 3), PAD_ID), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(prompt)], dim=1)

    ours, _ = speculative_generate(target, draft, padded, mask, k=3, max_new_tokens=NEW_TOKENS, eos_token_id=EOS_ID)

    assert torch.equal(ours, hf_greedy(target, prompt, NEW_TOKENS))


# --- draft equal to the target ---


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_draft_equal_to_target_greedy_accepts_all(arch):
    target = tiny(arch)
    ours, stats = speculative_generate(
        target, target, random_prompt(LONG_PROMPT, seed=5), k=4, max_new_tokens=40, eos_token_id=None
    )
    assert stats.acceptance_rate == 1.0
    assert stats.rejected == 0
    assert stats.drafted > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_draft_equal_to_target_sampled_accepts_almost_all(arch):
    target = tiny(arch)
    generator = torch.Generator().manual_seed(0)
    drafted = accepted = 0
    for seed in range(5):
        _, stats = speculative_generate(
            target, target, random_prompt(LONG_PROMPT, seed=seed), k=4, max_new_tokens=60,
            temperature=1.0, eos_token_id=None, generator=generator,
        )
        drafted += stats.drafted
        accepted += stats.accepted
    assert drafted >= 200
    assert accepted / drafted > 0.99


# --- step structure with a drafter that disagrees on purpose ---


@pytest.mark.parametrize("k", [1, 3, 4])
def test_disagreeing_draft_steps_add_accepted_plus_one(k):
    target = tiny("llama")
    prompt = random_prompt(7, seed=2)
    expected = hf_greedy(target, prompt, NEW_TOKENS, eos_token_id=None)
    # step s agrees on its first s % (k + 1) tokens, so every accepted count from 0 to k occurs
    drafter = OracleDrafter(expected, prompt.shape[1], correct=lambda step: step % (k + 1))

    ours, stats = speculative_generate(target, drafter, prompt, k=k, max_new_tokens=NEW_TOKENS, eos_token_id=None)

    assert torch.equal(ours, expected)
    lengths = drafter.lengths + [prompt.shape[1] + NEW_TOKENS]
    for step, accepted in enumerate(drafter.accepted_plan):
        assert lengths[step + 1] - lengths[step] == accepted + 1, f"step {step}"
    assert stats.accepted == sum(drafter.accepted_plan)
    check_stats_invariants(stats, ours)


def test_always_wrong_draft_matches_greedy():
    target = tiny("qwen2")
    prompt = random_prompt(7, seed=3)
    expected = hf_greedy(target, prompt, NEW_TOKENS, eos_token_id=None)
    drafter = OracleDrafter(expected, prompt.shape[1], correct=lambda step: 0)

    ours, stats = speculative_generate(target, drafter, prompt, k=4, max_new_tokens=NEW_TOKENS, eos_token_id=None)

    assert torch.equal(ours, expected)
    assert stats.accepted == 0
    assert stats.rejected == NEW_TOKENS - 1  # the last step has one token left and drafts nothing
    assert stats.undrafted_tokens == 1
    assert stats.verification_calls == NEW_TOKENS
    assert stats.acceptance_rate == 0.0


# --- EOS, max_new_tokens and k ---


def test_eos_inside_accepted_block_ends_output():
    target = tiny("llama")
    prompt = random_prompt(7, seed=2)
    free_run = hf_greedy(target, prompt, NEW_TOKENS, eos_token_id=None)[0].tolist()
    # an EOS at output position 5, the first token of the second block of k=4 drafts plus bonus
    eos_position = 5
    eos_id = free_run[eos_position]
    assert eos_id not in free_run[:eos_position], "pick a prompt whose token 5 is new"
    expected = hf_greedy(target, prompt, NEW_TOKENS, eos_token_id=eos_id)
    assert expected.shape[1] == eos_position + 1

    drafter = OracleDrafter(torch.tensor([free_run]), prompt.shape[1])
    ours, stats = speculative_generate(target, drafter, prompt, k=4, max_new_tokens=NEW_TOKENS, eos_token_id=eos_id)

    assert torch.equal(ours, expected)
    # step 1: 4 accepted + bonus; step 2: the EOS accepted at position 0, nothing counted after it
    assert stats.drafted == 5
    assert stats.accepted == 5
    assert stats.bonus_tokens == 1
    assert stats.rejected == 0
    assert stats.acceptance_histogram == [2, 1, 1, 1]
    assert stats.new_tokens == 6
    assert stats.verification_calls == 2


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eos_from_draft_model_matches_hf(arch):
    target = tiny(arch)
    prompt = random_prompt(LONG_PROMPT, seed=9)
    free_run = hf_greedy(target, prompt, NEW_TOKENS, eos_token_id=None)[0].tolist()
    eos_id = free_run[NEW_TOKENS // 2]
    expected = hf_greedy(target, prompt, NEW_TOKENS, eos_token_id=eos_id)

    for draft in (target, tiny(arch, seed=1)):
        ours, stats = speculative_generate(target, draft, prompt, k=4, max_new_tokens=NEW_TOKENS, eos_token_id=eos_id)
        assert torch.equal(ours, expected)
        assert ours[0, -1].item() == eos_id
        check_stats_invariants(stats, ours)


def test_draft_stops_after_eos():
    target = tiny("llama")
    prompt = random_prompt(LONG_PROMPT, seed=9)
    free_run = hf_greedy(target, prompt, NEW_TOKENS, eos_token_id=None)[0].tolist()
    # an EOS id that first appears as the third generated token
    position = next(i for i in range(2, NEW_TOKENS) if free_run[i] not in free_run[:i])
    eos_id = free_run[position]

    ours, stats = speculative_generate(
        target, ModelDrafter(target), prompt, k=8, max_new_tokens=NEW_TOKENS, eos_token_id=eos_id
    )

    assert torch.equal(ours, hf_greedy(target, prompt, NEW_TOKENS, eos_token_id=eos_id))
    # one step: the prompt prefill, then one draft pass per token up to and including the EOS
    assert stats.verification_calls == 1
    assert stats.draft_forward_calls == 1 + position + 1
    assert stats.drafted == position + 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("max_new_tokens", [1, 2])
def test_short_outputs_match_hf(arch, max_new_tokens):
    target, draft = tiny(arch), tiny(arch, seed=1)
    prompt = random_prompt(LONG_PROMPT, seed=1)
    expected = hf_greedy(target, prompt, max_new_tokens, eos_token_id=None)

    ours, stats = speculative_generate(target, draft, prompt, k=4, max_new_tokens=max_new_tokens, eos_token_id=None)

    assert torch.equal(ours, expected)
    assert stats.new_tokens == max_new_tokens
    # one token left means nothing is drafted; two tokens left allow one draft token
    assert stats.drafted == max_new_tokens - 1
    check_stats_invariants(stats, ours)


def test_k_larger_than_tokens_left():
    target = tiny("llama")
    prompt = random_prompt(7, seed=2)
    expected = hf_greedy(target, prompt, 3, eos_token_id=None)
    drafter = OracleDrafter(expected, prompt.shape[1])

    ours, stats = speculative_generate(target, drafter, prompt, k=8, max_new_tokens=3, eos_token_id=None)

    assert torch.equal(ours, expected)
    assert stats.drafted == 2
    assert stats.accepted == 2
    assert stats.bonus_tokens == 1
    assert stats.verification_calls == 1
    assert stats.acceptance_histogram == [1, 1, 0, 0, 0, 0, 0, 0]


def test_k_larger_than_tokens_left_with_draft_model():
    target, draft = tiny("gemma3"), tiny("gemma3", seed=1)
    prompt = random_prompt(LONG_PROMPT, seed=6)
    for max_new_tokens in (3, 5):
        ours, stats = speculative_generate(target, draft, prompt, k=8, max_new_tokens=max_new_tokens, eos_token_id=None)
        assert torch.equal(ours, hf_greedy(target, prompt, max_new_tokens, eos_token_id=None))
        assert stats.new_tokens == max_new_tokens


# --- seeding ---


def test_seeded_runs_repeat():
    target, draft = tiny("llama"), tiny("llama", seed=1)
    prompt = random_prompt(LONG_PROMPT, seed=8)
    settings = dict(k=4, max_new_tokens=40, temperature=0.9, top_p=0.95, draft_temperature=1.2, eos_token_id=None)

    first, _ = speculative_generate(target, draft, prompt, generator=torch.Generator().manual_seed(123), **settings)
    second, _ = speculative_generate(target, draft, prompt, generator=torch.Generator().manual_seed(123), **settings)
    other, _ = speculative_generate(target, draft, prompt, generator=torch.Generator().manual_seed(124), **settings)

    assert torch.equal(first, second)
    assert not torch.equal(first, other)


# --- stats ---


def test_stats_to_dict():
    target, draft = tiny("llama"), tiny("llama", seed=1)
    _, stats = speculative_generate(target, draft, random_prompt(9), k=3, max_new_tokens=10, eos_token_id=None)
    record = json.loads(json.dumps(stats.to_dict()))

    assert record["k"] == 3
    assert len(record["acceptance_histogram"]) == 3
    assert record["acceptance_rate"] == stats.accepted / stats.drafted
    assert record["mean_accepted_length"] == 10 / stats.verification_calls
    assert record["target_forward_calls"] == stats.verification_calls + 1  # one prefill
    assert record["wall_time_s"] > 0


def test_stats_without_drafts():
    target = tiny("llama")
    _, stats = speculative_generate(target, tiny("llama", seed=1), random_prompt(1), k=3, max_new_tokens=1)
    assert stats.acceptance_rate is None
    assert stats.to_dict()["acceptance_rate"] is None
    assert stats.target_forward_calls == 1  # a one-token prompt needs no prefill
    assert stats.draft_forward_calls == 0


# --- invalid settings ---


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), r"k must be an int >= 1.*got 0"),
        (dict(k=2.0), r"k must be an int >= 1.*got 2\.0"),
        (dict(k=True), r"k must be an int >= 1"),
        (dict(max_new_tokens=0), r"max_new_tokens must be >= 1"),
        (dict(temperature=-0.1), r"^temperature must be a finite number >= 0, got -0\.1"),
        (dict(temperature=float("nan")), r"^temperature must be a finite number >= 0"),
        (dict(top_p=0.0), r"^top_p must be in \(0, 1\], got 0\.0"),
        (dict(top_p=1.5), r"^top_p must be in \(0, 1\], got 1\.5"),
        (dict(top_k=-1), r"^top_k must be an int >= 0, got -1"),
        (dict(draft_temperature=-1.0), r"^draft_temperature must be a finite number >= 0"),
        (dict(draft_top_p=0.0), r"^draft_top_p must be in \(0, 1\]"),
        (dict(draft_top_k=-3), r"^draft_top_k must be an int >= 0, got -3"),
        (dict(draft_proposal="beam"), r"draft_proposal must be one of"),
    ],
)
def test_invalid_settings_raise(kwargs, message):
    settings = dict(k=4, max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        speculative_generate(tiny("llama"), tiny("llama", seed=1), random_prompt(5), **settings)


def test_draft_with_other_vocabulary_raises():
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE + 10, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )
    other = LlamaForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"draft vocabulary does not match the target: config.vocab_size is 310"):
        speculative_generate(tiny("llama"), other, random_prompt(5), k=2, max_new_tokens=4)


def test_invalid_prompts_raise():
    target, draft = tiny("llama"), tiny("llama", seed=1)
    batch = torch.cat([random_prompt(5, seed=0), random_prompt(5, seed=1)])
    with pytest.raises(ValueError, match=r"batch size 1 only, got input_ids of shape \(2, 5\)"):
        speculative_generate(target, draft, batch, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"left padding"):
        speculative_generate(target, draft, random_prompt(3), torch.tensor([[1, 0, 1]]), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompt is empty"):
        speculative_generate(target, draft, random_prompt(3), torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(TypeError, match=r"draft must be a causal LM or a drafter"):
        speculative_generate(target, "draft", random_prompt(3), max_new_tokens=4)


def test_invalid_min_confidence_raises():
    with pytest.raises(ValueError, match=r"min_confidence must be in \[0, 1\], got 1\.5"):
        ModelDrafter(tiny("llama"), min_confidence=1.5)


def test_invalid_prompt_lookup_sizes_raise():
    with pytest.raises(ValueError, match=r"max_ngram_size must be an int >= 1, got 0"):
        PromptLookupDrafter(max_ngram_size=0)
    with pytest.raises(ValueError, match=r"min_ngram_size \(3\) must not exceed max_ngram_size \(2\)"):
        PromptLookupDrafter(max_ngram_size=2, min_ngram_size=3)


# --- prompt lookup ---


def test_prompt_lookup_prefers_longest_then_latest_match():
    drafter = PromptLookupDrafter(max_ngram_size=3)
    #                        0  1  2  3  4  5  6  7  8  9 10 11
    history = torch.tensor([5, 6, 7, 8, 9, 6, 7, 3, 4, 5, 6, 7])
    # the suffix (5, 6, 7) occurs at 0, so the tokens after it are copied
    assert drafter.lookup(history, 3).tolist() == [8, 9, 6]
    # with 2-grams only, the latest earlier (6, 7) is at 5, followed by 3, 4
    assert PromptLookupDrafter(max_ngram_size=2).lookup(history, 2).tolist() == [3, 4]
    # a continuation is cut at the end of the history
    assert drafter.lookup(torch.tensor([1, 2, 3, 1, 2]), 5).tolist() == [3, 1, 2]


def test_prompt_lookup_without_match_proposes_nothing():
    drafter = PromptLookupDrafter(max_ngram_size=2)
    assert drafter.lookup(torch.tensor([1, 2, 3, 4]), 4).numel() == 0
    assert drafter.lookup(torch.tensor([7]), 4).numel() == 0
    assert PromptLookupDrafter(min_ngram_size=2).lookup(torch.tensor([1, 2, 3, 2]), 4).numel() == 0


# --- debug log ---


def test_debug_log_greedy(tmp_path, capsys):
    target, draft = tiny("llama"), tiny("llama", seed=1)
    path = tmp_path / "logs" / "speculative_debug.log"

    _, stats = speculative_generate(
        target, draft, random_prompt(9), k=3, max_new_tokens=12, eos_token_id=None, debug_log=path
    )

    lines = path.read_text().splitlines()
    assert lines[0].startswith("call prompt_tokens=9 k=3 temperature=0.0")
    assert sum(line.startswith("step ") for line in lines) == stats.verification_calls
    token_lines = [line for line in lines if line.strip().startswith("pos=")]
    assert sum(line.endswith(" accept") for line in token_lines) == stats.accepted
    assert sum(line.endswith(" reject") for line in token_lines) == stats.rejected
    assert all(" p=" in line and " q=" in line and " p/q=" in line for line in token_lines)
    assert sum("resampled token=" in line for line in lines) == stats.rejected
    assert "from target argmax" in path.read_text()
    assert capsys.readouterr() == ("", "")


def test_debug_log_sampled(tmp_path):
    target, draft = tiny("llama"), tiny("llama", seed=1)
    path = tmp_path / "debug.log"

    _, stats = speculative_generate(
        target, draft, random_prompt(9), k=3, max_new_tokens=12, temperature=1.0, eos_token_id=None,
        generator=torch.Generator().manual_seed(0), debug_log=path,
    )

    text = path.read_text()
    assert text.startswith("call prompt_tokens=9 k=3 temperature=1.0")
    assert text.count("resampled token=") == stats.rejected
    assert text.count(" from norm(max(0, p - q))") == stats.rejected
    assert text.count("bonus token=") == stats.bonus_tokens + stats.undrafted_tokens
    first_token_line = next(line for line in text.splitlines() if "pos=0" in line)
    fields = dict(item.split("=", 1) for item in first_token_line.split()[:-1])
    assert float(fields["p/q"]) == pytest.approx(float(fields["p"]) / float(fields["q"]), rel=1e-4)
    assert 0.0 <= float(fields["u"]) < 1.0


# --- the real SmolLM2-135M-Instruct with its int8 draft, on chat prompts of real questions ---

NUM_QUESTIONS = 3
SMOLLM2_NEW_TOKENS = 24


def smollm2_prompts(loaded) -> list[torch.Tensor]:
    """Render the first questions of the shipped NQ-Open subset as (1, T) chat prompts."""
    from experiments.data import load_dataset
    from experiments.prompts import render_prompt

    items = load_dataset("datasets/nq_open_subset.jsonl", limit=NUM_QUESTIONS)
    return [render_prompt(loaded.tokenizer, item.question)["input_ids"] for item in items]


@pytest.mark.slow
def test_smollm2_int8_draft_matches_hf(smollm2, smollm2_int8):
    target, tokenizer = smollm2.model, smollm2.tokenizer
    eos_id = tokenizer.eos_token_id
    for question, prompt in enumerate(smollm2_prompts(smollm2)):
        expected = hf_greedy(target, prompt, SMOLLM2_NEW_TOKENS, eos_token_id=eos_id)
        for k in (1, 2, 4, 8):
            ours, stats = speculative_generate(
                target, smollm2_int8.model, prompt, k=k, max_new_tokens=SMOLLM2_NEW_TOKENS, eos_token_id=eos_id
            )
            assert torch.equal(ours, expected), f"question {question}, k={k}: {tokenizer.decode(ours[0])!r}"
            check_stats_invariants(stats, ours)
            assert stats.accepted > 0


@pytest.mark.slow
def test_smollm2_prompt_lookup_matches_hf(smollm2):
    target, tokenizer = smollm2.model, smollm2.tokenizer
    eos_id = tokenizer.eos_token_id
    drafted = 0
    for question, prompt in enumerate(smollm2_prompts(smollm2)):
        expected = hf_greedy(target, prompt, SMOLLM2_NEW_TOKENS, eos_token_id=eos_id)
        for k in (1, 2, 4, 8):
            ours, stats = speculative_generate(
                target, PromptLookupDrafter(), prompt, k=k, max_new_tokens=SMOLLM2_NEW_TOKENS, eos_token_id=eos_id
            )
            assert torch.equal(ours, expected), f"question {question}, k={k}: {tokenizer.decode(ours[0])!r}"
            check_stats_invariants(stats, ours)
            drafted += stats.drafted
    assert drafted > 0, "prompt lookup never proposed a token, so verification was not exercised"
