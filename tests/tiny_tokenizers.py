"""Tiny tokenizers, built in the test process, with the chat templates of the preset model families.

Every tokenizer is a byte-level BPE without merges, so each byte of text is one token,
wrapped in `PreTrainedTokenizerFast`. The vocabulary has exactly `VOCAB_SIZE` (300)
entries, matching the tiny models in `tiny.py`. Id 0 is the pad token, 1 the BOS token
and 2 the EOS token. Ids 3 to 43 are the style's chat tokens followed by unused fillers.
Byte value b is id 44 + b, so `[FIRST_BYTE_ID + b for b in text.encode()]` are the ids
of a text without special tokens. The plain (GPT-2 style) tokenizer differs: its
single `<|endoftext|>` token is id 2 and serves as both BOS and EOS, as in GPT-2.

The chat templates are written for these tests and follow the prompt formats of
SmolLM2 and Qwen2 (ChatML), TinyLlama and StableLM 2 zephyr (Zephyr) and Gemma (Gemma).
`save_pretrained` and `AutoTokenizer.from_pretrained(folder)` round-trip each tokenizer,
its chat template and whether it adds BOS. The BOS behaviour is stored as the
post-processor in tokenizer.json. After reloading, the `add_bos_token` attribute reads
False even for a tokenizer that adds BOS (transformers 5.25).
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 300
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_BYTE_ID = VOCAB_SIZE - 256  # 44

STYLES = ("chatml", "zephyr", "gemma", "plain")

# ChatML: every turn is `<|im_start|>role\n...<|im_end|>\n`.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Zephyr: every turn is `<|role|>\n...` closed by the EOS token. The role markers are plain text.
ZEPHYR_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# Gemma: the template writes the BOS token itself, names the assistant `model`, trims
# each message and raises for a system message, like the google/gemma-7b-it and Gemma 2 templates.
GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- raise_exception('System role not supported') -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

# pad, BOS and EOS token strings (ids 0, 1, 2) and extra chat tokens (from id 3) per style
_SPECIAL_TOKENS = {
    "chatml": (("<|endoftext|>", "<|im_start|>", "<|im_end|>"), ()),
    "zephyr": (("<unk>", "<s>", "</s>"), ()),
    "gemma": (("<pad>", "<bos>", "<eos>"), ("<start_of_turn>", "<end_of_turn>")),
    "plain": (("<|unused0|>", "<|unused1|>", "<|endoftext|>"), ()),
}

_TEMPLATES = {"chatml": CHATML_TEMPLATE, "zephyr": ZEPHYR_TEMPLATE, "gemma": GEMMA_TEMPLATE, "plain": None}

# whether the style's real tokenizer adds BOS to plain text (Gemma does, the others do not)
_ADDS_BOS = {"chatml": False, "zephyr": False, "gemma": True, "plain": False}


def _byte_characters() -> list[str]:
    """Return the character that byte-level BPE uses for each byte value 0..255, in byte order.

    Printable Latin-1 bytes map to their own character. The other bytes (controls,
    space, soft hyphen) map to the characters from U+0100 upwards, in byte order.
    """
    visible = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    characters = []
    next_shifted = 0x100
    for byte in range(256):
        if byte in visible:
            characters.append(chr(byte))
        else:
            characters.append(chr(next_shifted))
            next_shifted += 1
    return characters


def _backend(style: str) -> Tokenizer:
    """Build the byte-level BPE backend with the style's special tokens at fixed ids."""
    (pad, bos, eos), chat_tokens = _SPECIAL_TOKENS[style]
    specials = [pad, bos, eos, *chat_tokens]
    fillers = [f"<|unused{i}|>" for i in range(len(specials), FIRST_BYTE_ID)]
    byte_tokens = _byte_characters()
    if set(byte_tokens) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("byte characters differ from the tokenizers library's ByteLevel alphabet")
    vocab = {token: i for i, token in enumerate(specials + fillers + byte_tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def make_tiny_tokenizer(
    style: str = "chatml",
    *,
    add_bos: bool | None = None,
    pad_token: bool | None = None,
    bos_token: bool = True,
) -> PreTrainedTokenizerFast:
    """Build a tiny tokenizer in `style` ("chatml", "zephyr", "gemma" or "plain").

    add_bos: whether encoding plain text prepends the BOS token; None takes the style's
        default (True for "gemma" with a BOS token, False otherwise).
    pad_token: whether a pad token is set; None takes the style's default (False for
        "plain", like GPT-2, True otherwise).
    bos_token: False builds a tokenizer with no BOS token at all, like Qwen2's. The
        style's id-1 token stays a special token, so the template may still write it.
    """
    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {STYLES}")
    if add_bos is None:
        add_bos = _ADDS_BOS[style] and bos_token
    if pad_token is None:
        pad_token = style != "plain"
    if add_bos and not bos_token:
        raise ValueError("add_bos=True needs a BOS token; pass bos_token=True")

    (pad, bos, eos), chat_tokens = _SPECIAL_TOKENS[style]
    extra_tokens = list(chat_tokens)
    if style == "plain":
        bos = eos  # GPT-2 uses <|endoftext|> as both BOS and EOS
    elif not bos_token:
        # without a BOS token id 1 stays a control token, like Qwen2's <|im_start|>
        extra_tokens.insert(0, bos)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_backend(style),
        bos_token=bos if bos_token else None,
        eos_token=eos,
        pad_token=pad if pad_token else None,
        extra_special_tokens=extra_tokens,
        add_bos_token=add_bos,
        chat_template=_TEMPLATES[style],
        model_max_length=256,  # the tiny models' max_position_embeddings
    )
    return tokenizer
