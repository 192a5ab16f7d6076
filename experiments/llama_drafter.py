"""A drafter that runs a Llama-architecture draft model with a lean forward pass and a static KV cache.

`speculative_generate` calls the draft model once per draft token, so the draft's fixed
cost per call matters as much as its weights. For one step of the 30-layer SmolLM2,
transformers' forward pass runs 84 top-level torch operators per layer, views included,
and `LlamaDraftRunner` runs 48 (counted with torch.profiler). The runner computes the
same layers from the same modules. It uses one fused RMSNorm
(`torch.nn.functional.rms_norm`) and calls the int4 kernel directly, with the q, k and
v projections fused into one product and gate and up into another. Its KV cache is
preallocated and written in place, so a rollback only moves a length counter.

`LlamaDrafter` is a `ModelDrafter` whose draft state is that runner. When the target has
the draft's layer and head shapes (a quantized copy of the target, as the default int4
self-draft is), the drafter can also copy the target's keys and values of the prompt
and of every confirmed token into its own cache (`share_target_cache`). The draft then
skips its own prefill, and its context is the target's exact one. The output does not
change either way, because the target verifies every draft token.
"""

import logging

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from decoding.speculative import DraftSettings, IncrementalModel, ModelDrafter
from experiments.linear_kernels import Int4Linear, Int8Linear

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama",)


