"""Choosing the number of draft tokens k from measured acceptance and draft cost.

Leviathan et al. (2023, "Fast Inference from Transformers via Speculative Decoding",
section 3) model each draft token as accepted independently with probability alpha, and
a draft forward pass as costing c target forward passes. With k draft tokens per step,
a step then yields (1 - alpha^(k+1)) / (1 - alpha) tokens on average, costs k * c + 1
target passes, and the expected speedup over decoding with the target alone is

    (1 - alpha^(k+1)) / ((1 - alpha) * (k * c + 1)).

`choose_k` maximises that expression. The formula counts the target's pass over k + 1
tokens as one 1-token pass. On a CPU that pass is dearer, so `expected_speedup` also
takes the measured verification cost for reporting.
"""

import logging
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

logger = logging.getLogger(__name__)

DEFAULT_MAX_K = 16


def expected_speedup(alpha: float, c: float, k: int, verification_cost: float = 1.0) -> float:
    """Return the expected speedup of speculative decoding over the target alone (higher is better).

    alpha: per-token acceptance probability in [0, 1]; c: draft forward time over target
    forward time (> 0 unless the draft is free, as prompt lookup is); k: draft tokens per
    step; verification_cost: the target's (k+1)-token pass in 1-token passes, 1 in the paper.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if c < 0.0:
        raise ValueError(f"c must be >= 0, got {c}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # expected tokens per step: 1 + alpha + ... + alpha^k
    tokens_per_step = float(k + 1) if alpha == 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
    return tokens_per_step / (k * c + verification_cost)


def choose_k(alpha: float, c: float, max_k: int = DEFAULT_MAX_K) -> int:
    """Return the k in 1..max_k with the highest `expected_speedup`, the smallest k on a tie."""
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    speedups = [expected_speedup(alpha, c, k) for k in range(1, max_k + 1)]
    best = max(speedups)
    return speedups.index(best) + 1


def estimate_alpha(accepted: int, rejected: int) -> float | None:
    """Return the per-token acceptance probability alpha = accepted / (accepted + rejected), or None.

    Each verification step tests draft tokens until the first rejection, so this is the
    maximum-likelihood estimate of alpha under the paper's model. Steps cut short by EOS,
    by `max_new_tokens` or by reaching k add no rejection.
    """
    tested = accepted + rejected
    return accepted / tested if tested else None


@dataclass
class StepCosts:
    """Median wall times of single forward passes at one context length, and their ratios.

    c = draft_step_s / target_step_s (lower is better);
    verification_cost = target_verify_step_s / target_step_s, the target's pass over k + 1
    tokens in 1-token passes (lower is better).
    """

    target_step_s: float
    draft_step_s: float
    target_verify_step_s: float
    k: int
    context_tokens: int
    repeats: int

    @property
    def c(self) -> float:
        return self.draft_step_s / self.target_step_s

    @property
    def verification_cost(self) -> float:
        return self.target_verify_step_s / self.target_step_s

    def to_dict(self) -> dict:
        """Return the fields and both ratios as JSON-serialisable values."""
        return {**asdict(self), "c": self.c, "verification_cost": self.verification_cost}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PrefilledModel:
    """A transformers model with its KV cache prefilled on a prompt, for timing passes at that context length."""

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor):
        self.model = model
        self.device = model.device
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        self.last_token = prompt[:, -1:].to(self.device)  # (1, 1)
        with torch.inference_mode():
            model(input_ids=prompt.to(self.device), cache=self.cache, use_cache=True, logits_to_keep=1)

    def time_pass(self, num_tokens: int) -> float:
        """Return the wall time in seconds of one pass over `num_tokens` tokens, then drop them from the cache."""
        tokens = self.last_token.expand(1, num_tokens)  # (1, n)
        with torch.inference_mode():
            _synchronize(self.device)
            started = time.perf_counter()
            self.model(input_ids=tokens, cache=self.cache, use_cache=True, logits_to_keep=num_tokens)
            _synchronize(self.device)
            elapsed = time.perf_counter() - started
        self.cache.crop(-num_tokens)
        return elapsed


class _PrefilledRunner:
    """A drafter's own forward runner (`LlamaDrafter.runner`) prefilled on a prompt, timed like `_PrefilledModel`."""

    # positions kept free after the prompt for the timed passes
    HEADROOM = 64

    def __init__(self, runner, prompt: torch.Tensor):
        self.runner = runner
        self.last_token = prompt[:, -1:]  # (1, 1)
        runner.start(prompt.shape[1] + self.HEADROOM)
        runner.forward(prompt)

    def time_pass(self, num_tokens: int) -> float:
        """Return the wall time in seconds of one pass over `num_tokens` tokens, then drop them from the cache."""
        started = time.perf_counter()
        self.runner.forward(self.last_token.expand(1, num_tokens))
        elapsed = time.perf_counter() - started
        self.runner.crop(self.runner.length - num_tokens)
        return elapsed


