"""Loading of QA datasets: a JSON list or JSON Lines of `{"question", "answer"}` records.

Each record is an object with a non-empty string `question` and its accepted
answers under `answer` (or `answers`): one string or a non-empty list of strings.
An optional `id` (string or integer) names the item in the results; without one,
the item is named by its 1-based position in the file (the line number for JSON
Lines, the list index plus one for a JSON list).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_RECORD_HINT = 'expected {"question": str, "answer": [str, ...]}'


class DatasetError(ValueError):
    """A dataset file that is missing or malformed; the message names the file, the place and the fix."""


@dataclass(frozen=True)
class QAItem:
    """One question with its accepted answers."""

    id: str
    question: str
    answers: tuple[str, ...]


def resolve_dataset_path(path: str | Path) -> Path:
    """Return the absolute dataset path.

    A relative path is looked up in the current directory first, then in the
    project root, so the shipped `datasets/...` defaults work from any directory.
    """
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate.resolve()
    in_project = PROJECT_ROOT / candidate
    if in_project.exists():
        return in_project
    return candidate.resolve()


def load_dataset(path: str | Path, limit: int | None = None) -> list[QAItem]:
    """Load the QA items of `path` (JSON list or JSON Lines), keeping the first `limit` when set.

    Raises DatasetError for a missing, empty or malformed file, naming the line or
    record at fault.
    """
    file = resolve_dataset_path(path)
    text = _read_text(file)
    if text.lstrip().startswith("["):
        located = _parse_json_list(file, text)
    else:
        located = _parse_json_lines(file, text)
    if not located:
        raise DatasetError(f"dataset {file} contains no records ({_RECORD_HINT})")

    items = _build_items(file, located)
    if limit is not None and limit < len(items):
        items = items[:limit]
    logger.info("loaded %d questions from %s", len(items), file)
    return items


def _read_text(file: Path) -> str:
    if not file.exists():
        raise DatasetError(f"dataset file not found: {file} (set dataset.path to an existing .json or .jsonl file)")
    if file.is_dir():
        raise DatasetError(f"dataset path {file} is a folder; set dataset.path to a .json or .jsonl file")
    try:
        # utf-8-sig drops the byte order mark that some editors put at the start of a file
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(f"dataset {file} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise DatasetError(f"cannot read dataset {file}: {error.strerror}") from error
    if not text.strip():
        raise DatasetError(f"dataset {file} is empty ({_RECORD_HINT}, as a JSON list or one per line)")
    return text


def _parse_json_list(file: Path, text: str) -> list[tuple[str, Any]]:
    """Return (place, record) pairs of a JSON list; place reads "record N"."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"dataset {file} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from error
    if not isinstance(records, list):
        raise DatasetError(f"dataset {file} must be a JSON list of records or JSON Lines, got a JSON {_type_name(records)}")
    return [(f"record {index}", record) for index, record in enumerate(records, start=1)]


def _parse_json_lines(file: Path, text: str) -> list[tuple[str, Any]]:
    """Return (place, record) pairs of JSON Lines, skipping blank lines; place reads "line N"."""
    located = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(
                f"dataset {file} line {line_number} is not valid JSON: {error.msg} at column {error.colno}"
            ) from error
        located.append((f"line {line_number}", record))
    return located


def _build_items(file: Path, located: list[tuple[str, Any]]) -> list[QAItem]:
    items = []
    first_place_of_id: dict[str, str] = {}
    for place, record in located:
        item = _parse_record(file, place, record, default_id=place.split()[-1])
        if item.id in first_place_of_id:
            raise DatasetError(
                f"dataset {file} {place}: duplicate id {item.id!r} (first used at {first_place_of_id[item.id]}); "
                "give every record a unique id"
            )
        first_place_of_id[item.id] = place
        items.append(item)
    return items


def _parse_record(file: Path, place: str, record: Any, default_id: str) -> QAItem:
    where = f"dataset {file} {place}"
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got a JSON {_type_name(record)} ({_RECORD_HINT})")

    # question
    if "question" not in record:
        raise DatasetError(f'{where}: record has no "question" field ({_RECORD_HINT})')
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f'{where}: "question" must be a non-empty string, got {question!r}')

    # accepted answers
    if "answer" in record and "answers" in record:
        raise DatasetError(f'{where}: record has both "answer" and "answers"; keep one of them')
    key = "answer" if "answer" in record else "answers"
    if key not in record:
        raise DatasetError(f'{where}: record has no "answer" field ({_RECORD_HINT})')
    answers = _parse_answers(where, key, record[key])

    # id
    item_id = record.get("id", default_id)
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id) == "":
        raise DatasetError(f'{where}: "id" must be a non-empty string or an integer, got {item_id!r}')
    return QAItem(id=str(item_id), question=question, answers=answers)


def _parse_answers(where: str, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise DatasetError(f'{where}: "{key}" must be a string or a list of strings, got a JSON {_type_name(value)} {value!r}')
    if not value:
        raise DatasetError(f'{where}: "{key}" is an empty list; give at least one accepted answer')
    for answer in value:
        if not isinstance(answer, str):
            raise DatasetError(f'{where}: every entry of "{key}" must be a string, got {answer!r}')
        if not answer.strip():
            raise DatasetError(f'{where}: "{key}" contains an empty answer; remove it')
    return tuple(value)


def _type_name(value: Any) -> str:
    """Return the JSON name of a decoded value's type."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
