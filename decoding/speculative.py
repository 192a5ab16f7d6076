"""Speculative decoding after Leviathan et al. (2023, "Fast Inference from Transformers via
Speculative Decoding") and Chen et al. (2023, "Accelerating Large Language Model Decoding
with Speculative Sampling").

Notation from the papers: the target model's next-token distribution is p, the drafter's
is q, and each step proposes up to gamma draft tokens (`k` here). The target scores the
proposal in one forward pass. Draft token x is accepted with probability min(1, p(x)/q(x)).
At the first rejection the step ends with a token drawn from norm(max(0, p - q)), and when
every draft token passes, one bonus token is drawn from p. The output then has exactly the
distribution of sampling from the target alone. Temperature 0 is greedy verification: a
draft token is accepted while it equals the target's argmax, and the argmax replaces the
first mismatch, so the output equals the target's greedy output.

Caches: the target keeps a KV cache of every confirmed token except the newest one, which
the next verification pass feeds. A draft model's cache lags by one token, or by two after
a step whose drafts were all accepted. After a rejection both caches are cut back with
`DynamicCache.crop(-n)`. Sliding-window layers (Gemma 3) are switched to past
recording, so a crop stays possible beyond the window. A cache that still cannot be
cropped is rebuilt by re-running the model on the confirmed tokens, with a logged warning.
"""

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Protocol

import torch
from transformers import DynamicCache

from decoding.greedy import check_max_new_tokens, normalize_eos_ids
from decoding.sampling import (
    check_sampling_settings,
    gumbel_max_sample,
    one_hot,
    probabilities,
    residual_distribution,
    sample,
    uniform,
)
from decoding.stats import DecodingStats

logger = logging.getLogger(__name__)

DRAFT_PROPOSALS = ("sample", "greedy", "gumbel_topk")


