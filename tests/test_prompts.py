"""Tests for prompt rendering: chat templates, the BOS rule, system prompts, padding and errors.

Expected ids are written out by hand from the tiny tokenizers' layout (pad 0, BOS 1,
EOS 2, byte b at id 44 + b), so they do not depend on the code under test.
"""

import logging

import pytest
import torch
from tiny import make_tiny_model
from tiny_tokenizers import FIRST_BYTE_ID, STYLES, VOCAB_SIZE, make_tiny_tokenizer
from transformers import AutoTokenizer, BatchEncoding

from experiments import prompts
from experiments.prompts import PromptError, prompt_text, render_prompt

PAD, BOS, EOS = 0, 1, 2
START_OF_TURN, END_OF_TURN = 3, 4  # the Gemma style's chat tokens

# a Gemma-style template that drops system messages instead of raising
SILENT_TEMPLATE = (
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def byte_ids(text: str) -> list[int]:
    return [FIRST_BYTE_ID + byte for byte in text.encode("utf-8")]


def chatml_ids(*turns: tuple[str, str]) -> list[int]:
    """Ids of ChatML turns followed by the assistant generation prompt."""
    ids = []
    for role, content in turns:
        ids += [BOS, *byte_ids(f"{role}\n{content}"), EOS, *byte_ids("\n")]
    return ids + [BOS, *byte_ids("assistant\n")]


def zephyr_ids(content: str) -> list[int]:
    return [*byte_ids(f"<|user|>\n{content}"), EOS, *byte_ids("\n<|assistant|>\n")]


def gemma_ids(content: str) -> list[int]:
    """Ids of one Gemma user turn and the model generation prompt, without the BOS."""
    return [
        START_OF_TURN, *byte_ids(f"user\n{content}"), END_OF_TURN, *byte_ids("\n"),
        START_OF_TURN, *byte_ids("model\n"),
    ]


def row_ids(batch: BatchEncoding, row: int = 0) -> list[int]:
    """The ids of one row of a batch, without its left padding."""
    mask = batch["attention_mask"][row].bool()
    return batch["input_ids"][row][mask].tolist()


@pytest.fixture(autouse=True)
def fresh_system_role_cache(monkeypatch):
    # each test starts with an empty cache, so the warnings it checks are its own
    monkeypatch.setattr(prompts, "_SYSTEM_ROLE_SUPPORT", {})


# tiny tokenizers


@pytest.mark.parametrize("style", STYLES)
def test_tiny_tokenizer_layout(style):
    tokenizer = make_tiny_tokenizer(style)
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.eos_token_id == EOS
    assert tokenizer("Hi é", add_special_tokens=False)["input_ids"] == byte_ids("Hi é")
    if style == "plain":
        assert tokenizer.bos_token_id == EOS
        assert tokenizer.pad_token_id is None
        assert tokenizer.chat_template is None
    else:
        assert tokenizer.bos_token_id == BOS
        assert tokenizer.pad_token_id == PAD
        assert tokenizer.chat_template is not None


@pytest.mark.parametrize(
    "style, options",
    [("chatml", {}), ("zephyr", {"add_bos": True}), ("gemma", {}), ("gemma", {"bos_token": False}), ("plain", {})],
)
def test_tiny_tokenizer_round_trip(tmp_path, style, options):
    tokenizer = make_tiny_tokenizer(style, **options)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)

    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.bos_token_id == tokenizer.bos_token_id
    assert reloaded.eos_token_id == tokenizer.eos_token_id
    assert reloaded.pad_token_id == tokenizer.pad_token_id
    assert reloaded("Hi")["input_ids"] == tokenizer("Hi")["input_ids"]
    rendered = render_prompt(tokenizer, "Hi")["input_ids"]
    assert torch.equal(render_prompt(reloaded, "Hi")["input_ids"], rendered)


# chat templates and the BOS rule


def test_chatml_exact_ids():
    batch = render_prompt(make_tiny_tokenizer("chatml"), "Hi")

    expected = chatml_ids(("user", "Hi"))
    assert batch["input_ids"].tolist() == [expected]
    assert batch["attention_mask"].tolist() == [[1] * len(expected)]
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long


def test_chatml_bos_is_turn_marker():
    # SmolLM2's BOS is <|im_start|>: the first turn marker is the one BOS, later ones stay
    ids = render_prompt(make_tiny_tokenizer("chatml"), "Hi")["input_ids"][0].tolist()
    assert ids[0] == BOS
    assert ids[1] != BOS
    assert ids.count(BOS) == 2


