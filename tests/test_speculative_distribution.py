"""Speculative sampling reproduces the target's distribution exactly (chi-square tests).

Each end-to-end test draws 20,000 seeded outputs from `speculative_generate` and compares
the joint frequency of the first two generated tokens with the target's exact joint
distribution, computed from its logits with transformers' own logits warpers. The null
hypothesis "samples follow the target" is kept when the chi-square p-value exceeds
SIGNIFICANCE. Cells expected to hold fewer than 5 samples are pooled into one cell.

Most settings run on `PositionalBigramLM`, a causal LM over 12 tokens whose logits depend
on the current token, the previous token and the position, read back from a real
transformers DynamicCache. One forward pass costs tens of microseconds, so 20,000 calls
per setting fit the test budget. A wrong cache rollback changes the previous token or the
position the model reads, and so the distribution. One test repeats the main setting on a real
LlamaForCausalLM with a 12-token vocabulary.
"""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import chisquare
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from decoding.prompt_lookup import PromptLookupDrafter
from decoding.sampling import (
    gumbel_max_sample,
    probabilities,
    residual_distribution,
    sample,
    warp_logits,
)
from decoding.speculative import DraftProposal, ModelDrafter, speculative_generate

SIGNIFICANCE = 0.001
NUM_SAMPLES = 20_000
# The extra settings below test the same accept rule with other drafters and proposals.
# Fewer samples keep the whole file near 1.5 minutes on two CPU cores (an estimate).
EXTRA_SAMPLES = 8_000
VOCAB = 12
MAX_POSITIONS = 16
PROMPT = torch.tensor([[3, 7, 5, 3, 7]])


class PositionalBigramLM(torch.nn.Module):
    """Causal LM whose next-token logits are a random table indexed by (previous token, token, position).

    Token ids are stored as the keys of layer 0 of the DynamicCache it is given, so the
    previous token and the position come from the cache, as attention would get them.
    """

    def __init__(self, seed: int, scale: float = 1.5):
        super().__init__()
        self.config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
            num_attention_heads=1, num_key_value_heads=1,
        )
        self.embed_tokens = torch.nn.Embedding(VOCAB, 1)  # declares the vocabulary size only
        generator = torch.Generator().manual_seed(seed)
        # previous token index VOCAB means "no previous token"
        self.table = scale * torch.randn(VOCAB + 1, VOCAB, MAX_POSITIONS, VOCAB, generator=generator)

    @property
    def device(self) -> torch.device:
        return self.table.device

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0, **kwargs):
        _, num_new = input_ids.shape
        cache = cache if cache is not None else DynamicCache(config=self.config)
        token_states = input_ids.float().view(1, 1, num_new, 1)
        keys, _ = cache.update(token_states, token_states, 0)  # (1, 1, L, 1)
        history = keys.view(-1).long()  # (L,)
        length = history.shape[0]

        previous = torch.nn.functional.pad(history, (1, 0), value=VOCAB)[length - num_new : length]  # (n,)
        positions = torch.arange(length - num_new, length) % MAX_POSITIONS  # (n,)
        logits = self.table[previous, history[length - num_new :], positions]  # (n, V)
        if logits_to_keep:
            logits = logits[-logits_to_keep:]
        return SimpleNamespace(logits=logits.unsqueeze(0))


def tiny_llama(seed: int) -> LlamaForCausalLM:
    """Return a one-layer float32 Llama with a 12-token vocabulary and peaked distributions."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, initializer_range=0.3,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def hf_warped_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Return softmax of `logits` (V,) after transformers' temperature, top-k and top-p warpers."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, logits.float().unsqueeze(0)).softmax(dim=-1)[0]


def last_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Return the target's logits (V,) after `input_ids`, computed without any reuse of a cache."""
    cache = DynamicCache(config=model.config)
    return model(input_ids=input_ids, cache=cache, use_cache=True).logits[0, -1]


