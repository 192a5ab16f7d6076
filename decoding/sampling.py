"""Sampling helpers shared by the decoders: logits -> probability distributions -> tokens.

A sampling setting is the triple (temperature, top_k, top_p). It is applied in the order
of the warpers of transformers `generate` (5.25): divide by the temperature, keep the
`top_k` largest logits, then keep the smallest set of most likely tokens whose
probability mass reaches `top_p`. Temperature 0 means greedy. The distribution is then
one-hot on the argmax (the first index among equal maxima, as `torch.argmax`), and
nothing is divided by the temperature.

Every random draw goes through `uniform`, so one `torch.Generator` seeds a whole run.
"""

import math

import torch


def check_sampling_settings(temperature: float, top_k: int, top_p: float, *, prefix: str = "") -> None:
    """Raise ValueError naming the invalid setting; `prefix` is prepended to each name ("draft_")."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"{prefix}temperature must be a number >= 0, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{prefix}temperature must be a finite number >= 0, got {temperature!r} (use 0 for greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"{prefix}top_k must be an int >= 0, got {top_k!r} (use 0 to keep every token)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"{prefix}top_p must be in (0, 1], got {top_p!r} (use 1.0 to keep every token)")


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Return `logits` (..., V) divided by `temperature` (> 0), with tokens outside top-k and top-p set to -inf."""
    if temperature <= 0:
        raise ValueError(f"warp_logits needs temperature > 0, got {temperature!r}; use argmax for temperature 0")
    vocab_size = logits.shape[-1]
    scores = logits.float() / temperature if temperature != 1.0 else logits.float()

    # top-k: keep every token whose score reaches the k-th largest (ties at the boundary are kept)
    if 0 < top_k < vocab_size:
        kth_largest = torch.topk(scores, top_k, dim=-1).values[..., -1:]  # (..., 1)
        scores = scores.masked_fill(scores < kth_largest, -math.inf)

    # top-p: keep a token while the mass of the tokens ranked above it is below top_p
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)  # (..., V)
        sorted_probs = sorted_scores.softmax(dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_scores = sorted_scores.masked_fill(mass_above >= top_p, -math.inf)
        scores = torch.full_like(scores, -math.inf).scatter(-1, order, sorted_scores)
    return scores


def probabilities(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Return the float32 distribution (..., V) that sampling with these settings draws from."""
    if temperature == 0:
        return one_hot(logits.argmax(dim=-1), logits.shape[-1])
    return warp_logits(logits, temperature, top_k, top_p).softmax(dim=-1)


def one_hot(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Return float32 one-hot rows (..., V) for `tokens` (...)."""
    return torch.nn.functional.one_hot(tokens, vocab_size).float()


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Draw U[0, 1) float64 numbers from `generator` on its own device and move them to `device`."""
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device, dtype=torch.float64).to(device)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row of `probs` (..., V) by inverting its CDF; return a LongTensor (...).

    `probs` need not sum to 1. A token of probability 0 is never drawn.
    """
    cdf = probs.double().cumsum(dim=-1)  # (..., V)
    total = cdf[..., -1:]  # (..., 1)
    u = uniform(total.shape, generator, probs.device)  # (..., 1)

    # u * total < total even after rounding, so some cumulative mass exceeds the target,
    # and the first index whose cumulative mass exceeds it has nonzero mass
    targets = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, targets, right=True).squeeze(-1)


def gumbel_max_sample(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw one token per row of `logits` (..., V) as argmax(warped logits + Gumbel noise).

    By the Gumbel-max identity the token follows `probabilities(logits, temperature,
    top_k, top_p)` exactly: softmax at `temperature` restricted to the top-k (and top-p)
    tokens. Temperature 0 returns the argmax.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = warp_logits(logits, temperature, top_k, top_p)
    u = uniform(tuple(scores.shape), generator, scores.device)

    # -log(-log(u)) is standard Gumbel noise; clamping keeps u = 0 finite
    gumbel = -torch.log(-torch.log(u.clamp_(min=torch.finfo(torch.float64).tiny)))
    return (scores.double() + gumbel).argmax(dim=-1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Return norm(max(0, p - q)) over the last dimension, or p where that sum is 0.

    For distributions p and q the sum is 0 only when p <= q everywhere, so p == q up to
    rounding. A rejection then cannot happen in exact arithmetic, and p is the right fallback.
    """
    residual = (p - q).clamp_(min=0)  # (..., V)
    total = residual.sum(dim=-1, keepdim=True)  # (..., 1)
    return torch.where(total > 0, residual / total.clamp(min=torch.finfo(residual.dtype).tiny), p)