def _prefilled(draft, prompt: torch.Tensor):
    if isinstance(draft, torch.nn.Module):
        return _PrefilledModel(draft, prompt)
    if hasattr(draft, "runner"):
        return _PrefilledRunner(draft.runner, prompt)
    # a drafter wrapping a model (ModelDrafter) is timed through that model
    return _PrefilledModel(draft.model, prompt)


def has_draft_model(draft) -> bool:
    """Return whether a draft (a model or a drafter) runs a model, so that its cost c is above 0."""
    return isinstance(draft, torch.nn.Module) or hasattr(draft, "model") or hasattr(draft, "runner")


def measure_step_costs(target: torch.nn.Module, draft, prompt: torch.Tensor, k: int, repeats: int = 10) -> StepCosts:
    """Time 1-token passes of target and draft and a (k+1)-token target pass after the same prompt (1, T).

    `draft` is a draft model, or a drafter that runs one (`ModelDrafter`, `LlamaDrafter`),
    timed the way it drafts. One untimed round warms up, then the three passes are
    interleaved `repeats` times, so that a change in machine load affects each of them
    alike. Returns the medians.
    """
    target_run = _PrefilledModel(target, prompt)
    draft_run = _prefilled(draft, prompt)
    times = {"target": [], "draft": [], "verify": []}
    for round_index in range(repeats + 1):
        measured = {
            "target": target_run.time_pass(1),
            "draft": draft_run.time_pass(1),
            "verify": target_run.time_pass(k + 1),
        }
        if round_index > 0:
            for name, seconds in measured.items():
                times[name].append(seconds)
    return StepCosts(
        target_step_s=statistics.median(times["target"]),
        draft_step_s=statistics.median(times["draft"]),
        target_verify_step_s=statistics.median(times["verify"]),
        k=k,
        context_tokens=prompt.shape[1],
        repeats=repeats,
    )


# settings of speculative.k=auto: the probe items run at PROBE_K
PROBE_K = 4
PROBE_ITEMS = 3


class AutoK:
    """Chooses k for `speculative.k=auto` from the first items of a run.

    The first `probe_items` items run at `probe_k`; their accepted and rejected counts
    give alpha (see `estimate_alpha`). `choose` then takes c, measured by the caller, and
    fixes k = `choose_k(alpha, c, max_k)` for every later item.
    """

    def __init__(self, probe_k: int = PROBE_K, probe_items: int = PROBE_ITEMS, max_k: int = DEFAULT_MAX_K):
        self.probe_k = probe_k
        self.probe_items = probe_items
        self.max_k = max_k
        self.accepted = 0
        self.rejected = 0
        self.items = 0
        self.chosen: dict | None = None

    @property
    def k(self) -> int:
        """The k for the next item: `probe_k` until `choose` has run."""
        return self.chosen["k"] if self.chosen is not None else self.probe_k

    @property
    def needs_choice(self) -> bool:
        """Whether the probe items are done and k is not chosen yet."""
        return self.chosen is None and self.items >= self.probe_items

    def record(self, accepted: int, rejected: int) -> None:
        """Add one probe item's counts; items after the choice are ignored."""
        if self.chosen is None:
            self.accepted += accepted
            self.rejected += rejected
            self.items += 1

    def choose(self, c: float) -> int:
        """Fix k from the probe items' alpha and the draft cost `c`, log the choice, and return k."""
        alpha = estimate_alpha(self.accepted, self.rejected)
        # without a single tested draft token, assume every token is rejected
        alpha = 0.0 if alpha is None else alpha
        k = choose_k(alpha, c, self.max_k)
        self.chosen = {
            "k": k, "alpha": alpha, "c": c, "expected_speedup": expected_speedup(alpha, c, k),
            "probe_k": self.probe_k, "probe_items": self.items,
        }
        logger.info(
            "speculative.k=auto chose k=%d: alpha=%.3f over %d items at k=%d, c=%.3f, expected speedup %.2f",
            k, alpha, self.items, self.probe_k, c, self.chosen["expected_speedup"],
        )
        return k
