"""Helpers for the hardening tests: shared tiny model folders, fault injection and wall-time masking.

The tiny folders are saved once per pytest session under the session's base
temporary folder, so every hardening test module reuses them.

Fault injection works inside the real CLI process: `fault_env` puts a
`sitecustomize.py` on PYTHONPATH that wraps `os.write` for files named
results.jsonl. Python imports `sitecustomize` at start-up, before evaluate.py runs.
"""

import json
import re
from pathlib import Path

from cli_helpers import save_tiny_model
from tiny import make_tiny_model
from tiny_tokenizers import make_tiny_tokenizer

# Stats and summary keys measured with the wall clock: every key ending in "_s"
# (wall_time_s, tokens_per_s, ...), the decoders' tokens_per_second and the
# speed ratio to greedy. Everything else in a record must repeat exactly.
WALL_TIME_KEY = re.compile(r'"(?P<key>[a-z_]*_s|tokens_per_second|speed_vs_greedy)": (?P<value>-?[0-9.eE+-]+|null)')

# The wrapper installed by `fault_env`. SPECQA_FAULT_FAIL_AT=N: the N-th write of a
# record writes half of it and the next write call raises ENOSPC, like a disk
# that fills up mid-record. SPECQA_FAULT_KILL_AT=N: the N-th write writes half of
# the record and the process sends itself SIGKILL.
_SITECUSTOMIZE = '''
import errno
import os
import signal

_real_write = os.write
_fail_at = int(os.environ.get("SPECQA_FAULT_FAIL_AT", "0"))
_kill_at = int(os.environ.get("SPECQA_FAULT_KILL_AT", "0"))
_state = {"records": 0, "failing": False}


def _is_results_file(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith("results.jsonl")
    except OSError:
        return False


def _faulty_write(fd, data):
    if not _is_results_file(fd):
        return _real_write(fd, data)
    if _state["failing"]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    _state["records"] += 1
    if _state["records"] == _kill_at:
        _real_write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    if _state["records"] == _fail_at:
        _state["failing"] = True
        return _real_write(fd, data[: len(data) // 2])
    return _real_write(fd, data)


os.write = _faulty_write
'''


def shared_tiny_dir(tmp_path_factory, name: str = "llama", tokenizer_style: str = "chatml") -> Path:
    """Return a tiny model folder saved once per session: the tiny Llama with a `tokenizer_style` tokenizer.

    "llama" is the folder of `cli_helpers.save_tiny_model`. Any other name gets the
    same random Llama with a tokenizer of `tokenizer_style`, whose vocabulary
    differs from ChatML's in its special tokens.
    """
    folder = tmp_path_factory.getbasetemp() / "hardening-models" / name
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    if name == "llama":
        return save_tiny_model(folder)
    make_tiny_model("llama").save_pretrained(folder)
    make_tiny_tokenizer(tokenizer_style).save_pretrained(folder)
    return folder


def fault_env(folder: Path, **faults: int) -> dict[str, str]:
    """Write the fault-injecting sitecustomize.py into `folder` and return the environment that loads it.

    `faults` are FAIL_AT and KILL_AT counts (see `_SITECUSTOMIZE`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")
    env = {"PYTHONPATH": str(folder)}
    for name, count in faults.items():
        env[f"SPECQA_FAULT_{name}"] = str(count)
    return env


def mask_wall_times(data: bytes) -> bytes:
    """Replace the value of every wall-clock key in JSON text by 0, keeping every other byte."""
    return WALL_TIME_KEY.sub(lambda match: f'"{match["key"]}": 0', data.decode("utf-8")).encode("utf-8")


def read_records(run_dir: Path) -> list[dict]:
    """Parse results.jsonl of `run_dir`, one record per line."""
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def untimed_summary(run_dir: Path) -> dict:
    """Return summary.json of `run_dir` with every wall-clock value set to 0."""
    return json.loads(mask_wall_times((run_dir / "summary.json").read_bytes()))
