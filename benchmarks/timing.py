"""Timed runs of decoding methods over a list of prompts, with the outputs kept for identity checks.

Every method is a function from one rendered prompt to `(new_ids, stats)`, where
`new_ids` is a (1, N) tensor of generated tokens only. `time_methods` warms each method
up once, then runs all methods over all prompts `repeats` times, and keeps each
method's total wall time per repeat.
Throughput is a ratio of totals: all generated tokens over the median total time.
"""

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class Prompt:
    """One rendered question: (1, T) input ids and attention mask on the model's device."""

    question: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class Method:
    """A named decoding method; `generate(prompt)` returns ((1, N) new ids, stats dict or None)."""

    name: str
    generate: Callable[[Prompt], tuple[torch.Tensor, dict[str, Any] | None]]


@dataclass
class MethodResult:
    """Outputs and timings of one method over all prompts.

    token_ids: per prompt, the generated ids up to and including the first EOS.
    repeat_seconds: total wall time of each timed repeat over all prompts.
    stats: per prompt, the decoder's stats from the first timed repeat (None for transformers).
    """

    name: str
    token_ids: list[list[int]] = field(default_factory=list)
    repeat_seconds: list[float] = field(default_factory=list)
    stats: list[dict[str, Any] | None] = field(default_factory=list)
    deterministic: bool = True

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.repeat_seconds)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over all prompts divided by the median total time (higher is better)."""
        return self.tokens / self.median_seconds

    def to_dict(self) -> dict[str, Any]:
        """Return the timings and token counts (not the ids) as JSON-serialisable values."""
        return {
            "tokens": self.tokens,
            "median_seconds": self.median_seconds,
            "tokens_per_second": self.tokens_per_second,
            "repeat_seconds": self.repeat_seconds,
            "deterministic": self.deterministic,
        }


def trim_at_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Return `ids` up to and including the first EOS id, which drops any padding after it."""
    ids = list(ids)
    for position, token_id in enumerate(ids):
        if token_id in eos_ids:
            return ids[: position + 1]
    return ids


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock readings include it; no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(method: Method, prompt: Prompt, device: torch.device) -> tuple[float, torch.Tensor, Any]:
    synchronize(device)
    started = time.perf_counter()
    new_ids, stats = method.generate(prompt)
    synchronize(device)
    return time.perf_counter() - started, new_ids, stats


def time_methods(
    methods: Sequence[Method],
    prompts: Sequence[Prompt],
    *,
    repeats: int,
    eos_ids: Sequence[int],
    device: torch.device,
) -> dict[str, MethodResult]:
    """Time every method over all prompts `repeats` times after one warm-up call each.

    Within a repeat, the methods take turns on each prompt, in an order that rotates
    from prompt to prompt, so that a burst of load from another process falls on all
    methods alike. A method's repeat time is the sum of its calls in that repeat. A
    method whose outputs change between repeats is marked `deterministic=False`.
    """
    for method in methods:
        logger.info("warm-up: %s", method.name)
        method.generate(prompts[0])

    results = {method.name: MethodResult(method.name) for method in methods}
    for repeat in range(repeats):
        seconds = dict.fromkeys(results, 0.0)
        outputs = {name: [] for name in results}
        stats = {name: [] for name in results}
        for index, prompt in enumerate(prompts):
            shift = (repeat * len(prompts) + index) % len(methods)
            for method in list(methods[shift:]) + list(methods[:shift]):
                elapsed, new_ids, prompt_stats = _timed_call(method, prompt, device)
                seconds[method.name] += elapsed
                outputs[method.name].append(trim_at_eos(new_ids[0].tolist(), eos_ids))
                stats[method.name].append(prompt_stats)

        for name, result in results.items():
            result.repeat_seconds.append(seconds[name])
            if repeat == 0:
                result.token_ids = outputs[name]
                result.stats = stats[name]
            elif outputs[name] != result.token_ids:
                result.deterministic = False
        logger.info("repeat %d/%d: %s", repeat + 1, repeats, ", ".join(f"{n} {s:.2f} s" for n, s in seconds.items()))
    return results


@dataclass
class Comparison:
    """Throughput of method `name` over method `baseline` (ratio of totals, higher is better)."""

    name: str
    baseline: str
    ratio: float
    identical: bool
    mismatched_prompts: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "identical": self.identical,
            "mismatched_prompts": self.mismatched_prompts,
        }


def compare(results: dict[str, MethodResult], name: str, baseline: str) -> Comparison:
    """Compare the tokens per second and the per-prompt outputs of two timed methods."""
    method, reference = results[name], results[baseline]
    mismatched = [index for index, (a, b) in enumerate(zip(method.token_ids, reference.token_ids)) if a != b]
    return Comparison(
        name=name,
        baseline=baseline,
        ratio=method.tokens_per_second / reference.tokens_per_second,
        identical=not mismatched,
        mismatched_prompts=mismatched,
    )
