"""Dataset loading: the shipped files, both formats, and every malformed case with its message."""

import json
from pathlib import Path

import pytest

from experiments.data import DatasetError, QAItem, load_dataset

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NBSP = "\u00a0"


def test_qa30_has_30_unique_items():
    items = load_dataset(PROJECT_ROOT / "datasets" / "qa_dataset.json")
    assert len(items) == 30
    assert len({item.id for item in items}) == 30
    assert items[0] == QAItem(id="capital-france", question="What is the capital of France?", answers=("Paris",))
    assert all(item.answers for item in items)


def test_nq_open_subset_keeps_ids_and_nbsp_answers():
    items = load_dataset(PROJECT_ROOT / "datasets" / "nq_open_subset.jsonl")
    assert len(items) == 200
    assert [item.id for item in items[:3]] == ["1", "2", "3"]
    assert items[0].question == "when was the last time anyone was on the moon"
    assert items[0].answers == ("14 December 1972 UTC", "December 1972")
    assert any(NBSP in answer for item in items for answer in item.answers)


def test_datasets_folder_is_not_a_package():
    assert not (PROJECT_ROOT / "datasets" / "__init__.py").exists()


def test_json_list_and_jsonl_load_the_same_items(tmp_path):
    records = [
        {"question": "Capital of Peru?", "answer": ["Lima"]},
        {"question": "Capital of Chile?", "answer": ["Santiago", "Santiago de Chile"]},
    ]
    list_file = tmp_path / "list.json"
    list_file.write_text(json.dumps(records, indent=2))
    lines_file = tmp_path / "lines.jsonl"
    lines_file.write_text("".join(json.dumps(record) + "\n" for record in records) + "\n")

    expected = [
        QAItem(id="1", question="Capital of Peru?", answers=("Lima",)),
        QAItem(id="2", question="Capital of Chile?", answers=("Santiago", "Santiago de Chile")),
    ]
    assert load_dataset(list_file) == expected
    assert load_dataset(lines_file) == expected


def test_answers_key_string_answer_and_ids(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text(
        '{"id": 7, "question": "Largest ocean?", "answers": ["Pacific"]}\n'
        "\n"
        '{"id": "x", "question": "Red planet?", "answer": "Mars"}\n'
    )
    assert load_dataset(file) == [
        QAItem(id="7", question="Largest ocean?", answers=("Pacific",)),
        QAItem(id="x", question="Red planet?", answers=("Mars",)),
    ]


def test_blank_lines_keep_line_numbers_as_ids(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text('\n{"question": "q", "answer": ["a"]}\n')
    assert [item.id for item in load_dataset(file)] == ["2"]


def test_limit_keeps_the_first_items():
    items = load_dataset(PROJECT_ROOT / "datasets" / "qa_dataset.json", limit=3)
    assert [item.id for item in items] == ["capital-france", "capital-japan", "capital-italy"]


def test_relative_path_falls_back_to_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset("datasets/qa_dataset.json")) == 30


def test_relative_path_prefers_current_directory(tmp_path, monkeypatch):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "qa_dataset.json").write_text('[{"question": "q", "answer": ["a"]}]')
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset("datasets/qa_dataset.json")) == 1