@dataclasses.dataclass
class SpeculativeStats(DecodingStats):
    """Counters of one `speculative_generate` call; all counts stop at the first EOS.

    drafted: draft tokens proposed and sent to the target for verification, including
        those after a rejection in the same step, but none after an accepted EOS.
    accepted: draft tokens accepted by the target.
    rejected: steps that ended in a rejection. Each adds one target token in place of the
        rejected draft token, drawn from norm(max(0, p - q)) or, at temperature 0, the argmax.
    bonus_tokens: tokens drawn from p after every draft token of a step was accepted.
    undrafted_tokens: tokens from steps that drafted nothing (prompt lookup without a
        match, or one token left to generate); each is drawn from p alone.
        new_tokens == accepted + rejected + bonus_tokens + undrafted_tokens.
    target_forward_calls: all target forward passes: the prompt prefill, one verification
        per step, and any cache rebuilds.
    verification_calls: target forward passes that scored a step's draft tokens.
    draft_forward_calls: draft model forward passes, including its prefill and cache
        rebuilds; 0 for prompt lookup.
    cache_refills: caches rebuilt by re-running a model because they could not be cropped.
    acceptance_histogram: entry i is the number of steps whose draft token at position i
        (0-based) was accepted; it has `k` entries.
    new_tokens: generated tokens, EOS included.
    wall_time_s: wall-clock seconds of the whole call, prefill included.
    """

    k: int = 0
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    bonus_tokens: int = 0
    undrafted_tokens: int = 0
    target_forward_calls: int = 0
    verification_calls: int = 0
    draft_forward_calls: int = 0
    cache_refills: int = 0
    acceptance_histogram: list[int] = dataclasses.field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted draft tokens (higher is better); None when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted_length(self) -> float | None:
        """New tokens per target verification call (higher is better); None without a call."""
        return self.new_tokens / self.verification_calls if self.verification_calls else None

    def to_dict(self) -> dict:
        """Return every field and property as JSON-serialisable values."""
        record = dataclasses.asdict(self)
        record["acceptance_rate"] = self.acceptance_rate
        record["mean_accepted_length"] = self.mean_accepted_length
        record["tokens_per_second"] = self.tokens_per_second
        return record


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Temperature (0 = greedy), top-k (0 = off) and top-p (1.0 = off), as in `decoding.sampling`."""

    temperature: float
    top_k: int
    top_p: float


@dataclasses.dataclass(frozen=True)
class DraftSettings(SamplingSettings):
    """A draft model's sampling settings, its `proposal` mode (one of DRAFT_PROPOSALS) and `stop_ids`.

    stop_ids: token ids after which a proposal ends, the EOS ids: the target would discard
    any draft token after an accepted EOS, so drafting them only costs time.
    """

    proposal: str = "sample"
    stop_ids: frozenset[int] = frozenset()


@dataclasses.dataclass
class DraftProposal:
    """Draft tokens for one step.

    tokens: LongTensor (n,), n <= the number requested; n = 0 lets the target decode one token.
    q: float tensor (n, V), row i the distribution token i was drawn from, or None when
        every token was chosen deterministically (q one-hot on the token).
    forward_calls: draft model forward passes spent on this proposal.
    """

    tokens: torch.Tensor
    q: torch.Tensor | None
    forward_calls: int


class Drafter(Protocol):
    """Proposes draft tokens for `speculative_generate`.

    `sequence` is a (1, capacity) LongTensor whose first `length` entries are the prompt and
    the tokens confirmed so far. A drafter may keep state between `begin` and the end of
    the sequence, for example a KV cache that `rollback` cuts back.
    """

    def check_vocabulary(self, target: torch.nn.Module) -> None:
        """Raise ValueError when the drafter's token ids do not index the target's vocabulary."""

    def begin(self, sequence: torch.Tensor, length: int, settings: DraftSettings) -> int:
        """Start on a new prompt `sequence[0, :length]`; return the forward calls spent."""

    def propose(
        self, sequence: torch.Tensor, length: int, num_tokens: int, generator: torch.Generator | None
    ) -> DraftProposal:
        """Propose at most `num_tokens` tokens that continue `sequence[0, :length]`."""

    def rollback(self, sequence: torch.Tensor, length: int) -> int:
        """Forget everything past `sequence[0, :length]`, the tokens still confirmed after a step.

        Return the forward calls spent, nonzero only when a cache had to be rebuilt.
        """

    # Optional: `use_target_cache(target_state: IncrementalModel) -> bool`. `_decode` calls it
    # after the target's prefill and before `begin`, so that a drafter with the target's
    # cache layout (a quantized copy of the target) can read the target's keys and values
    # of confirmed positions from `target_state.cache`. It returns whether it will.


class IncrementalModel:
    """A causal LM with its KV cache and `length`, the number of sequence positions cached."""

    def __init__(self, model: torch.nn.Module, role: str):
        self.model = model
        self.role = role
        self.length = 0
        self.forward_calls = 0
        self.refills = 0
        self.cache = self._new_cache()

    def _new_cache(self) -> DynamicCache:
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        # sliding-window layers then keep the states a negative crop needs
        cache.activate_past_recording()
        return cache

    def forward(self, tokens: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        """Feed `tokens` (1, n) after the cached positions; return the last logits (logits_to_keep, V)."""
        outputs = self.model(
            input_ids=tokens.to(self.model.device), cache=self.cache, use_cache=True, logits_to_keep=logits_to_keep
        )
        self.length += tokens.shape[1]
        self.forward_calls += 1
        return outputs.logits[0]

    def extend_to(self, sequence: torch.Tensor, end: int, logits_to_keep: int = 1) -> torch.Tensor:
        """Feed `sequence[:, length:end]`; return the logits of its last `logits_to_keep` positions."""
        return self.forward(sequence[:, self.length : end], logits_to_keep)

    def rollback(self, sequence: torch.Tensor, length: int) -> None:
        """Keep the first `length` cached positions, rebuilding the cache when it cannot be cropped."""
        length = min(length, self.length)
        if self._croppable():
            # crop(0) is not a no-op: it trims sliding-window layers back to their window
            self.cache.crop(length - self.length)
            self.length = length
        elif length < self.length:
            self._refill(sequence, length)

    def _croppable(self) -> bool:
        for layer in self.cache.layers:
            if not getattr(layer, "is_croppable", False):
                return False
            if hasattr(layer, "record_past") and not layer.record_past:
                return False
        return True

    def _refill(self, sequence: torch.Tensor, length: int) -> None:
        log = logger.warning if self.refills == 0 else logger.debug
        log(
            "the %s model's KV cache (%s) cannot be cropped, so it is rebuilt from %d tokens; "
            "this repeats the prefill after every rejection",
            self.role, type(self.cache).__name__, length,
        )
        self.refills += 1
        self.cache = self._new_cache()
        self.length = 0
        if length > 0:
            self.extend_to(sequence, length)


class ModelDrafter:
    """Drafter backed by a causal LM that shares the target's vocabulary.

    Its cache lags the confirmed sequence by one token or more. `propose` first feeds the
    tokens the draft has not seen, so it also works behind another drafter (CombinedDrafter).

    min_confidence: stop a proposal early after a token whose probability under the draft's
    softmax (temperature 1) is below this value; 0.0 (default) always drafts the full count.
    Where to stop depends on the draft alone, so the output distribution stays exact.
    """

    def __init__(self, model: torch.nn.Module, min_confidence: float = 0.0):
        is_number = isinstance(min_confidence, (int, float)) and not isinstance(min_confidence, bool)
        if not is_number or not 0 <= min_confidence <= 1:
            raise ValueError(
                f"min_confidence must be in [0, 1], got {min_confidence!r} (use 0.0 to always draft k tokens)"
            )
        self.model = model
        self.min_confidence = min_confidence
        self.settings: DraftSettings | None = None
        self.state: IncrementalModel | None = None

    def check_vocabulary(self, target: torch.nn.Module) -> None:
        """Raise ValueError when the draft model's vocabulary sizes differ from the target's."""
        check_same_vocabulary(target, self.model)

    def begin(self, sequence: torch.Tensor, length: int, settings: DraftSettings) -> int:
        """Prefill the draft cache with all prompt tokens but the last; return the forward calls spent."""
        self.settings = settings
        self.state = IncrementalModel(self.model, "draft")
        if length > 1:
            self.state.extend_to(sequence, length - 1)
        return self.state.forward_calls

    def propose(
        self, sequence: torch.Tensor, length: int, num_tokens: int, generator: torch.Generator | None
    ) -> DraftProposal:
        """Draw up to `num_tokens` tokens one forward pass at a time, stopping after a stop id (EOS)."""
        empty = DraftProposal(tokens=sequence.new_empty(0), q=None, forward_calls=0)
        if num_tokens < 1:
            return empty
        calls_before = self.state.forward_calls

        # catch up on the confirmed tokens the draft has not seen yet (one, or two after a full accept)
        logits = self.state.extend_to(sequence, length)[-1]  # (V,)
        tokens, q_rows = [], []
        for position in range(num_tokens):
            token, q = self._draw(logits, generator)
            tokens.append(token)
            q_rows.append(q)
            if position + 1 == num_tokens or self._unsure(logits, token) or self._stops(token):
                break
            logits = self.state.forward(token.view(1, 1), logits_to_keep=1)[-1]

        q = None if q_rows[0] is None else torch.stack(q_rows)  # (n, V)
        forward_calls = self.state.forward_calls - calls_before
        return DraftProposal(tokens=torch.stack(tokens).to(sequence.device), q=q, forward_calls=forward_calls)

    def _stops(self, token: torch.Tensor) -> bool:
        # where to stop depends on the draft alone, so the output distribution stays exact
        return bool(self.settings.stop_ids) and int(token) in self.settings.stop_ids

    def _unsure(self, logits: torch.Tensor, token: torch.Tensor) -> bool:
        if self.min_confidence <= 0:
            return False
        return float(logits.float().softmax(dim=-1)[token]) < self.min_confidence

    def _draw(
        self, logits: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return one token and the distribution q it was drawn from (None when q is one-hot)."""
        settings = self.settings
        if settings.proposal == "greedy" or settings.temperature == 0:
            return logits.argmax(), None

        q = probabilities(logits, settings.temperature, settings.top_k, settings.top_p)  # (V,)
        if settings.proposal == "gumbel_topk":
            token = gumbel_max_sample(logits, settings.temperature, settings.top_k, settings.top_p, generator)
        else:
            token = sample(q, generator)
        return token, q

    def rollback(self, sequence: torch.Tensor, length: int) -> int:
        """Cut the draft cache back to the confirmed tokens; return the forward calls a rebuild spent."""
        calls_before = self.state.forward_calls
        self.state.rollback(sequence, length)
        return self.state.forward_calls - calls_before


