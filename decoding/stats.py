"""Counters that every decoder returns beside its token ids."""

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class DecodingStats:
    """Counters shared by all decoders.

    `new_tokens` is the number of generated tokens summed over the batch rows,
    counting each row's EOS token but not the padding after it.
    `target_forward_calls` counts forward passes of the (target) model, the
    prefill included. `wall_time_s` is the wall-clock time of the whole call
    in seconds.
    """

    new_tokens: int = 0
    target_forward_calls: int = 0
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of wall time (0.0 when no time was measured)."""
        if self.wall_time_s <= 0.0:
            return 0.0
        return self.new_tokens / self.wall_time_s
