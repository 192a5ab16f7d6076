"""Tiny random models, built in the test process, for every architecture the presets use.

Each model is small enough to run a whole decoding test in well under a second on
one CPU core. The models use a larger `initializer_range` than the library default,
so their next-token distributions are peaked. Near-ties in the argmax would make
exact comparisons with transformers depend on floating-point summation order.
"""

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    StableLmConfig,
)

VOCAB_SIZE = 300
# Below the prompt length of the long-prompt tests, so Gemma 3's sliding-window
# layers must drop early keys.
GEMMA3_SLIDING_WINDOW = 8

ARCHITECTURES = ("gpt2", "llama", "stablelm", "gemma3", "qwen2")

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=1.0,
)


def _config(arch: str):
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **_COMMON)
    if arch == "llama":
        return LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **_COMMON,
        )
    if arch == "stablelm":
        return StableLmConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, partial_rotary_factor=0.25, **_COMMON,
        )
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **_COMMON,
        )
    if arch == "gemma3":
        # hybrid cache: sliding-window layers interleaved with a full-attention layer
        return Gemma3TextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
            sliding_window=GEMMA3_SLIDING_WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            tie_word_embeddings=False, **_COMMON,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHITECTURES}")


def make_tiny_model(arch: str, seed: int = 0):
    """Build a float32 tiny model of `arch` with random weights drawn from `seed`, in eval mode."""
    torch.manual_seed(seed)
    config = _config(arch)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


def random_prompt(length: int, seed: int = 0, low: int = 3) -> torch.Tensor:
    """Return a (1, length) prompt of ordinary tokens (no BOS, EOS or pad ids)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB_SIZE, (1, length), generator=generator)
