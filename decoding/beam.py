"""Beam search with a KV cache, for batches of left-padded prompts.

The bookkeeping follows transformers' beam search (`generate(num_beams=...,
do_sample=False)` in transformers 5.25), so sequences and scores match it:

- each step keeps the top C = max(2, 1 + number of EOS ids) * num_beams
  continuations of all beams, so that num_beams of them remain running even
  when the best ones end in EOS;
- a continuation that ends in EOS, or reaches `max_new_tokens`, becomes a
  finished hypothesis if it is among the first num_beams of those C. Its
  score is sum(log p) / length ** length_penalty, where length counts the
  generated tokens including EOS;
- each batch row keeps its num_beams best finished hypotheses and returns
  the best one.

`early_stopping` decides when a row is done, as in transformers:
True stops once num_beams hypotheses are finished; False stops when the best
running beam, length-penalised at the current length, cannot beat the worst
finished hypothesis; "never" does the same check with the longest possible
length when length_penalty > 0 (the current length otherwise).
"""

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from decoding.greedy import (
    ModelCaller,
    check_max_new_tokens,
    check_prompt,
    extend_attention_mask,
    normalize_eos_ids,
    prompt_position_ids,
    resolve_pad_id,
)
from decoding.stats import DecodingStats

logger = logging.getLogger(__name__)

# score given to impossible or excluded continuations, as in transformers
NEG_INF = -1.0e9


@dataclass
class BeamStats(DecodingStats):
    """Counters of one `beam_search` call.

    `sequence_scores` contains, per batch row, the length-penalised score of the
    returned sequence (transformers' `sequences_scores`).
    `new_tokens` counts the returned sequences' tokens, not all beams' tokens.
    """

    sequence_scores: list[float] = field(default_factory=list)


@dataclass
class BeamState:
    """Running beams and finished hypotheses of a batch, indexed (B, num_beams, ...)."""

    running_tokens: torch.Tensor  # (B, K, N) generated tokens of the running beams
    running_scores: torch.Tensor  # (B, K) summed log-probabilities, best first
    finished_tokens: torch.Tensor  # (B, K, N)
    finished_scores: torch.Tensor  # (B, K) length-penalised, best first
    finished_lengths: torch.Tensor  # (B, K) generated tokens, EOS included
    is_finished: torch.Tensor  # (B, K) False for slots still holding no hypothesis
    is_improvable: torch.Tensor  # (B, 1) False once the early-stopping rule ends a row


@dataclass
class Candidates:
    """The C best continuations of each batch row at one step, best first."""

    scores: torch.Tensor  # (B, C) summed log-probabilities
    source_beams: torch.Tensor  # (B, C) running beam each one extends
    sequences: torch.Tensor  # (B, C, N) generated tokens, the new one included
    ended: torch.Tensor  # (B, C) True on EOS or at the length limit