class CombinedDrafter:
    """Drafter that tries `primary` first and falls back to `fallback` when `primary` proposes nothing.

    Typical use: CombinedDrafter(PromptLookupDrafter(), ModelDrafter(draft_model)).
    """

    def __init__(self, primary: Drafter, fallback: Drafter):
        self.primary = primary
        self.fallback = fallback

    def check_vocabulary(self, target: torch.nn.Module) -> None:
        """Check both drafters against the target."""
        self.primary.check_vocabulary(target)
        self.fallback.check_vocabulary(target)

    def begin(self, sequence: torch.Tensor, length: int, settings: DraftSettings) -> int:
        """Start both drafters; return their forward calls."""
        return self.primary.begin(sequence, length, settings) + self.fallback.begin(sequence, length, settings)

    def propose(
        self, sequence: torch.Tensor, length: int, num_tokens: int, generator: torch.Generator | None
    ) -> DraftProposal:
        """Return the primary proposal, or the fallback's when the primary one is empty."""
        proposal = self.primary.propose(sequence, length, num_tokens, generator)
        if proposal.tokens.numel() > 0:
            return proposal
        fallback = self.fallback.propose(sequence, length, num_tokens, generator)
        fallback.forward_calls += proposal.forward_calls
        return fallback

    def rollback(self, sequence: torch.Tensor, length: int) -> int:
        """Roll both drafters back; return their forward calls."""
        return self.primary.rollback(sequence, length) + self.fallback.rollback(sequence, length)

    def use_target_cache(self, target_state: "IncrementalModel") -> bool:
        """Offer the target's cache to both drafters; return whether either uses it."""
        return any([offer_target_cache(self.primary, target_state), offer_target_cache(self.fallback, target_state)])


