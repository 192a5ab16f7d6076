"""Render questions into model inputs: chat template or plain text, one BOS, left padding.

BOS rule. A tokenizer without a BOS token gets no BOS. Otherwise the model is taken to
expect a BOS when the chat template writes one, or when the tokenizer prepends one to
plain text (as the Gemma 3 tokenizer does). Then every rendered prompt starts with
exactly one BOS: repeated leading BOS tokens collapse into one and a missing one is
prepended. When neither the template nor the tokenizer adds one (GPT-2), there is none.
The text itself is always tokenized without the tokenizer's own special tokens, so no
EOS or other token is appended to a prompt.

Chat templates that reject a system message, or drop it, get the system prompt
merged into the first user turn as `system_prompt + "\\n\\n" + prompt`. Plain-text
prompts get the same join.
"""

import logging
from collections.abc import Mapping, Sequence

import jinja2
import torch
from transformers import BatchEncoding

logger = logging.getLogger(__name__)

# the text placed between a system prompt and the question when they are merged
SYSTEM_SEPARATOR = "\n\n"

# chat template text -> whether it renders a system message; filled on first use so the
# merge warning is logged once per template and process
_SYSTEM_ROLE_SUPPORT: dict[str, bool] = {}


class PromptError(ValueError):
    """A prompt that cannot be rendered: empty, too long or rejected by the chat template."""


def render_prompt(
    tokenizer,
    prompts: str | Sequence[str],
    system_prompt: str | None = None,
    *,
    max_length: int | None = None,
    log_text: bool = False,
) -> BatchEncoding:
    """Tokenize `prompts` into a left-padded batch ready for `generate` or the decoders.

    A tokenizer whose `chat_template` is set renders each prompt as one user turn with
    the generation prompt appended. Otherwise the prompt is used as plain text. The
    BOS rule and the system prompt merge are described in the module docstring. A
    `system_prompt` that is empty or only whitespace counts as none.

    A tokenizer without a pad token gets its EOS token as pad token, set on the
    tokenizer itself and logged once, so callers read `tokenizer.pad_token_id`
    afterwards. Padding never changes a prompt's own ids.

    max_length: the maximum number of tokens a rendered prompt may have, usually the
        model's context length (less the tokens to generate, if the caller reserves them).
    log_text: log each prompt's decoded input ids at INFO level.

    Returns a `BatchEncoding` with `input_ids` and `attention_mask`, both (B, T) int64.
    Raises `PromptError` for an empty prompt, a prompt longer than `max_length` or a
    chat template that fails, naming the prompt's index.
    """
    prompt_list = _check_prompts(prompts)
    if max_length is not None and max_length < 1:
        raise PromptError(f"max_length must be >= 1, got {max_length} (pass the model's context length)")
    if system_prompt is not None and not system_prompt.strip():
        system_prompt = None

    # render each prompt to ids with exactly one BOS where the model expects one
    ids_per_prompt = _render_ids(tokenizer, prompt_list, system_prompt)
    adds_bos = _tokenizer_adds_bos(tokenizer)
    ids_per_prompt = [_normalize_bos(ids, tokenizer.bos_token_id, adds_bos) for ids in ids_per_prompt]

    # reject prompts longer than the model's context
    if max_length is not None:
        for index, ids in enumerate(ids_per_prompt):
            if len(ids) > max_length:
                raise PromptError(
                    f"prompt {index} is {len(ids)} tokens long after rendering, more than "
                    f"max_length={max_length} (the model's context); shorten the prompt or "
                    "the system prompt, or use a model with a longer context"
                )

    if log_text:
        for index, ids in enumerate(ids_per_prompt):
            logger.info("rendered prompt %d (%d tokens):\n%s", index, len(ids), _decode(tokenizer, ids))

    return _left_pad(tokenizer, ids_per_prompt)


def prompt_text(tokenizer, prompt: str, system_prompt: str | None = None) -> str:
    """Decode the rendered input ids of `prompt`, special tokens kept, for logs and records."""
    batch = render_prompt(tokenizer, prompt, system_prompt)
    return _decode(tokenizer, batch["input_ids"][0].tolist())


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """Return `prompts` as a list, raising `PromptError` for a non-string or empty prompt."""
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise PromptError("no prompts to render; pass a string or a non-empty list of strings")
    for index, prompt in enumerate(prompt_list):
        if not isinstance(prompt, str):
            raise PromptError(f"prompt {index} must be a str, got {type(prompt).__name__}")
        if not prompt.strip():
            raise PromptError(
                f"prompt {index} is empty ({len(prompt)} characters, none of them visible); "
                "remove it from the input or give it a question"
            )
    return prompt_list


