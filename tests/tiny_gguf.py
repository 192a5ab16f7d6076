"""Write the tiny Llama of tiny.py as a float32 GGUF file, for tests of the GGUF loading path."""

from pathlib import Path

import gguf
import numpy as np
from tiny import make_tiny_model
from tiny_tokenizers import make_tiny_tokenizer


def write_tiny_gguf(path: Path):
    """Write the tiny Llama of tiny.py and its ChatML tokenizer as a float32 GGUF file.

    Returns the source model and tokenizer, to compare the loaded copy against.
    """
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer("chatml")
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")

    # hyperparameters
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    # byte-level BPE tokenizer, as SmolLM2's GGUF stores it
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i < 44 else gguf.TokenType.NORMAL for i in range(len(tokens))])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(tokenizer.chat_template)

    # tensors, with q and k rows permuted the way llama.cpp stores them
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                   "post_attention_layernorm": "ffn_norm"}
    for i in range(config.num_hidden_layers):
        for hf_name, gguf_name in layer_names.items():
            names[f"model.layers.{i}.{hf_name}.weight"] = f"blk.{i}.{gguf_name}.weight"
    state = model.state_dict()
    for hf_name, gguf_name in names.items():
        weight = state[hf_name].numpy().astype(np.float32)
        if "q_proj" in hf_name:
            weight = _permute_rows(weight, config.num_attention_heads)
        if "k_proj" in hf_name:
            weight = _permute_rows(weight, config.num_key_value_heads)
        writer.add_tensor(gguf_name, weight)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokenizer


def _permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