def check_beam_settings(num_beams: int, length_penalty: float, early_stopping: bool | str) -> None:
    """Raise a ValueError naming the setting when a beam search setting is invalid."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 2:
        raise ValueError(
            f"num_beams must be an int >= 2, got {num_beams!r} "
            "(set beam.num_beams; for a single beam use greedy decoding)"
        )
    if (
        isinstance(length_penalty, bool)
        or not isinstance(length_penalty, int | float)
        or not math.isfinite(length_penalty)
    ):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r} (set beam.length_penalty)")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(
            f'early_stopping must be true, false or "never", got {early_stopping!r} (set beam.early_stopping)'
        )


def beam_search(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> tuple[torch.Tensor, BeamStats]:
    """Return the best beam-search continuation of each left-padded prompt row.

    The output is the generated ids only (B, N), N <= max_new_tokens, on the
    device of `input_ids`: a sequence that ended in EOS keeps it and is padded
    with `pad_token_id` (default: the first EOS id) up to the longest returned
    sequence. `BeamStats.sequence_scores` contains each row's length-penalised
    score. See the module docstring for `length_penalty` and `early_stopping`.
    """
    start_time = time.perf_counter()
    check_beam_settings(num_beams, length_penalty, early_stopping)
    check_max_new_tokens(max_new_tokens)
    eos_ids = normalize_eos_ids(eos_token_id)
    pad_id = resolve_pad_id(pad_token_id, eos_ids)
    attention_mask = check_prompt(input_ids, attention_mask)
    output_device = input_ids.device

    with torch.inference_mode():
        state, caller = _beam_loop(
            model, input_ids, attention_mask, num_beams, max_new_tokens,
            float(length_penalty), early_stopping, eos_ids,
        )
        new_ids, lengths = _best_sequences(state, pad_id)

    stats = BeamStats(
        new_tokens=int(lengths.sum().item()),
        target_forward_calls=caller.forward_calls,
        wall_time_s=time.perf_counter() - start_time,
        sequence_scores=state.finished_scores[:, 0].tolist(),
    )
    return new_ids.to(output_device), stats


def _beam_loop(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float,
    early_stopping: bool | str,
    eos_ids: list[int],
) -> tuple[BeamState, ModelCaller]:
    """Run prefill and the beam steps until every batch row is done, returning the final state."""
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    batch_size, prompt_len = input_ids.shape
    eos_tensor = torch.tensor(eos_ids, dtype=torch.long, device=device)

    # prefill once per prompt, then copy the cache and logits to each of its beams
    caller = ModelCaller(model)
    position_ids = prompt_position_ids(attention_mask, input_ids)  # (B, T)
    logits = caller.last_logits(input_ids, attention_mask, position_ids)  # (B, V)
    caller.cache.batch_repeat_interleave(num_beams)
    logits = logits.repeat_interleave(num_beams, dim=0)  # (B*K, V)
    next_positions = position_ids[:, -1:].repeat_interleave(num_beams, dim=0) + 1  # (B*K, 1)
    full_mask = extend_attention_mask(attention_mask, max_new_tokens)
    if full_mask is not None:
        full_mask = full_mask.repeat_interleave(num_beams, dim=0)  # (B*K, T + N)

    state = _initial_state(batch_size, num_beams, max_new_tokens, device)
    num_candidates = max(2, 1 + len(eos_ids)) * num_beams
    beam_offsets = torch.arange(batch_size, device=device)[:, None] * num_beams  # (B, 1)

    for step in range(max_new_tokens):
        generated = step + 1

        # expand: score every (beam, token) continuation and keep the top C
        candidates = _top_continuations(logits, state, step, num_candidates, eos_tensor, max_new_tokens)

        # select the next running beams and record the newly finished hypotheses
        source_beams = _select_running(state, candidates, num_beams)
        _add_finished(state, candidates, generated, length_penalty, early_stopping)

        # stop when every row is done (the loop's only host sync)
        _update_improvable(state, generated, max_new_tokens, length_penalty, early_stopping)
        if not _has_open_rows(state, candidates, early_stopping):
            break

        # decode: reorder the cache rows so each running beam continues from its source
        # beam, then feed each beam's last token at the next position
        caller.cache.reorder_cache((source_beams + beam_offsets).flatten())
        last_tokens = state.running_tokens[:, :, step].reshape(-1, 1)  # (B*K, 1)
        step_mask = full_mask[:, : prompt_len + generated] if full_mask is not None else None
        logits = caller.last_logits(last_tokens, step_mask, next_positions)  # (B*K, V)
        next_positions = next_positions + 1

    return state, caller


def _initial_state(batch_size: int, num_beams: int, max_new_tokens: int, device: torch.device) -> BeamState:
    """Return the state before the first step: one live beam per row, no finished hypotheses."""
    shape = (batch_size, num_beams)
    tokens = torch.zeros((batch_size, num_beams, max_new_tokens), dtype=torch.long, device=device)

    # only beam 0 starts live, so the first step does not pick the same token once per beam
    running_scores = torch.zeros(shape, dtype=torch.float32, device=device)
    running_scores[:, 1:] = NEG_INF
    return BeamState(
        running_tokens=tokens,
        running_scores=running_scores,
        finished_tokens=tokens.clone(),
        finished_scores=torch.full(shape, NEG_INF, dtype=torch.float32, device=device),
        finished_lengths=torch.zeros(shape, dtype=torch.long, device=device),
        is_finished=torch.zeros(shape, dtype=torch.bool, device=device),
        is_improvable=torch.ones((batch_size, 1), dtype=torch.bool, device=device),
    )


def _gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Return the entries (B, J, ...) picked along dim 1 of a (B, M, ...) tensor by a (B, J) index."""
    index = index.view(*index.shape, *([1] * (tensor.dim() - 2)))
    return torch.take_along_dim(tensor, index, dim=1)