def offer_target_cache(drafter: Drafter, target_state: IncrementalModel) -> bool:
    """Let a drafter that defines `use_target_cache` read the target's cache; return whether it does."""
    use_target_cache = getattr(drafter, "use_target_cache", None)
    return bool(use_target_cache(target_state)) if callable(use_target_cache) else False


def vocabulary_sizes(model: torch.nn.Module) -> dict[str, int]:
    """Return the vocabulary sizes a model declares: config.vocab_size and its embedding sizes."""
    sizes = {}
    vocab_size = getattr(model.config, "vocab_size", None)
    if vocab_size is not None:
        sizes["config.vocab_size"] = vocab_size

    input_embeddings = model.get_input_embeddings()
    if input_embeddings is not None:
        sizes["input embedding rows"] = input_embeddings.num_embeddings

    output_embeddings = model.get_output_embeddings()
    if output_embeddings is not None and hasattr(output_embeddings, "out_features"):
        sizes["lm_head outputs"] = output_embeddings.out_features
    return sizes


def check_same_vocabulary(target: torch.nn.Module, draft: torch.nn.Module) -> None:
    """Raise ValueError when the draft's vocabulary sizes differ from the target's."""
    target_sizes = vocabulary_sizes(target)
    draft_sizes = vocabulary_sizes(draft)
    for name, target_size in target_sizes.items():
        draft_size = draft_sizes.get(name)
        if draft_size is not None and draft_size != target_size:
            raise ValueError(
                f"draft vocabulary does not match the target: {name} is {draft_size} for the draft "
                f"and {target_size} for the target (use a draft with the target's tokenizer)"
            )



