"""Greedy decoding with a KV cache, for batches of left-padded prompts.

The steps, inputs and stopping rule follow transformers' own greedy decoding
(`generate(do_sample=False)` in transformers 5.25), so the tokens are identical
to it for the same model and prompt. The input checks and the prefill helpers
here are shared with beam search.
"""

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from decoding.stats import DecodingStats

logger = logging.getLogger(__name__)


@dataclass
class GreedyStats(DecodingStats):
    """Counters of one `greedy_generate` call (see `DecodingStats` for the fields)."""


def check_max_new_tokens(max_new_tokens: int) -> None:
    """Raise a ValueError unless `max_new_tokens` is an int >= 1."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(
            f"max_new_tokens must be an int, got {max_new_tokens!r} (set generation.max_new_tokens)"
        )
    if max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens must be >= 1, got {max_new_tokens} (set generation.max_new_tokens)"
        )


def normalize_eos_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    """Return the EOS ids as a list: empty for None, one item for an int."""
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise ValueError(
                f"eos_token_id must be None, an int >= 0 or a list of them, got {eos_token_id!r} "
                "(pass the tokenizer's eos_token_id)"
            )
    return ids


def resolve_pad_id(pad_token_id: int | None, eos_ids: list[int]) -> int:
    """Return the id written after a row's EOS: `pad_token_id`, else the first EOS id, as transformers does."""
    if pad_token_id is not None:
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(
                f"pad_token_id must be None or an int >= 0, got {pad_token_id!r} "
                "(pass the tokenizer's pad_token_id)"
            )
        return pad_token_id
    if eos_ids:
        return eos_ids[0]
    # without an EOS id no row finishes early, so no position is ever padded
    return 0


def check_prompt(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Check a left-padded prompt batch and return its attention mask, or None when nothing is padded.

    Like transformers, the mask is dropped when it is all ones, so the model
    takes its faster unpadded path and the results stay identical to `generate`.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D (batch, length) tensor, got {shape}")
    if input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a LongTensor, got dtype {input_ids.dtype}")
    batch_size, prompt_len = input_ids.shape
    if batch_size == 0 or prompt_len == 0:
        raise ValueError(f"input_ids must contain at least one token per row, got shape {(batch_size, prompt_len)}")
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != (batch_size, prompt_len):
        raise ValueError(
            f"attention_mask must have the shape of input_ids {(batch_size, prompt_len)}, "
            f"got {tuple(attention_mask.shape)}"
        )

    # one host sync per call: padding layout decides which model path runs
    is_kept = attention_mask != 0
    if not bool(is_kept[:, -1].all()):
        raise ValueError(
            "attention_mask has padding at the end of a row, but the decoders need left padding "
            "(set tokenizer.padding_side = 'left')"
        )
    if bool(is_kept.all()):
        return None
    return is_kept.long()


def prompt_position_ids(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """Return the (B, T) position ids of a left-padded prompt: 0 at each row's first real token, 0 on padding."""
    batch_size, prompt_len = input_ids.shape
    if attention_mask is None:
        positions = torch.arange(prompt_len, device=input_ids.device)
        return positions.unsqueeze(0).expand(batch_size, prompt_len)
    positions = attention_mask.cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


class ModelCaller:
    """Forward-pass runner for a causal LM that keeps one KV cache and counts the calls.

    The model is given explicit position ids (so left padding does not shift
    positions) and `logits_to_keep=1` where its forward takes them, as
    transformers' `generate` does.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        self.forward_calls = 0

        # read the forward signature once, not on every step
        parameters = inspect.signature(model.forward).parameters
        self.takes_position_ids = "position_ids" in parameters
        self.extra_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    def last_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Run one forward pass over `input_ids` (B, S) and return the last position's logits (B, V)."""
        kwargs = dict(self.extra_kwargs)
        if self.takes_position_ids:
            kwargs["position_ids"] = position_ids
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=self.cache,
            use_cache=True,
            **kwargs,
        )
        self.forward_calls += 1
        return outputs.logits[:, -1, :]  # (B, V)


def extend_attention_mask(attention_mask: torch.Tensor | None, max_new_tokens: int) -> torch.Tensor | None:
    """Return the prompt mask followed by `max_new_tokens` ones, so each step can pass a slice of it."""
    if attention_mask is None:
        return None
    batch_size = attention_mask.shape[0]
    ones = attention_mask.new_ones((batch_size, max_new_tokens))
    return torch.cat([attention_mask, ones], dim=-1)  # (B, T + N)


def greedy_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> tuple[torch.Tensor, GreedyStats]:
    """Generate up to `max_new_tokens` tokens per row by always taking the argmax.

    `input_ids` and `attention_mask` are (B, T) and left-padded. A row stops at
    its first token in `eos_token_id` (an int or a list), keeps that EOS, and
    is padded with `pad_token_id` after it. As in transformers,
    `pad_token_id` defaults to the first EOS id. The loop ends when every row
    has finished or after exactly `max_new_tokens` steps.

    Returns the generated ids only (B, N) with N <= max_new_tokens, on the
    device of `input_ids`, and a `GreedyStats`.
    """
    start_time = time.perf_counter()
    check_max_new_tokens(max_new_tokens)
    eos_ids = normalize_eos_ids(eos_token_id)
    pad_id = resolve_pad_id(pad_token_id, eos_ids)
    attention_mask = check_prompt(input_ids, attention_mask)
    output_device = input_ids.device

    with torch.inference_mode():
        new_ids, lengths, caller = _greedy_loop(model, input_ids, attention_mask, max_new_tokens, eos_ids, pad_id)

    stats = GreedyStats(
        new_tokens=int(lengths.sum().item()),
        target_forward_calls=caller.forward_calls,
        wall_time_s=time.perf_counter() - start_time,
    )
    return new_ids.to(output_device), stats


def _greedy_loop(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, ModelCaller]:
    """Run prefill and the decode steps, returning the ids (B, N), the per-row lengths (B,) and the caller."""
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    batch_size, prompt_len = input_ids.shape

    # prefill: one forward pass over the whole prompt fills the cache
    caller = ModelCaller(model)
    position_ids = prompt_position_ids(attention_mask, input_ids)  # (B, T)
    logits = caller.last_logits(input_ids, attention_mask, position_ids)  # (B, V)
    next_positions = position_ids[:, -1:] + 1  # (B, 1)
    full_mask = extend_attention_mask(attention_mask, max_new_tokens)  # (B, T + N) or None

    # per-row state, where `lengths` counts each row's tokens up to and including its EOS
    new_ids = torch.full((batch_size, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
    unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
    eos_tensor = torch.tensor(eos_ids, dtype=torch.long, device=device)

    steps_done = 0
    for step in range(max_new_tokens):
        # pick the argmax, and give padding to rows that already ended
        next_tokens = logits.argmax(dim=-1)  # (B,)
        if eos_ids:
            next_tokens = torch.where(unfinished, next_tokens, pad_id)
            lengths += unfinished
            unfinished &= ~torch.isin(next_tokens, eos_tensor)
        new_ids[:, step] = next_tokens
        steps_done = step + 1

        # stop after the last token, or once every row has ended (the loop's only host sync)
        if steps_done == max_new_tokens:
            break
        if eos_ids and not bool(unfinished.any()):
            break

        # decode: feed the new token at the next position
        step_mask = full_mask[:, : prompt_len + steps_done] if full_mask is not None else None
        logits = caller.last_logits(next_tokens[:, None], step_mask, next_positions)
        next_positions = next_positions + 1

    if not eos_ids:
        lengths.fill_(steps_done)
    return new_ids[:, :steps_done], lengths, caller
