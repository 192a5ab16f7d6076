"""Items per second of batched greedy and beam evaluation against batch size 1.

The questions go through `ModeRunner.generate`, the generation step of evaluate.py
(chat-template rendering, left padding, decoding, trimming at EOS), without scoring
or writing results.
"""

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.timing import synchronize
from experiments.data import QAItem
from experiments.generation import ModeRunner

logger = logging.getLogger(__name__)


@dataclass
class BatchingResult:
    """Throughput of one mode at batch size 1 and at `batch_size`, over the same questions.

    ratio = batched items/s over unbatched items/s (higher is better). identical_items
    counts the questions whose output ids are the same in both runs.
    """

    mode: str
    items: int
    batch_size: int
    unbatched_seconds: float
    batched_seconds: float
    identical_items: int

    @property
    def ratio(self) -> float:
        return self.unbatched_seconds / self.batched_seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "items": self.items,
            "batch_size": self.batch_size,
            "unbatched_items_per_second": self.items / self.unbatched_seconds,
            "batched_items_per_second": self.items / self.batched_seconds,
            "ratio": self.ratio,
            "identical_items": self.identical_items,
        }


def _run_all(runner: ModeRunner, mode: str, items: list[QAItem], batch_size: int) -> tuple[float, list[list[int]]]:
    """Decode all items in batches of `batch_size`; return the wall time and each item's output ids."""
    device = runner.target.model.device
    outputs = []
    synchronize(device)
    started = time.perf_counter()
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        results = runner.generate(mode, [item.question for item in batch], [item.id for item in batch])
        outputs.extend(result.output_token_ids for result in results)
    synchronize(device)
    return time.perf_counter() - started, outputs


def measure_batching(
    runner: ModeRunner, items: list[QAItem], mode: str, batch_sizes: list[int]
) -> list[BatchingResult]:
    """Time `mode` over all items at batch size 1 and at each of `batch_sizes`, after one warm-up batch of each."""
    with torch.inference_mode():
        for size in (1, *batch_sizes):
            warm_up = items[:size]
            runner.generate(mode, [item.question for item in warm_up], [item.id for item in warm_up])

        unbatched_seconds, unbatched_outputs = _run_all(runner, mode, items, 1)
        logger.info("%s, batch size 1: %d items in %.2f s", mode, len(items), unbatched_seconds)
        results = []
        for batch_size in batch_sizes:
            batched_seconds, batched_outputs = _run_all(runner, mode, items, batch_size)
            logger.info("%s, batch size %d: %d items in %.2f s", mode, batch_size, len(items), batched_seconds)
            results.append(
                BatchingResult(
                    mode=mode,
                    items=len(items),
                    batch_size=batch_size,
                    unbatched_seconds=unbatched_seconds,
                    batched_seconds=batched_seconds,
                    identical_items=sum(a == b for a, b in zip(unbatched_outputs, batched_outputs)),
                )
            )
    return results
