"""The results file of an evaluation run: append one record at a time, resume, guard the config.

`results.jsonl` gets one JSON line per (item, mode). Each line is written with a
single `os.write` on a file opened with O_APPEND and then fsync'ed, so a finished
record survives a crash of the process and of the machine. Only the last line can
be cut short, when the process is killed inside the write. `load` drops such a
line and truncates the file to the last complete record. `run_config.json` stores the
result-relevant config of the first start, and a rerun in the same folder must
match it before any record is added.
"""

import json
import logging
import os
from pathlib import Path
from typing import Any

from experiments.schema import ConfigError

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
RUN_CONFIG_FILE = "run_config.json"


class ResultsFileError(ValueError):
    """A results file with a broken line that an interrupted write cannot explain."""


class ResultsWriteError(OSError):
    """Writing the results failed (disk full, permission denied, ...); earlier records are intact."""


class ResultsFile:
    """Append-only JSON Lines file of per-(item, mode) records."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def load(self) -> list[dict[str, Any]]:
        """Read the stored records, dropping (and truncating away) a last line cut short by a kill.

        Raises ResultsFileError for a broken line that ends with a newline: this
        program never writes one, so the file was changed by something else.
        """
        if not self.path.exists():
            return []
        data = self.path.read_bytes()

        # a complete record ends with a newline; text after the last newline was cut short
        complete, newline, tail = data.rpartition(b"\n")
        lines = complete.split(b"\n") if newline else []
        records = []
        for line_number, line in enumerate(lines, start=1):
            record = _parse_line(line)
            if record is None:
                raise ResultsFileError(
                    f"{self.path} line {line_number} is not a valid record; this program never writes "
                    "such a line, so move the file away or repair that line before resuming"
                )
            records.append(record)

        if tail:
            self._drop_tail(len(complete) + len(newline), len(data), len(lines) + 1)
        return records

    def _drop_tail(self, good_end: int, size: int, line_number: int) -> None:
        logger.warning(
            "%s: line %d was cut short by an interrupted write (%d bytes); removing it, the "
            "record will be computed again",
            self.path,
            line_number,
            size - good_end,
        )
        try:
            os.truncate(self.path, good_end)
        except OSError as error:
            raise ResultsWriteError(
                f"cannot remove the partial last line of {self.path}: {error.strerror}"
            ) from error

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a line and fsync it; on failure, cut the file back and raise ResultsWriteError."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = self._open()
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        except OSError as error:
            _truncate_quietly(fd, start)
            raise ResultsWriteError(
                f"writing a record to {self.path} failed: {error.strerror}; the {start} bytes "
                "written before are intact, so free space or fix permissions and rerun with the "
                "same hydra.run.dir to resume",
            ) from error

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as error:
                raise ResultsWriteError(
                    f"cannot open {self.path} for writing: {error.strerror}"
                ) from error
        return self._fd

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "id" in record and "mode" in record else None


def _truncate_quietly(fd: int, size: int) -> None:
    """Cut the file back to `size` after a failed write; a second failure is logged, not raised."""
    try:
        os.ftruncate(fd, size)
    except OSError as error:
        logger.error("could not remove a partly written record (%s); the last line may be broken", error)


def check_run_config(run_dir: Path, relevant: dict[str, Any], has_records: bool) -> None:
    """Store `relevant` in run_config.json while there are no records; once there are, require it to match.

    Raises ConfigError listing every differing key with its stored and new value.
    """
    path = run_dir / RUN_CONFIG_FILE
    if not has_records:
        write_json_atomic(path, relevant)
        return
    if not path.exists():
        raise ConfigError(
            f"{run_dir / RESULTS_FILE} has records but {RUN_CONFIG_FILE} is missing, so the "
            "config they were made with is unknown; use a new hydra.run.dir"
        )

    stored = json.loads(path.read_text(encoding="utf-8"))
    differences = diff_configs(stored, relevant)
    if differences:
        shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences)
        raise ConfigError(
            f"the results in {run_dir} were made with a different config ({shown}); rerun with the "
            "stored values to resume, or choose a new hydra.run.dir"
        )


def diff_configs(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Return (dotted key, old value, new value) for every leaf that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        differences = []
        for key in sorted(set(old) | set(new), key=str):
            dotted = f"{prefix}.{key}" if prefix else str(key)
            differences += diff_configs(old.get(key, "<absent>"), new.get(key, "<absent>"), dotted)
        return differences
    return [] if old == new else [(prefix, old, new)]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON through a temporary file and a rename, so readers never see half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)