@torch.inference_mode()
def exact_joint(model, prompt: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Return the target's exact distribution of the first two new tokens, (V, V)."""
    first = hf_warped_probs(last_logits(model, prompt), temperature, top_k, top_p)  # (V,)
    joint = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for token in range(VOCAB):
        extended = torch.cat([prompt, torch.tensor([[token]])], dim=1)
        second = hf_warped_probs(last_logits(model, extended), temperature, top_k, top_p)
        joint[token] = first[token].double() * second.double()
    return joint


def chi_square_p_value(counts: Counter, joint: torch.Tensor, num_samples: int) -> float:
    """Return the chi-square p-value of `counts` of (t1, t2) pairs against `joint` (V, V)."""
    # float32 softmaxes sum to 1 only up to rounding, which chisquare rejects
    expected = (joint.flatten() / joint.sum() * num_samples).tolist()
    observed = [counts.get(divmod(cell, VOCAB), 0) for cell in range(VOCAB * VOCAB)]
    assert sum(observed) == num_samples, "a sample fell outside the vocabulary"

    # pool the cells expected to hold fewer than 5 samples into one
    large = [cell for cell, value in enumerate(expected) if value >= 5]
    small = [cell for cell, value in enumerate(expected) if value < 5]
    observed_cells = [observed[cell] for cell in large] + [sum(observed[cell] for cell in small)]
    expected_cells = [expected[cell] for cell in large] + [sum(expected[cell] for cell in small)]
    if expected_cells[-1] == 0:
        assert observed_cells[-1] == 0, "a sample hit a pair of probability 0"
        observed_cells, expected_cells = observed_cells[:-1], expected_cells[:-1]
    return chisquare(observed_cells, expected_cells).pvalue


def sample_first_two(
    target, draft, num_samples: int, *, prompt: torch.Tensor = PROMPT, k: int = 2, seed: int = 1234, **settings
) -> Counter:
    """Count the first two tokens of `num_samples` seeded speculative outputs.

    With k = 2 and max_new_tokens = 3 both counted tokens pass the accept rule or the
    residual draw; the third token is only generated to let the step propose two drafts.
    With k = 1 and max_new_tokens = 2 the second token is a bonus token or a plain target draw.
    """
    generator = torch.Generator().manual_seed(seed)
    counts = Counter()
    for _ in range(num_samples):
        new_ids, _ = speculative_generate(
            target, draft, prompt, k=k, max_new_tokens=max(k + 1, 2), generator=generator, **settings
        )
        counts[tuple(new_ids[0, :2].tolist())] += 1
    return counts


_MODELS: dict[tuple[str, int], torch.nn.Module] = {}


def toy(seed: int) -> PositionalBigramLM:
    if ("toy", seed) not in _MODELS:
        _MODELS["toy", seed] = PositionalBigramLM(seed)
    return _MODELS["toy", seed]


# --- the sampling helpers against transformers' warpers and exact frequencies ---


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (0.9, 0, 0.8), (0.5, 20, 0.6)]
)
def test_probabilities_match_hf_warpers(temperature, top_k, top_p):
    logits = 3 * torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    ours = probabilities(logits, temperature, top_k, top_p)
    for row in range(logits.shape[0]):
        expected = hf_warped_probs(logits[row], temperature, top_k, top_p)
        torch.testing.assert_close(ours[row], expected, rtol=1e-5, atol=1e-7)


def test_probabilities_at_temperature_zero_are_one_hot():
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.equal(probabilities(logits, 0.0, top_k=1, top_p=0.5), expected)
    with pytest.raises(ValueError, match=r"needs temperature > 0"):
        warp_logits(logits, 0.0, 0, 1.0)


def test_sample_and_gumbel_max_follow_probabilities():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -3.0, 1.5, 0.7])
    num_draws = 200_000
    rows = logits.expand(num_draws, -1)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.6, 4, 1.0), (1.4, 0, 0.9)]:
        probs = probabilities(logits, temperature, top_k, top_p)
        generator = torch.Generator().manual_seed(5)
        for name, tokens in [
            ("sample", sample(probs.expand(num_draws, -1), generator)),
            ("gumbel_max_sample", gumbel_max_sample(rows, temperature, top_k, top_p, generator)),
        ]:
            counts = torch.bincount(tokens, minlength=logits.shape[0])
            support = probs > 0
            assert counts[~support].sum() == 0, f"{name} drew a token of probability 0"
            expected = probs[support].double() / probs[support].double().sum() * num_draws
            p_value = chisquare(counts[support].double(), expected).pvalue
            assert p_value > SIGNIFICANCE, f"{name} at {(temperature, top_k, top_p)}: p = {p_value:.2e}"


def test_residual_distribution():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.6, 0.1, 0.1])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([0.75, 0.0, 0.25, 0.0]))
    # p <= q everywhere: the zero-sum guard falls back to p instead of dividing by 0
    assert torch.equal(residual_distribution(p, p), p)
    assert torch.isfinite(residual_distribution(p, p + 0.1)).all()