def lean_runner_supported(model: torch.nn.Module) -> bool:
    """Return whether `LlamaDraftRunner` can run `model`: a float32 Llama causal LM on CPU without dynamic RoPE."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    # dynamic RoPE rescales with the sequence length, which a table computed once cannot follow
    if rope_type == "dynamic" or not hasattr(model, "model"):
        return False
    return model.device.type == "cpu" and model.dtype == torch.float32


def _fused_product(modules: list[torch.nn.Module], dtype: torch.dtype):
    """Return one low-bit product that computes all of `modules` at once, or None when they cannot be fused."""
    if dtype != torch.bfloat16 or any(module.bias is not None for module in modules):
        return None
    first = modules[0]
    if all(isinstance(module, Int8Linear) for module in modules):
        codes = torch.cat([module.weight_codes for module in modules], dim=0)  # (sum of outs, in)
        scales = torch.cat([module.scales for module in modules], dim=0)
        return lambda rows: torch.ops.aten._weight_int8pack_mm(rows, codes, scales)
    if all(isinstance(module, Int4Linear) and module.group_size == first.group_size for module in modules):
        packed = torch.cat([module.packed_weight for module in modules], dim=0)
        scales = torch.cat([module.scales_and_zeros for module in modules], dim=1)  # (groups, sum of outs, 2)
        group_size = first.group_size
        return lambda rows: torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, group_size, scales)
    return None


def _projection(modules: list[torch.nn.Module], dtype: torch.dtype):
    """Return a function from rows (n, in) to the concatenated outputs of `modules` (n, sum of outs), in `dtype`.

    Int8 or int4 layers without bias are fused into one product: their weights are rows
    of the output, so stacking them (and their scales) along the output stacks the
    products. Other layers are called one by one.

    The int4 kernel's packed layout interleaves blocks of output rows (64 rows on the
    development machine, and the block may differ by CPU), so packed weights only stack
    when each layer is a whole number of blocks. The fused product is therefore checked
    once against the separate layers on a random input, and not used when it differs.
    """
    first = modules[0]

    def separate(rows: torch.Tensor) -> torch.Tensor:
        if len(modules) == 1:
            return first(rows).to(dtype)
        return torch.cat([module(rows).to(dtype) for module in modules], dim=-1)

    if len(modules) == 1:
        return separate
    fused = _fused_product(modules, dtype)
    if fused is None:
        return separate

    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, first.in_features, generator=generator).to(dtype)
    with torch.inference_mode():
        expected, actual = separate(probe).float(), fused(probe).float()
    if torch.allclose(actual, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item()):
        return fused
    logger.debug("the fused product of %d %s layers differs from the layers; calling them one by one",
                 len(modules), type(first).__name__)
    return separate


class LlamaDraftRunner:
    """Forward passes of a Llama causal LM at batch size 1 over a preallocated KV cache.

    `length` is the number of cached positions. `forward` appends positions and returns
    logits, `crop` drops positions, and `copy_from` takes positions from a
    `DynamicCache` of a model with the same layer and head shapes.

    The residual stream, attention and the KV cache are float32. The inputs of the
    projections are bfloat16 when the model has int4 layers (the kernel's input
    type) and float32 otherwise, where the logits then match transformers' to rounding.
    """

    def __init__(self, model: torch.nn.Module):
        if not lean_runner_supported(model):
            raise ValueError(
                f"LlamaDraftRunner supports float32 Llama-architecture models on CPU, got model_type "
                f"{getattr(model.config, 'model_type', None)!r} in {model.dtype} on {model.device} "
                "(use ModelDrafter instead)"
            )
        config = model.config
        self.model = model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.hidden_size = config.hidden_size
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5

        inner = model.model
        low_bit = any(isinstance(module, (Int4Linear, Int8Linear)) for module in model.modules())
        self.projection_dtype = torch.bfloat16 if low_bit else torch.float32
        self.embedding = inner.embed_tokens
        self.final_norm = inner.norm.weight
        self.head = model.get_output_embeddings()
        dtype = self.projection_dtype
        self.layers = [
            (
                layer.input_layernorm.weight,
                _projection([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], dtype),
                _projection([layer.self_attn.o_proj], dtype),
                layer.post_attention_layernorm.weight,
                _projection([layer.mlp.gate_proj, layer.mlp.up_proj], dtype),
                _projection([layer.mlp.down_proj], dtype),
            )
            for layer in inner.layers
        ]
        self.intermediate_size = config.intermediate_size
        self.keys = self.values = None  # (layers, kv heads, capacity, head dim) each
        self.cos = self.sin = None  # (capacity, head dim)
        self.length = 0

    def start(self, capacity: int) -> None:
        """Empty the cache and make room for `capacity` positions."""
        if self.keys is None or self.keys.shape[2] < capacity:
            shape = (len(self.layers), self.num_kv_heads, capacity, self.head_dim)
            self.keys = torch.zeros(shape, dtype=torch.float32)
            self.values = torch.zeros(shape, dtype=torch.float32)
            self._build_rope_table(capacity)
        self.length = 0

    def _build_rope_table(self, capacity: int) -> None:
        # the model's own rotary module, so scaled RoPE variants give its exact cos and sin
        positions = torch.arange(capacity)[None, :]  # (1, capacity)
        with torch.inference_mode():
            cos, sin = self.model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
        self.cos, self.sin = cos[0].float(), sin[0].float()  # (capacity, head dim)

    def crop(self, length: int) -> None:
        """Keep the first `length` cached positions."""
        self.length = min(length, self.length)

    def copy_from(self, cache: DynamicCache, end: int) -> None:
        """Copy positions `length` to `end` of another model's cache into this one."""
        start = self.length
        if end <= start:
            return
        for index, layer in enumerate(cache.layers):
            # (1, kv heads, positions, head dim) -> (kv heads, positions, head dim)
            self.keys[index, :, start:end] = layer.keys[0, :, start:end]
            self.values[index, :, start:end] = layer.values[0, :, start:end]
        self.length = end

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, logits_to_keep: int = 1) -> torch.Tensor:
        """Feed `tokens` (1, n) after the cached positions; return the last logits (logits_to_keep, V)."""
        (num_tokens,) = tokens.shape[-1:]
        start, end = self.length, self.length + num_tokens
        if end > self.keys.shape[2]:
            raise ValueError(
                f"draft cache is full: it has room for {self.keys.shape[2]} positions, but {end} are needed; "
                "call start() with a capacity of at least prompt length + max_new_tokens + k"
            )
        cos, sin = self.cos[start:end], self.sin[start:end]  # (n, head dim)
        # a block of several tokens attends causally to itself, and a single token attends to every cached position
        mask = None
        if num_tokens > 1:
            mask = torch.ones(num_tokens, end, dtype=torch.bool).tril(diagonal=start)  # (n, end)

        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        hidden = self.embedding(tokens.reshape(num_tokens))  # (n, hidden)
        for index, (norm_in, qkv_proj, o_proj, norm_post, gate_up_proj, down_proj) in enumerate(self.layers):
            # attention: rotate q and k together, write k and v into the cache, attend to all cached positions
            rows = F.rms_norm(hidden, (self.hidden_size,), norm_in, self.eps).to(self.projection_dtype)  # (n, hidden)
            qkv = qkv_proj(rows).float().view(num_tokens, heads + 2 * kv_heads, head_dim).transpose(0, 1)
            qk = self._rotate(qkv[: heads + kv_heads], cos, sin)  # (heads + kv heads, n, d)
            self.keys[index, :, start:end] = qk[heads:]
            self.values[index, :, start:end] = qkv[heads + kv_heads :]
            attention = F.scaled_dot_product_attention(
                qk[None, :heads], self.keys[None, index, :, :end], self.values[None, index, :, :end],
                attn_mask=mask, scale=self.scale, enable_gqa=True,
            )  # (1, heads, n, d)
            attention = attention[0].transpose(0, 1).reshape(num_tokens, -1).to(self.projection_dtype)  # (n, heads * d)
            hidden = hidden + o_proj(attention).float()

            # gated MLP, kept in the projection dtype between its projections
            rows = F.rms_norm(hidden, (self.hidden_size,), norm_post, self.eps).to(self.projection_dtype)
            gate_up = gate_up_proj(rows)  # (n, 2 * intermediate)
            gate, up = gate_up[:, : self.intermediate_size], gate_up[:, self.intermediate_size :]
            hidden = hidden + down_proj(F.silu(gate) * up).float()

        self.length = end
        last = F.rms_norm(hidden[-logits_to_keep:], (self.hidden_size,), self.final_norm, self.eps)
        return self.head(last)  # (logits_to_keep, V)