def test_zephyr_without_bos():
    # neither the template nor the tokenizer writes a BOS, so the prompt has none
    ids = render_prompt(make_tiny_tokenizer("zephyr"), "Hi")["input_ids"][0].tolist()
    assert ids == zephyr_ids("Hi")


def test_zephyr_tokenizer_adds_bos():
    # TinyLlama: the template has no BOS but the tokenizer adds one to plain text
    ids = render_prompt(make_tiny_tokenizer("zephyr", add_bos=True), "Hi")["input_ids"][0].tolist()
    assert ids == [BOS, *zephyr_ids("Hi")]


def test_gemma_template_writes_bos():
    tokenizer = make_tiny_tokenizer("gemma")
    assert tokenizer("x")["input_ids"][0] == BOS  # the tokenizer adds one too

    ids = render_prompt(tokenizer, "Hi")["input_ids"][0].tolist()
    assert ids == [BOS, *gemma_ids("Hi")]


def test_double_bos_collapses(monkeypatch):
    # an apply_chat_template that tokenizes with add_special_tokens=True gives two BOS tokens
    tokenizer = make_tiny_tokenizer("gemma")

    def apply_with_special_tokens(messages, **kwargs):
        text = type(tokenizer).apply_chat_template(tokenizer, messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=True)["input_ids"]

    monkeypatch.setattr(tokenizer, "apply_chat_template", apply_with_special_tokens)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])[:2] == [BOS, BOS]

    ids = render_prompt(tokenizer, "Hi")["input_ids"][0].tolist()
    assert ids == [BOS, *gemma_ids("Hi")]


def test_no_bos_token_adds_none():
    tokenizer = make_tiny_tokenizer("gemma", bos_token=False)
    ids = render_prompt(tokenizer, "Hi")["input_ids"][0].tolist()
    assert ids == gemma_ids("Hi")


def test_no_bos_token_keeps_id_one():
    # Qwen2: no BOS token, and <|im_start|> (id 1 here) is an ordinary control token
    tokenizer = make_tiny_tokenizer("chatml", bos_token=False)
    ids = render_prompt(tokenizer, "Hi")["input_ids"][0].tolist()
    assert ids == chatml_ids(("user", "Hi"))


def test_plain_exact_ids():
    ids = render_prompt(make_tiny_tokenizer("plain"), "Hi there")["input_ids"][0].tolist()
    assert ids == byte_ids("Hi there")


def test_plain_tokenizer_adds_bos():
    # Gemma 3 base: no chat template, the tokenizer prepends its BOS
    tokenizer = make_tiny_tokenizer("gemma")
    tokenizer.chat_template = None
    ids = render_prompt(tokenizer, "Hi")["input_ids"][0].tolist()
    assert ids == [BOS, *byte_ids("Hi")]


def test_plain_text_starting_with_bos():
    tokenizer = make_tiny_tokenizer("gemma")
    tokenizer.chat_template = None
    ids = render_prompt(tokenizer, "<bos>Hi")["input_ids"][0].tolist()
    assert ids == [BOS, *byte_ids("Hi")]


def test_plain_never_appends_eos():
    tokenizer = make_tiny_tokenizer("plain")
    tokenizer.add_eos_token = True
    assert tokenizer("Hi")["input_ids"][-1] == EOS

    ids = render_prompt(tokenizer, "Hi")["input_ids"][0].tolist()
    assert ids == byte_ids("Hi")


# system prompts


def test_chatml_system_turn():
    ids = render_prompt(make_tiny_tokenizer("chatml"), "Hi", "Be brief.")["input_ids"][0].tolist()
    assert ids == chatml_ids(("system", "Be brief."), ("user", "Hi"))


def test_plain_system_prepended():
    ids = render_prompt(make_tiny_tokenizer("plain"), "Hi", "Be brief.")["input_ids"][0].tolist()
    assert ids == byte_ids("Be brief.\n\nHi")


def test_blank_system_prompt_ignored():
    tokenizer = make_tiny_tokenizer("chatml")
    ids = render_prompt(tokenizer, "Hi", "  ")["input_ids"][0].tolist()
    assert ids == chatml_ids(("user", "Hi"))


def test_gemma_system_merged_one_warning(caplog):
    tokenizer = make_tiny_tokenizer("gemma")
    questions = ["Hi", "Why?", "How far is it?"]

    with caplog.at_level(logging.WARNING, logger="experiments.prompts"):
        first = render_prompt(tokenizer, questions, "Be brief.")
        second = render_prompt(tokenizer, questions, "Be brief.")

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "System role not supported" in warnings[0].getMessage()
    assert "merging the system prompt into the first user turn" in warnings[0].getMessage()
    for row, question in enumerate(questions):
        assert row_ids(first, row) == [BOS, *gemma_ids(f"Be brief.\n\n{question}")]
    assert torch.equal(first["input_ids"], second["input_ids"])