# --- end to end: 20,000 seeded outputs per setting ---

END_TO_END_SETTINGS = {
    "temperature 1.0": (NUM_SAMPLES, dict(temperature=1.0)),
    "temperature 0.7": (NUM_SAMPLES, dict(temperature=0.7)),
    "top-k": (NUM_SAMPLES, dict(temperature=1.0, top_k=4)),
    "top-p": (NUM_SAMPLES, dict(temperature=1.0, top_p=0.8)),
    "draft temperature 1.6": (NUM_SAMPLES, dict(temperature=1.0, draft_temperature=1.6)),
    "draft top-k and top-p of its own": (
        EXTRA_SAMPLES, dict(temperature=0.8, top_k=6, draft_top_k=3, draft_top_p=0.9),
    ),
    "gumbel top-k proposal": (EXTRA_SAMPLES, dict(temperature=0.7, draft_proposal="gumbel_topk", draft_top_k=5)),
    "greedy proposal": (EXTRA_SAMPLES, dict(temperature=1.0, draft_proposal="greedy")),
}


@pytest.mark.parametrize("name", END_TO_END_SETTINGS)
def test_speculative_matches_target_distribution(name):
    num_samples, settings = END_TO_END_SETTINGS[name]
    target, draft = toy(seed=0), toy(seed=1)
    joint = exact_joint(target, PROMPT, settings["temperature"], settings.get("top_k", 0), settings.get("top_p", 1.0))

    counts = sample_first_two(target, draft, num_samples, **settings)

    p_value = chi_square_p_value(counts, joint, num_samples)
    assert p_value > SIGNIFICANCE, f"{name}: p = {p_value:.2e}"


def test_prompt_lookup_matches_target_distribution():
    # PROMPT repeats (3, 7), so the lookup proposes tokens whenever the output extends a match
    target = toy(seed=0)
    joint = exact_joint(target, PROMPT, 1.0)

    counts = sample_first_two(target, PromptLookupDrafter(max_ngram_size=2), EXTRA_SAMPLES, temperature=1.0)

    assert chi_square_p_value(counts, joint, EXTRA_SAMPLES) > SIGNIFICANCE


def test_tiny_llama_matches_target_distribution():
    # a one-token prompt and k = 1 keep this to about two forward passes per sample
    target, draft = tiny_llama(seed=0), tiny_llama(seed=1)
    prompt = torch.tensor([[3]])
    joint = exact_joint(target, prompt, 1.0)

    counts = sample_first_two(target, draft, NUM_SAMPLES, prompt=prompt, k=1, temperature=1.0, draft_temperature=1.3)

    assert chi_square_p_value(counts, joint, NUM_SAMPLES) > SIGNIFICANCE


def test_confidence_stop_matches_target_distribution():
    target = toy(seed=0)
    joint = exact_joint(target, PROMPT, 1.0)
    drafter = ModelDrafter(toy(seed=1), min_confidence=0.3)

    counts = sample_first_two(target, drafter, EXTRA_SAMPLES, temperature=1.0, draft_temperature=1.3)

    assert chi_square_p_value(counts, joint, EXTRA_SAMPLES) > SIGNIFICANCE


class MisreportingDrafter(ModelDrafter):
    """Samples at draft temperature 1.6 but reports q at temperature 1.0, the classic prototype bug."""

    def propose(self, sequence, length, num_tokens, generator):
        proposal = super().propose(sequence, length, num_tokens, generator)
        if proposal.q is None:
            return proposal
        # recompute the logits the draft saw, without touching its cache
        history = torch.cat([sequence[:, :length], proposal.tokens.view(1, -1)], dim=1)
        logits = torch.stack([last_logits(self.model, history[:, : length + i]) for i in range(num_tokens)])
        return DraftProposal(proposal.tokens, probabilities(logits, 1.0), proposal.forward_calls)


def test_chi_square_detects_a_wrong_q():
    # the same test must reject samples whose accept rule used the wrong q
    target = toy(seed=0)
    joint = exact_joint(target, PROMPT, 1.0)

    counts = sample_first_two(
        target, MisreportingDrafter(toy(seed=1)), EXTRA_SAMPLES, temperature=1.0, draft_temperature=1.6
    )

    assert chi_square_p_value(counts, joint, EXTRA_SAMPLES) < SIGNIFICANCE