def _render_ids(tokenizer, prompts: list[str], system_prompt: str | None) -> list[list[int]]:
    """Tokenize each prompt through the chat template when there is one, else as plain text."""
    if tokenizer.chat_template is None:
        texts = [_join_system(system_prompt, prompt) for prompt in prompts]
        return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    system_in_template = system_prompt is not None and _template_renders_system(
        tokenizer, system_prompt, prompts[0]
    )
    ids_per_prompt = []
    for index, prompt in enumerate(prompts):
        if system_in_template:
            messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
        else:
            messages = [{"role": "user", "content": _join_system(system_prompt, prompt)}]
        try:
            output = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except jinja2.TemplateError as error:
            raise PromptError(
                f"the chat template of {_tokenizer_name(tokenizer)} failed on prompt {index} "
                f"({len(prompt)} characters): {error}; fix the template or set the tokenizer's "
                "chat_template to None to render plain text"
            ) from error
        ids_per_prompt.append(_as_id_list(output))
    return ids_per_prompt


def _template_renders_system(tokenizer, system_prompt: str, prompt: str) -> bool:
    """Check once per chat template that it renders a system message, warning when it does not."""
    template = tokenizer.chat_template
    if template in _SYSTEM_ROLE_SUPPORT:
        return _SYSTEM_ROLE_SUPPORT[template]

    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        supported = system_prompt.strip() in text
        reason = "leaves the system prompt out of its output"
    except jinja2.TemplateError as error:
        supported = False
        reason = f"rejects the system role ({error})"

    if not supported:
        logger.warning(
            "the chat template of %s %s; merging the system prompt into the first user turn",
            _tokenizer_name(tokenizer),
            reason,
        )
    _SYSTEM_ROLE_SUPPORT[template] = supported
    return supported


def _join_system(system_prompt: str | None, prompt: str) -> str:
    return prompt if system_prompt is None else system_prompt + SYSTEM_SEPARATOR + prompt


def _as_id_list(output) -> list[int]:
    """Return the ids of one conversation from whatever `apply_chat_template` returned.

    transformers 5 returns a `BatchEncoding` by default, older releases a list of ids,
    and `return_tensors="pt"` gives a (1, T) Tensor.
    """
    if isinstance(output, Mapping):  # BatchEncoding or dict
        output = output["input_ids"]
    if isinstance(output, torch.Tensor):
        output = output.tolist()
    ids = list(output)
    if ids and isinstance(ids[0], (list, tuple)):  # a batch of one conversation
        if len(ids) != 1:
            raise PromptError(f"apply_chat_template returned {len(ids)} sequences for one prompt")
        ids = list(ids[0])
    return [int(token_id) for token_id in ids]


def _normalize_bos(ids: list[int], bos_id: int | None, tokenizer_adds_bos: bool) -> list[int]:
    """Return `ids` starting with exactly one BOS when the model expects one (module docstring)."""
    if bos_id is None:
        return ids

    # strip every leading BOS, then put back one if there was any or the tokenizer adds one
    start = 0
    while start < len(ids) and ids[start] == bos_id:
        start += 1
    body = ids[start:]
    if start > 0 or tokenizer_adds_bos:
        return [bos_id, *body]
    return body


def _tokenizer_adds_bos(tokenizer) -> bool:
    """Check whether the tokenizer prepends BOS to plain text.

    The encoding is probed instead of reading `add_bos_token`, because that attribute
    reads False after `from_pretrained` even when tokenizer.json's post-processor adds
    a BOS (transformers 5.25).
    """
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _left_pad(tokenizer, ids_per_prompt: list[list[int]]) -> BatchEncoding:
    """Stack the prompts into (B, T) tensors, padding each on the left."""
    batch_size = len(ids_per_prompt)
    max_len = max(len(ids) for ids in ids_per_prompt)
    pad_id = _ensure_pad_token(tokenizer)
    if pad_id is None:
        if any(len(ids) != max_len for ids in ids_per_prompt):
            raise PromptError(
                f"{_tokenizer_name(tokenizer)} has neither a pad token nor an EOS token, so prompts "
                "of different lengths cannot be padded; set tokenizer.pad_token or render one prompt at a time"
            )
        pad_id = 0  # never written: every prompt has the full length

    input_ids = torch.full((batch_size, max_len), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((batch_size, max_len), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(ids_per_prompt):
        input_ids[row, max_len - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, max_len - len(ids):] = 1
    return BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask})


def _ensure_pad_token(tokenizer) -> int | None:
    """Return the pad token id, first setting the pad token to the EOS token when there is none."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info(
            "%s has no pad token; padding with its EOS token %r (id %d)",
            _tokenizer_name(tokenizer),
            tokenizer.eos_token,
            tokenizer.eos_token_id,
        )
    return tokenizer.pad_token_id


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