def test_dropped_system_merged(caplog):
    tokenizer = make_tiny_tokenizer("zephyr")
    tokenizer.chat_template = SILENT_TEMPLATE

    with caplog.at_level(logging.WARNING, logger="experiments.prompts"):
        ids = render_prompt(tokenizer, "Hi", "Be brief.")["input_ids"][0].tolist()

    assert ids == zephyr_ids("Be brief.\n\nHi")
    assert len(caplog.records) == 1
    assert "leaves the system prompt out" in caplog.records[0].getMessage()


def test_no_warning_without_system(caplog):
    with caplog.at_level(logging.WARNING, logger="experiments.prompts"):
        render_prompt(make_tiny_tokenizer("gemma"), ["Hi", "Why?"])
    assert caplog.records == []


# apply_chat_template return types


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda ids: torch.tensor([ids]), id="tensor-2d"),
        pytest.param(lambda ids: torch.tensor(ids), id="tensor-1d"),
        pytest.param(lambda ids: list(ids), id="list"),
        pytest.param(lambda ids: [list(ids)], id="nested-list"),
        pytest.param(
            lambda ids: BatchEncoding({"input_ids": ids, "attention_mask": [1] * len(ids)}),
            id="batch-encoding",
        ),
        pytest.param(
            lambda ids: BatchEncoding({"input_ids": [ids], "attention_mask": [[1] * len(ids)]}, tensor_type="pt"),
            id="batch-encoding-pt",
        ),
    ],
)
def test_chat_template_return_types(monkeypatch, wrap):
    tokenizer = make_tiny_tokenizer("chatml")
    expected = chatml_ids(("user", "Hi"))

    def apply_returning(messages, **kwargs):
        if not kwargs.get("tokenize", True):
            return type(tokenizer).apply_chat_template(tokenizer, messages, **kwargs)
        return wrap(expected)

    monkeypatch.setattr(tokenizer, "apply_chat_template", apply_returning)
    assert render_prompt(tokenizer, "Hi")["input_ids"].tolist() == [expected]


# batches, padding and the pad token


@pytest.mark.parametrize("style", STYLES)
def test_left_padding_keeps_ids(style):
    tokenizer = make_tiny_tokenizer(style)
    questions = ["Hi", "What is the capital of France?", "Why?"]
    alone = [render_prompt(tokenizer, question)["input_ids"][0].tolist() for question in questions]

    batch = render_prompt(tokenizer, questions)

    batch_size, max_len = batch["input_ids"].shape
    assert (batch_size, max_len) == (3, max(len(ids) for ids in alone))
    for row, ids in enumerate(alone):
        padding = max_len - len(ids)
        assert batch["input_ids"][row, padding:].tolist() == ids
        assert batch["input_ids"][row, :padding].tolist() == [tokenizer.pad_token_id] * padding
        assert batch["attention_mask"][row].tolist() == [0] * padding + [1] * len(ids)


def test_pad_token_from_eos(caplog):
    tokenizer = make_tiny_tokenizer("gemma", pad_token=False)
    alone = [render_prompt(tokenizer, question)["input_ids"][0].tolist() for question in ("Hi", "Why not?")]
    tokenizer.pad_token = None  # rendering one prompt already set it

    with caplog.at_level(logging.INFO, logger="experiments.prompts"):
        batch = render_prompt(tokenizer, ["Hi", "Why not?"])
        render_prompt(tokenizer, ["Hi", "Why not?"])

    assert tokenizer.pad_token_id == EOS
    assert len(tokenizer) == VOCAB_SIZE
    assert row_ids(batch, 0) == alone[0]
    assert row_ids(batch, 1) == alone[1]
    assert batch["input_ids"][0, 0].item() == EOS
    pad_messages = [record.getMessage() for record in caplog.records if "no pad token" in record.getMessage()]
    assert len(pad_messages) == 1
    assert "'<eos>' (id 2)" in pad_messages[0]


def test_no_pad_and_no_eos():
    tokenizer = make_tiny_tokenizer("plain")
    tokenizer.eos_token = None

    same_length = render_prompt(tokenizer, ["ab", "cd"])
    assert same_length["input_ids"].tolist() == [byte_ids("ab"), byte_ids("cd")]
    with pytest.raises(PromptError, match="neither a pad token nor an EOS token"):
        render_prompt(tokenizer, ["ab", "cde"])


