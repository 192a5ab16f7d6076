"""Prompt lookup drafting: propose the tokens that followed an earlier copy of the current suffix.

No model is involved. The drafter searches the prompt and the output generated so far
for an earlier occurrence of the last n tokens, for n from `max_ngram_size` down to
`min_ngram_size`, and proposes the tokens that followed the most recent such occurrence.
The proposal is deterministic, so its q is one-hot on each proposed token.
"""

import torch

from decoding.speculative import DraftProposal, DraftSettings


class PromptLookupDrafter:
    """Drafter that copies continuations of the longest earlier n-gram match in prompt and output."""

    def __init__(self, max_ngram_size: int = 3, min_ngram_size: int = 1):
        if isinstance(max_ngram_size, bool) or not isinstance(max_ngram_size, int) or max_ngram_size < 1:
            raise ValueError(f"max_ngram_size must be an int >= 1, got {max_ngram_size!r}")
        if isinstance(min_ngram_size, bool) or not isinstance(min_ngram_size, int) or min_ngram_size < 1:
            raise ValueError(f"min_ngram_size must be an int >= 1, got {min_ngram_size!r}")
        if min_ngram_size > max_ngram_size:
            raise ValueError(
                f"min_ngram_size ({min_ngram_size}) must not exceed max_ngram_size ({max_ngram_size})"
            )
        self.max_ngram_size = max_ngram_size
        self.min_ngram_size = min_ngram_size

    def check_vocabulary(self, target: torch.nn.Module) -> None:
        """Accept any target: the drafter copies token ids from the target's own input."""

    def begin(self, sequence: torch.Tensor, length: int, settings: DraftSettings) -> int:
        """Start a new sequence; no forward calls are needed, so return 0."""
        return 0

    def propose(
        self, sequence: torch.Tensor, length: int, num_tokens: int, generator: torch.Generator | None
    ) -> DraftProposal:
        """Propose up to `num_tokens` tokens continuing `sequence[0, :length]`; none when nothing matches."""
        tokens = self.lookup(sequence[0, :length], num_tokens)
        return DraftProposal(tokens=tokens, q=None, forward_calls=0)

    def rollback(self, sequence: torch.Tensor, length: int) -> int:
        """Keep no state, so there is nothing to roll back; return 0 forward calls."""
        return 0

    def lookup(self, history: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Return the tokens (n,), n <= num_tokens, after the most recent earlier match of the longest suffix."""
        (length,) = history.shape
        empty = history.new_empty(0)
        if num_tokens < 1:
            return empty

        for ngram_size in range(min(self.max_ngram_size, length - 1), self.min_ngram_size - 1, -1):
            suffix = history[length - ngram_size :]  # (n,)

            # windows start at 0 .. length-1-n, so at least one token follows each match
            windows = history[: length - 1].unfold(0, ngram_size, 1)  # (length - n, n)
            starts = (windows == suffix).all(dim=1).nonzero()
            if starts.numel() == 0:
                continue

            continuation_start = int(starts[-1]) + ngram_size
            return history[continuation_start : continuation_start + num_tokens]
        return empty
