"""Decoders: each takes a model and a left-padded batch and returns `(new_token_ids, stats)`."""

from decoding.beam import BeamStats, beam_search
from decoding.greedy import GreedyStats, greedy_generate
from decoding.prompt_lookup import PromptLookupDrafter
from decoding.speculative import CombinedDrafter, ModelDrafter, SpeculativeStats, speculative_generate
from decoding.stats import DecodingStats

__all__ = [
    "BeamStats",
    "CombinedDrafter",
    "DecodingStats",
    "GreedyStats",
    "ModelDrafter",
    "PromptLookupDrafter",
    "SpeculativeStats",
    "beam_search",
    "greedy_generate",
    "speculative_generate",
]