def test_padded_batch_generates_like_single():
    # left padding plus the mask must give each row the output it gets alone
    model = make_tiny_model("llama")
    tokenizer = make_tiny_tokenizer("zephyr", add_bos=True)
    questions = ["Hi", "What is the capital of France?"]
    batch = render_prompt(tokenizer, questions)

    generated = model.generate(**batch, do_sample=False, max_new_tokens=5, min_new_tokens=5)
    for row, question in enumerate(questions):
        single = render_prompt(tokenizer, question)
        expected = model.generate(**single, do_sample=False, max_new_tokens=5, min_new_tokens=5)
        assert torch.equal(generated[row, -5:], expected[0, -5:])


# logging the rendered text


def test_log_text(caplog):
    tokenizer = make_tiny_tokenizer("chatml")
    with caplog.at_level(logging.INFO, logger="experiments.prompts"):
        render_prompt(tokenizer, ["Hi", "Why?"], log_text=True)

    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "rendered prompt 0 (21 tokens):\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "rendered prompt 1 (23 tokens):\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n",
    ]


def test_no_log_by_default(caplog):
    with caplog.at_level(logging.INFO, logger="experiments.prompts"):
        render_prompt(make_tiny_tokenizer("chatml"), "Hi")
    assert caplog.records == []


def test_prompt_text():
    tokenizer = make_tiny_tokenizer("zephyr", add_bos=True)
    text = prompt_text(tokenizer, "Hi", "Be brief.")
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


# errors


@pytest.mark.parametrize("empty", ["", "   \n"])
def test_empty_prompt_error(empty):
    with pytest.raises(PromptError) as error:
        render_prompt(make_tiny_tokenizer("chatml"), ["Hi", empty])
    assert f"prompt 1 is empty ({len(empty)} characters" in str(error.value)
    assert "remove it" in str(error.value)


def test_too_long_error():
    tokenizer = make_tiny_tokenizer("plain")
    assert render_prompt(tokenizer, ["abc", "abcd"], max_length=4)["input_ids"].shape == (2, 4)

    with pytest.raises(PromptError) as error:
        render_prompt(tokenizer, ["abc", "abcde"], max_length=4)
    message = str(error.value)
    assert "prompt 1 is 5 tokens long" in message
    assert "max_length=4" in message
    assert "shorten the prompt" in message


def test_too_long_counts_template():
    # the limit applies to the rendered ids, chat markers and BOS included
    tokenizer = make_tiny_tokenizer("chatml")
    length = len(chatml_ids(("user", "Hi")))
    render_prompt(tokenizer, "Hi", max_length=length)
    with pytest.raises(PromptError, match=f"prompt 0 is {length} tokens long"):
        render_prompt(tokenizer, "Hi", max_length=length - 1)


@pytest.mark.parametrize(
    "prompt_input, message",
    [
        ([], "no prompts to render"),
        (["Hi", 3], "prompt 1 must be a str, got int"),
    ],
)
def test_invalid_prompts(prompt_input, message):
    with pytest.raises(PromptError, match=message):
        render_prompt(make_tiny_tokenizer("chatml"), prompt_input)


def test_invalid_max_length():
    with pytest.raises(PromptError, match="max_length must be >= 1, got 0"):
        render_prompt(make_tiny_tokenizer("chatml"), "Hi", max_length=0)


def test_broken_template_error():
    tokenizer = make_tiny_tokenizer("chatml")
    tokenizer.chat_template = "{{ raise_exception('only assistant turns') }}"
    with pytest.raises(PromptError, match="failed on prompt 0 \\(2 characters\\): only assistant turns"):
        render_prompt(tokenizer, "Hi")


# real packaged models


@pytest.mark.slow
def test_smollm2_one_bos(smollm2):
    tokenizer = smollm2.tokenizer
    assert tokenizer.chat_template is not None
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.bos_token_id == BOS

    ids = render_prompt(tokenizer, "What is the capital of France?")["input_ids"][0].tolist()
    text = prompt_text(tokenizer, "What is the capital of France?")

    # the template's default system turn, the user turn and the generation prompt
    assert ids[0] == BOS
    assert ids[1] != BOS
    assert ids.count(BOS) == text.count("<|im_start|>") == 3
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    batch = render_prompt(tokenizer, "What is the capital of France?")

    output = model.generate(**batch, do_sample=False, max_new_tokens=20)
    answer = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_gemma3_plain_one_bos(gemma3_270m):
    tokenizer = gemma3_270m.tokenizer
    assert tokenizer.chat_template is None  # the base model's GGUF carries no template
    assert tokenizer.bos_token == "<bos>"

    ids = render_prompt(tokenizer, "The capital of France is")["input_ids"][0].tolist()
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids[1:] == tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