@dataclasses.dataclass
class Verdict:
    """Outcome of verifying one step's draft tokens.

    accepted: leading draft tokens accepted. next_token: the token that follows them, drawn
    from the residual after a rejection or from p after a full accept. p_x, q_x and u are
    (n,) tensors of p(x), q(x) and the uniform draw per draft token x. Only the sampled
    rule sets them, and only the debug log reads them.
    """

    accepted: int
    next_token: int
    draft_tokens: list[int]
    p_x: torch.Tensor | None = None
    q_x: torch.Tensor | None = None
    u: torch.Tensor | None = None


def verify_greedy(target_logits: torch.Tensor, drafts: torch.Tensor) -> Verdict:
    """Accept draft tokens while they equal the target's argmax; the argmax then follows them.

    NOTE: the target scores all draft positions in one pass, whose float rounding can differ
    from one-token decoding, so a near-tie in the logits could pick another argmax than
    greedy decoding does. The tests find identical outputs in float32 on the models they use.
    """
    (num_drafts,) = drafts.shape
    argmax = target_logits.argmax(dim=-1)  # (n + 1,)

    # one device-to-host copy for the whole step
    values = torch.cat([argmax, drafts]).tolist()
    target_tokens, draft_tokens = values[: num_drafts + 1], values[num_drafts + 1 :]

    accepted = 0
    while accepted < num_drafts and draft_tokens[accepted] == target_tokens[accepted]:
        accepted += 1
    return Verdict(accepted=accepted, next_token=target_tokens[accepted], draft_tokens=draft_tokens)


def verify_sampled(
    target_logits: torch.Tensor,
    drafts: torch.Tensor,
    q: torch.Tensor | None,
    sampling: SamplingSettings,
    generator: torch.Generator | None,
) -> Verdict:
    """Accept draft token x with probability min(1, p(x)/q(x)); draw the next token as the papers do.

    target_logits: (n + 1, V) target logits at the draft positions and one past them.
    drafts: (n,) draft tokens; q: (n, V) their draft distributions, or None for one-hot.
    """
    (num_drafts,) = drafts.shape
    vocab_size = target_logits.shape[-1]
    p = probabilities(target_logits, sampling.temperature, sampling.top_k, sampling.top_p)  # (n + 1, V)

    # accept while u < p(x)/q(x), written as u * q(x) < p(x) so that no division is needed
    positions = torch.arange(num_drafts, device=p.device)
    p_x = p[positions, drafts].double()  # (n,)
    q_x = q[positions, drafts].double() if q is not None else torch.ones_like(p_x)
    u = uniform((num_drafts,), generator, p.device)
    is_accepted = (u * q_x < p_x).tolist()
    accepted = is_accepted.index(False) if False in is_accepted else num_drafts

    # after a rejection draw from norm(max(0, p - q)), otherwise the bonus token from p
    if accepted < num_drafts:
        q_row = q[accepted] if q is not None else one_hot(drafts[accepted], vocab_size)
        next_distribution = residual_distribution(p[accepted], q_row)
    else:
        next_distribution = p[num_drafts]
    next_token = int(sample(next_distribution, generator))

    return Verdict(
        accepted=accepted, next_token=next_token, draft_tokens=drafts.tolist(), p_x=p_x, q_x=q_x, u=u
    )