MALFORMED = [
    ("empty", "", "dataset {file} is empty (expected {{\"question\": str, \"answer\": [str, ...]}}, as a JSON list or one per line)"),
    ("blank", "\n  \n", "dataset {file} is empty (expected {{\"question\": str, \"answer\": [str, ...]}}, as a JSON list or one per line)"),
    ("not_json", "hello world\n", "dataset {file} line 1 is not valid JSON: Expecting value at column 1"),
    ("broken_list", '[{"question": "q", "answer": ["a"]},\n {"question": }]',
     "dataset {file} is not valid JSON: Expecting value at line 2 column 15"),
    ("broken_line", '{"question": "q", "answer": ["a"]}\n{"question": "r", "answer": ["b"\n',
     "dataset {file} line 2 is not valid JSON: Expecting ',' delimiter at column 33"),
    ("empty_list", "[]", 'dataset {file} contains no records (expected {{"question": str, "answer": [str, ...]}})'),
    ("top_level_object", '{"data": []}\n',
     'dataset {file} line 1: record has no "question" field (expected {{"question": str, "answer": [str, ...]}})'),
    ("list_of_lists", "[[1, 2]]",
     'dataset {file} record 1: expected a JSON object, got a JSON array (expected {{"question": str, "answer": [str, ...]}})'),
    ("no_question", '{"answer": ["a"]}\n',
     'dataset {file} line 1: record has no "question" field (expected {{"question": str, "answer": [str, ...]}})'),
    ("empty_question", '{"question": "  ", "answer": ["a"]}\n',
     "dataset {file} line 1: \"question\" must be a non-empty string, got '  '"),
    ("question_not_string", '{"question": 3, "answer": ["a"]}\n',
     'dataset {file} line 1: "question" must be a non-empty string, got 3'),
    ("no_answer", '{"question": "q"}\n',
     'dataset {file} line 1: record has no "answer" field (expected {{"question": str, "answer": [str, ...]}})'),
    ("answer_number", '{"question": "q", "answer": 5}\n',
     'dataset {file} line 1: "answer" must be a string or a list of strings, got a JSON number 5'),
    ("answer_object", '[{"question": "q", "answer": {"text": "a"}}]',
     "dataset {file} record 1: \"answer\" must be a string or a list of strings, got a JSON object {{'text': 'a'}}"),
    ("answer_list_with_number", '{"question": "q", "answer": ["a", 2]}\n',
     'dataset {file} line 1: every entry of "answer" must be a string, got 2'),
    ("empty_answer_list", '{"question": "q", "answer": []}\n',
     'dataset {file} line 1: "answer" is an empty list; give at least one accepted answer'),
    ("blank_answer", '{"question": "q", "answers": ["a", " "]}\n',
     'dataset {file} line 1: "answers" contains an empty answer; remove it'),
    ("both_answer_keys", '{"question": "q", "answer": ["a"], "answers": ["b"]}\n',
     'dataset {file} line 1: record has both "answer" and "answers"; keep one of them'),
    ("duplicate_ids", '{"id": "a", "question": "q", "answer": ["x"]}\n{"id": "a", "question": "r", "answer": ["y"]}\n',
     "dataset {file} line 2: duplicate id 'a' (first used at line 1); give every record a unique id"),
    ("bad_id", '{"id": true, "question": "q", "answer": ["x"]}\n',
     'dataset {file} line 1: "id" must be a non-empty string or an integer, got True'),
]


@pytest.mark.parametrize(("name", "content", "message"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_dataset_message(tmp_path, name, content, message):
    file = tmp_path / f"{name}.jsonl"
    file.write_text(content)
    with pytest.raises(DatasetError) as raised:
        load_dataset(file)
    assert str(raised.value) == message.format(file=file)


def test_missing_file_message(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DatasetError) as raised:
        load_dataset(missing)
    assert str(raised.value) == f"dataset file not found: {missing} (set dataset.path to an existing .json or .jsonl file)"


def test_folder_instead_of_file_message(tmp_path):
    with pytest.raises(DatasetError) as raised:
        load_dataset(tmp_path)
    assert str(raised.value) == f"dataset path {tmp_path} is a folder; set dataset.path to a .json or .jsonl file"


def test_non_utf8_file_message(tmp_path):
    file = tmp_path / "latin1.jsonl"
    file.write_bytes('{"question": "caf\u00e9?", "answer": ["a"]}\n'.encode("latin-1"))
    with pytest.raises(DatasetError) as raised:
        load_dataset(file)
    assert str(raised.value) == f"dataset {file} is not UTF-8 text (invalid continuation byte at byte 17)"