def _top_continuations(
    logits: torch.Tensor,
    state: BeamState,
    step: int,
    num_candidates: int,
    eos_tensor: torch.Tensor,
    max_new_tokens: int,
) -> Candidates:
    """Return the C best continuations of each row's running beams."""
    batch_size, num_beams = state.running_scores.shape
    vocab_size = logits.shape[-1]

    # summed log-probabilities of every continuation, in float32 like transformers
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B*K, V)
    log_probs = log_probs.view(batch_size, num_beams, vocab_size) + state.running_scores[:, :, None]
    log_probs = log_probs.view(batch_size, num_beams * vocab_size)  # (B, K*V)
    scores, flat_indices = torch.topk(log_probs, k=num_candidates)  # (B, C)
    source_beams = flat_indices // vocab_size
    tokens = flat_indices % vocab_size

    # token rows of the candidates: the source beam's tokens plus the new one
    sequences = _gather_rows(state.running_tokens, source_beams)  # (B, C, N)
    sequences[:, :, step] = tokens

    # a continuation ends on an EOS token or at the length limit
    if step + 1 == max_new_tokens:
        ended = torch.ones_like(tokens, dtype=torch.bool)
    else:
        ended = torch.isin(tokens, eos_tensor)
    return Candidates(scores=scores, source_beams=source_beams, sequences=sequences, ended=ended)


def _select_running(state: BeamState, candidates: Candidates, num_beams: int) -> torch.Tensor:
    """Make the best num_beams candidates that did not end the running beams, returning their source beams (B, K)."""
    open_scores = candidates.scores + candidates.ended.float() * NEG_INF  # (B, C)
    chosen = torch.topk(open_scores, k=num_beams).indices  # (B, K)
    state.running_tokens = _gather_rows(candidates.sequences, chosen)
    state.running_scores = _gather_rows(open_scores, chosen)
    return _gather_rows(candidates.source_beams, chosen)


def _add_finished(
    state: BeamState,
    candidates: Candidates,
    generated: int,
    length_penalty: float,
    early_stopping: bool | str,
) -> None:
    """Merge the candidates that just ended into each row's num_beams best finished hypotheses."""
    num_beams = state.finished_scores.shape[1]

    # only the first num_beams candidates may finish, because the others only back up the running beams
    just_finished = candidates.ended.clone()
    just_finished[:, num_beams:] = False

    # length-penalise the scores, and sink excluded candidates below every real hypothesis
    scores = candidates.scores / (generated**length_penalty)  # (B, C)
    row_is_full = state.is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
    scores = scores + row_is_full.float() * NEG_INF
    scores = scores + (~state.is_improvable).float() * NEG_INF
    scores = scores + (~just_finished).float() * NEG_INF

    # keep the best num_beams of the old and new hypotheses, old ones first on ties
    lengths = torch.full_like(candidates.source_beams, generated)
    merged_scores = torch.cat([state.finished_scores, scores], dim=1)  # (B, K + C)
    best = torch.topk(merged_scores, k=num_beams).indices  # (B, K)
    state.finished_scores = _gather_rows(merged_scores, best)
    state.finished_tokens = _gather_rows(torch.cat([state.finished_tokens, candidates.sequences], dim=1), best)
    state.finished_lengths = _gather_rows(torch.cat([state.finished_lengths, lengths], dim=1), best)
    state.is_finished = _gather_rows(torch.cat([state.is_finished, just_finished], dim=1), best)


def _update_improvable(
    state: BeamState,
    generated: int,
    max_new_tokens: int,
    length_penalty: float,
    early_stopping: bool | str,
) -> None:
    """Mark rows done whose best running beam can no longer beat their worst finished hypothesis.

    The running score is length-penalised with the current length, except
    for early_stopping="never" with length_penalty > 0, where the longest
    possible length gives the best score it could still reach. A row with an
    empty finished slot always stays open.
    """
    if early_stopping == "never" and length_penalty > 0.0:
        best_length = max_new_tokens
    else:
        best_length = generated
    best_running = state.running_scores[:, :1] / (best_length**length_penalty)  # (B, 1)
    worst_finished = state.finished_scores.min(dim=1, keepdim=True).values  # (B, 1)
    worst_finished = torch.where(state.is_finished, worst_finished, NEG_INF)  # (B, K)
    can_improve = (best_running > worst_finished).any(dim=-1, keepdim=True)
    state.is_improvable = state.is_improvable & can_improve


def _has_open_rows(state: BeamState, candidates: Candidates, early_stopping: bool | str) -> bool:
    """Return whether any row can still improve, as one host sync."""
    can_improve = state.is_improvable.any()
    all_full = state.is_finished.all() & (early_stopping is True)
    all_ended = candidates.ended.all()
    return bool(can_improve & ~all_full & ~all_ended)


def _best_sequences(state: BeamState, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return each row's best finished sequence (B, N), padded after its end, and the lengths (B,)."""
    lengths = state.finished_lengths[:, 0]  # (B,)
    output_len = int(lengths.max().item())
    tokens = state.finished_tokens[:, 0, :output_len]  # (B, N)
    is_padding = torch.arange(output_len, device=tokens.device)[None, :] >= lengths[:, None]
    return tokens.masked_fill(is_padding, pad_id), lengths