class DebugLog:
    """Token-level log of every step, written to a plain text file (appended, one call after another)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file: IO[str] = path.open("a", encoding="utf-8")
        self.step = 0

    def close(self) -> None:
        """Close the file."""
        self.file.close()

    def write_call(self, prompt_len: int, k: int, sampling: SamplingSettings, draft: DraftSettings) -> None:
        """Write the header of one `speculative_generate` call."""
        self.file.write(
            f"call prompt_tokens={prompt_len} k={k} temperature={sampling.temperature} top_k={sampling.top_k} "
            f"top_p={sampling.top_p} draft_temperature={draft.temperature} draft_top_k={draft.top_k} "
            f"draft_top_p={draft.top_p} draft_proposal={draft.proposal}\n"
        )

    def write_step(self, verdict: Verdict, q: torch.Tensor | None, greedy: bool, target_argmax: list[int]) -> None:
        """Write the step's draft tokens, then p, q, p/q and the decision per token, then the next token."""
        self.step += 1
        drafts = verdict.draft_tokens
        self.file.write(f"step {self.step} drafts={drafts}\n")
        for position, token in enumerate(drafts[: verdict.accepted + 1]):
            p_x, q_x, u = self._token_probabilities(verdict, q, greedy, target_argmax, position)
            ratio = p_x / q_x if q_x > 0 else float("inf")
            decision = "accept" if position < verdict.accepted else "reject"
            u_text = "-" if u is None else f"{u:.6g}"
            self.file.write(
                f"  pos={position} token={token} p={p_x:.6g} q={q_x:.6g} p/q={ratio:.6g} u={u_text} {decision}\n"
            )

        if verdict.accepted < len(drafts):
            source = "target argmax" if greedy else "norm(max(0, p - q))"
            self.file.write(f"  resampled token={verdict.next_token} from {source}\n")
        else:
            source = "target argmax" if greedy else "p"
            self.file.write(f"  bonus token={verdict.next_token} from {source}\n")

    @staticmethod
    def _token_probabilities(
        verdict: Verdict, q: torch.Tensor | None, greedy: bool, target_argmax: list[int], position: int
    ) -> tuple[float, float, float | None]:
        token = verdict.draft_tokens[position]
        if not greedy:
            return float(verdict.p_x[position]), float(verdict.q_x[position]), float(verdict.u[position])
        # at temperature 0 p is one-hot on the target's argmax
        p_x = 1.0 if token == target_argmax[position] else 0.0
        q_x = 1.0 if q is None else float(q[position, token])
        return p_x, q_x, None