class _RunnerState:
    """The draft state `ModelDrafter` expects (length, forward, extend_to, rollback), backed by the runner."""

    def __init__(self, runner: LlamaDraftRunner, target_state: IncrementalModel | None):
        self.runner = runner
        self.target_state = target_state
        # positions whose keys and values came from the target's cache
        self.target_synced = 0
        self.forward_calls = 0
        self.refills = 0

    @property
    def length(self) -> int:
        return self.runner.length

    def forward(self, tokens: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        self.forward_calls += 1
        return self.runner.forward(tokens, logits_to_keep)

    def extend_to(self, sequence: torch.Tensor, end: int, logits_to_keep: int = 1) -> torch.Tensor:
        return self.forward(sequence[:, self.runner.length : end], logits_to_keep)

    def rollback(self, sequence: torch.Tensor, length: int) -> None:
        if self.target_state is None:
            self.runner.crop(length)
            return
        # replace the draft's own keys and values of the confirmed tokens by the target's
        self.runner.crop(self.target_synced)
        self.sync_from_target(length)

    def sync_from_target(self, length: int) -> None:
        """Copy the target's keys and values up to position `length` (at most its cache length)."""
        self.runner.copy_from(self.target_state.cache, min(length, self.target_state.length))
        self.target_synced = self.runner.length


class LlamaDrafter(ModelDrafter):
    """`ModelDrafter` for a Llama-architecture draft model, computed by `LlamaDraftRunner`.

    share_target_cache: when the target's layer and head shapes match the draft's, copy
    the target's keys and values of confirmed positions into the draft cache
    (see the module docstring). `speculative_generate` offers its cache through
    `use_target_cache` before `begin`; the target's state then stays attached to the
    draft state of that prompt.
    """

    def __init__(self, model: torch.nn.Module, min_confidence: float = 0.0, share_target_cache: bool = True):
        super().__init__(model, min_confidence)
        self.runner = LlamaDraftRunner(model)
        self.share_target_cache = share_target_cache
        self.target_state: IncrementalModel | None = None

    def use_target_cache(self, target_state: IncrementalModel) -> bool:
        """Read the target's cache in `begin` and `rollback` if its shapes match; return whether it will.

        Called by `speculative_generate` once per prompt, before `begin`.
        """
        self.target_state = None
        if self.share_target_cache and self._same_cache_shapes(target_state.model):
            self.target_state = target_state
        return self.target_state is not None

    def _same_cache_shapes(self, target: torch.nn.Module) -> bool:
        config = target.config.get_text_config(decoder=True)
        runner = self.runner
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return (
            getattr(config, "model_type", None) == self.model.config.model_type
            and config.num_hidden_layers == len(runner.layers)
            and config.num_key_value_heads == runner.num_kv_heads
            and head_dim == runner.head_dim
            and not getattr(config, "sliding_window", None)
        )

    def begin(self, sequence: torch.Tensor, length: int, settings: DraftSettings) -> int:
        """Fill the draft cache with the prompt but its last token: from the target's cache, or by a prefill."""
        self.settings = settings
        self.runner.start(sequence.shape[1])
        state = _RunnerState(self.runner, self.target_state)
        self.state = state
        if self.target_state is not None:
            state.sync_from_target(length - 1)
        if length - 1 > self.runner.length:
            state.extend_to(sequence, length - 1)
        # one offer covers one prompt, so a later call without an offer prefills again
        self.target_state = None
        return state.forward_calls


def model_drafter(model: torch.nn.Module, min_confidence: float = 0.0) -> "LlamaDrafter | torch.nn.Module":
    """Return the drafter `speculative_generate` should get for a draft model.

    A `LlamaDrafter` when `LlamaDraftRunner` supports the model, otherwise the model itself,
    which `speculative_generate` wraps in a `ModelDrafter` (with `min_confidence` 0).
    """
    if lean_runner_supported(model):
        logger.info("the draft model runs through LlamaDraftRunner (static KV cache, fewer operators per layer)")
        return LlamaDrafter(model, min_confidence=min_confidence)
    if min_confidence:
        return ModelDrafter(model, min_confidence=min_confidence)
    return model