def check_settings(
    k: int,
    max_new_tokens: int,
    sampling: SamplingSettings,
    draft: DraftSettings,
) -> None:
    """Raise ValueError naming the first invalid setting and how to fix it."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1 (draft tokens per step), got {k!r}")
    check_max_new_tokens(max_new_tokens)
    check_sampling_settings(sampling.temperature, sampling.top_k, sampling.top_p)
    check_sampling_settings(draft.temperature, draft.top_k, draft.top_p, prefix="draft_")
    if draft.proposal not in DRAFT_PROPOSALS:
        raise ValueError(f"draft_proposal must be one of {DRAFT_PROPOSALS}, got {draft.proposal!r}")


def prompt_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Return the (1, T) prompt without its left padding; raise ValueError for other shapes."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D (batch, length) LongTensor, got {shape}")
    if input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a LongTensor, got dtype {input_ids.dtype}")
    batch_size, prompt_len = input_ids.shape
    if batch_size != 1:
        raise ValueError(
            f"speculative_generate supports batch size 1 only, got input_ids of shape {tuple(input_ids.shape)} "
            "(call it once per prompt)"
        )
    if attention_mask is None:
        mask_len = prompt_len
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from "
                f"input_ids shape {tuple(input_ids.shape)}"
            )
        mask_len = int(attention_mask.sum())
        if not bool(attention_mask[0, prompt_len - mask_len :].all()):
            raise ValueError("attention_mask must be left padding: zeros, then ones to the end of the prompt")
    if mask_len == 0:
        raise ValueError("the prompt is empty: input_ids needs at least one unmasked token")
    return input_ids[:, prompt_len - mask_len :]


def as_drafter(draft: "torch.nn.Module | Drafter") -> Drafter:
    """Wrap a draft model in ModelDrafter; return any other drafter unchanged."""
    if isinstance(draft, torch.nn.Module):
        return ModelDrafter(draft)
    for method in ("check_vocabulary", "begin", "propose", "rollback"):
        if not callable(getattr(draft, method, None)):
            raise TypeError(
                f"draft must be a causal LM or a drafter with a {method}() method, got {type(draft).__name__}"
            )
    return draft


def record_step(stats: SpeculativeStats, num_drafts: int, verdict: Verdict, num_kept: int) -> None:
    """Add one step to `stats`; `num_kept` is how many of its new tokens precede or are the first EOS."""
    accepted = min(verdict.accepted, num_kept)
    # an EOS among the accepted draft tokens ends the step before any later position counts
    ended_in_drafts = num_kept <= verdict.accepted
    stats.drafted += num_kept if ended_in_drafts else num_drafts
    stats.accepted += accepted
    for position in range(accepted):
        stats.acceptance_histogram[position] += 1
    stats.new_tokens += num_kept
    stats.verification_calls += 1
    if ended_in_drafts:
        return
    if num_drafts == 0:
        stats.undrafted_tokens += 1
    elif verdict.accepted < num_drafts:
        stats.rejected += 1
    else:
        stats.bonus_tokens += 1


@torch.inference_mode()
def speculative_generate(
    target: torch.nn.Module,
    draft: "torch.nn.Module | Drafter",
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    k: int = 4,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    draft_temperature: float | None = None,
    draft_top_k: int | None = None,
    draft_top_p: float | None = None,
    draft_proposal: str = "sample",
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    debug_log: str | Path | None = None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Generate up to `max_new_tokens` tokens for one prompt by speculative decoding.

    target: causal LM whose output distribution is reproduced exactly.
    draft: a causal LM with the target's vocabulary, or a drafter (PromptLookupDrafter,
        ModelDrafter, CombinedDrafter). Each step proposes at most min(k, tokens left - 1) tokens.
    input_ids, attention_mask: (1, T); left padding is removed. Batch size must be 1.
    temperature, top_k, top_p: the target's sampling settings; temperature 0 is greedy
        verification, whose output equals the target's greedy decoding.
    draft_temperature, draft_top_k, draft_top_p: the draft model's own settings; None
        follows the target's. They change speed, never the output distribution.
    draft_proposal: how the draft model picks each token, with q the distribution the
        accept rule then uses:
        "sample": draws from q = softmax at draft_temperature after draft top-k and top-p
            (argmax with one-hot q when draft_temperature is 0);
        "greedy": takes the argmax, so q is one-hot and x is accepted with probability p(x);
        "gumbel_topk": takes argmax(logits / draft_temperature + Gumbel noise) over the
            draft's top-k (and top-p) tokens, or over all tokens when draft_top_k is 0. This
            draws from the same q as "sample", and the accept rule uses that q.
    eos_token_id: int or list of ids that end the output (the EOS is kept); None never stops early.
    pad_token_id: unused, since one row is never padded; accepted so that every decoder
        has the same signature.
    generator: drives every random draw; the same seed gives the same ids.
    debug_log: path of a text file to append each step's draft tokens, p, q, p/q,
        decision and next token to; None (default) writes nothing.

    Returns (new_ids, stats): new_ids (1, N) contains the generated tokens only,
    N <= max_new_tokens, ending at the first EOS if one is generated.
    """
    start_time = time.perf_counter()
    sampling = SamplingSettings(temperature, top_k, top_p)
    draft_settings = DraftSettings(
        temperature=temperature if draft_temperature is None else draft_temperature,
        top_k=top_k if draft_top_k is None else draft_top_k,
        top_p=top_p if draft_top_p is None else draft_top_p,
        proposal=draft_proposal,
        stop_ids=frozenset(normalize_eos_ids(eos_token_id)),
    )
    check_settings(k, max_new_tokens, sampling, draft_settings)
    drafter = as_drafter(draft)
    drafter.check_vocabulary(target)
    prompt = prompt_tokens(input_ids, attention_mask).to(target.device)
    stats = SpeculativeStats(k=k, acceptance_histogram=[0] * k)

    debug = DebugLog(debug_log) if debug_log is not None else None
    try:
        if debug is not None:
            debug.write_call(prompt.shape[1], k, sampling, draft_settings)
        new_ids = _decode(
            target, drafter, prompt, k=k, max_new_tokens=max_new_tokens, sampling=sampling,
            draft_settings=draft_settings, eos_ids=frozenset(normalize_eos_ids(eos_token_id)),
            generator=generator, stats=stats, debug=debug,
        )
    finally:
        if debug is not None:
            debug.close()
    stats.wall_time_s = time.perf_counter() - start_time
    return new_ids.to(input_ids.device), stats


def _decode(
    target: torch.nn.Module,
    drafter: Drafter,
    prompt: torch.Tensor,
    *,
    k: int,
    max_new_tokens: int,
    sampling: SamplingSettings,
    draft_settings: DraftSettings,
    eos_ids: frozenset[int],
    generator: torch.Generator | None,
    stats: SpeculativeStats,
    debug: DebugLog | None,
) -> torch.Tensor:
    """Run draft-verify steps until `max_new_tokens` tokens or an EOS; return the new ids (1, N)."""
    _, prompt_len = prompt.shape
    end = prompt_len + max_new_tokens
    sequence = torch.empty((1, end), dtype=torch.long, device=prompt.device)  # prompt, then output
    sequence[:, :prompt_len] = prompt

    # prefill both models with all prompt tokens but the last, which the first step feeds
    target_state = IncrementalModel(target, "target")
    if prompt_len > 1:
        target_state.extend_to(sequence, prompt_len - 1)
    offer_target_cache(drafter, target_state)
    draft_prefill_calls = drafter.begin(sequence, prompt_len, draft_settings)

    length = prompt_len
    draft_calls = draft_prefill_calls
    draft_refills = 0
    while length < end:
        # draft: never more than fit before max_new_tokens, leaving room for the target's own token
        num_requested = min(k, end - length - 1)
        proposal = drafter.propose(sequence, length, num_requested, generator)
        draft_calls += proposal.forward_calls
        verdict, num_drafts = _verify_step(
            target_state, sequence, length, proposal, num_requested, sampling, generator, debug
        )

        # keep the accepted tokens and the next token, up to the first EOS
        new_tokens = verdict.draft_tokens[: verdict.accepted] + [verdict.next_token]
        num_kept = next((i + 1 for i, token in enumerate(new_tokens) if token in eos_ids), len(new_tokens))
        sequence[0, length + verdict.accepted] = verdict.next_token
        record_step(stats, num_drafts, verdict, num_kept)
        if new_tokens[num_kept - 1] in eos_ids:
            length += num_kept
            break

        # roll back: both caches keep the confirmed tokens before the new next token
        target_state.rollback(sequence, length + verdict.accepted)
        draft_rebuild_calls = drafter.rollback(sequence, length + verdict.accepted)
        draft_calls += draft_rebuild_calls
        draft_refills += draft_rebuild_calls > 0
        length += num_kept

    stats.target_forward_calls = target_state.forward_calls
    stats.draft_forward_calls = draft_calls
    stats.cache_refills = target_state.refills + draft_refills
    return sequence[:, prompt_len:length].clone()


def _verify_step(
    target_state: IncrementalModel,
    sequence: torch.Tensor,
    length: int,
    proposal: DraftProposal,
    num_requested: int,
    sampling: SamplingSettings,
    generator: torch.Generator | None,
    debug: DebugLog | None,
) -> tuple[Verdict, int]:
    """Write the draft tokens after `sequence[0, :length]` and score them in one target pass.

    Return the verdict and the number of draft tokens verified.
    """
    drafts = proposal.tokens[:num_requested]  # (n,)
    num_drafts = drafts.shape[0]
    sequence[0, length : length + num_drafts] = drafts
    q = proposal.q[:num_drafts] if proposal.q is not None else None

    # the pass feeds the uncached confirmed token and the drafts
    target_logits = target_state.extend_to(sequence, length + num_drafts, logits_to_keep=num_drafts + 1)  # (n + 1, V)
    if sampling.temperature == 0:
        verdict = verify_greedy(target_logits, drafts)
    else:
        verdict = verify_sampled(target_logits, drafts, q, sampling, generator)

    if debug is not None:
        debug.write_step(verdict, q, sampling.temperature == 0, target_logits.argmax(dim=-1).tolist())
    return verdict, num_drafts
