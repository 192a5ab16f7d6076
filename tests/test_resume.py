"""Kill, interrupt and resume evaluate.py through the real CLI.

A run killed with SIGKILL (during generation, or inside the write of a record)
and rerun with the same hydra.run.dir must hold every (item, mode) pair exactly
once and equal an uninterrupted run outside wall times. SIGINT must stop after
the last finished record, finish the W&B run and print the command that resumes.
A rerun whose result-relevant config differs must be rejected.
"""

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import run_cli, start_cli, stderr_lines, tiny_overrides
from hardening_helpers import fault_env, mask_wall_times, read_records, shared_tiny_dir, untimed_summary

WANDB = str(Path(sys.executable).parent / "wandb")
ITEMS, MODES = 3, 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return shared_tiny_dir(tmp_path_factory)


def overrides(tiny_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    # Sampling at temperature 0.7 makes the comparison depend on per-item seeding, not on run
    # order. k is fixed because k=auto chooses k from timings measured in each run.
    return [
        *tiny_overrides(tiny_dir, f"dataset.limit={ITEMS}", "generation.max_new_tokens=12",
                        "speculative.temperature=0.7", "speculative.k=4", "wandb.mode=disabled"),
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory) -> Path:
    """An uninterrupted run that the resumed runs must equal."""
    run_dir = tmp_path_factory.mktemp("resume") / "reference"
    result = run_cli("evaluate.py", overrides(tiny_dir, run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir


def wait_for_records(path: Path, count: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {count} records: {process.stderr.read()}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no {count} records in {path} after {timeout} s")


def assert_complete_and_equal(run_dir: Path, reference: Path) -> None:
    data = (run_dir / "results.jsonl").read_bytes()
    assert data.endswith(b"\n")
    records = read_records(run_dir)
    assert len(records) == ITEMS * MODES
    assert len({(record["id"], record["mode"]) for record in records}) == ITEMS * MODES

    # resumed records are appended after the saved ones, so compare in (mode, id) order
    def ordered(path: Path) -> list[bytes]:
        lines = mask_wall_times(path.read_bytes()).splitlines()
        return sorted(lines, key=lambda line: (json.loads(line)["mode"], json.loads(line)["id"]))

    assert ordered(run_dir / "results.jsonl") == ordered(reference / "results.jsonl")
    assert untimed_summary(run_dir)["modes"] == untimed_summary(reference)["modes"]


def test_sigkill_during_generation_then_resume(tiny_dir, reference, tmp_path):
    run_dir = tmp_path / "killed"
    process = start_cli("evaluate.py", overrides(tiny_dir, run_dir))
    wait_for_records(run_dir / "results.jsonl", 2, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    saved = (run_dir / "results.jsonl").read_bytes().count(b"\n")
    assert 2 <= saved < ITEMS * MODES

    resumed = run_cli("evaluate.py", overrides(tiny_dir, run_dir))
    assert resumed.returncode == 0, resumed.stderr
    log = (run_dir / "evaluate.log").read_text()
    assert f"{saved} of {ITEMS * MODES} (item, mode) pairs are already in results.jsonl and are skipped" in log
    assert_complete_and_equal(run_dir, reference)


def test_sigkill_inside_a_write_then_resume(tiny_dir, reference, tmp_path):
    run_dir = tmp_path / "killed"
    # the 4th record is half written when the process dies
    killed = run_cli("evaluate.py", overrides(tiny_dir, run_dir), **fault_env(tmp_path / "faults", KILL_AT=4))
    assert killed.returncode == -signal.SIGKILL
    data = (run_dir / "results.jsonl").read_bytes()
    assert data.count(b"\n") == 3
    assert not data.endswith(b"\n")

    resumed = run_cli("evaluate.py", overrides(tiny_dir, run_dir))
    assert resumed.returncode == 0, resumed.stderr
    log = (run_dir / "evaluate.log").read_text()
    assert "results.jsonl: line 4 was cut short by an interrupted write" in log
    assert f"3 of {ITEMS * MODES} (item, mode) pairs are already in results.jsonl and are skipped" in log
    assert_complete_and_equal(run_dir, reference)


def test_sigint_finishes_wandb_and_prints_resume_command(tiny_dir, reference, tmp_path):
    run_dir = tmp_path / "interrupted"
    process = start_cli("evaluate.py", overrides(tiny_dir, run_dir, "wandb.mode=offline"))
    wait_for_records(run_dir / "results.jsonl", 1, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130

    # one line on stderr, no traceback, every saved line complete
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    printed = stderr_lines(result)
    assert len(printed) == 1, stderr
    assert "Traceback" not in stderr
    data = (run_dir / "results.jsonl").read_bytes()
    assert data.endswith(b"\n")
    saved = len(read_records(run_dir))
    records = "record is" if saved == 1 else "records are"
    prefix = f"interrupted: {saved} {records} saved in {run_dir / 'results.jsonl'}; resume with: "
    assert printed[0].startswith(prefix)

    # the offline W&B run was finished with the interrupt's exit status
    inspect = subprocess.run(
        [WANDB, "leet", "inspect", "--summary", "--json", str(run_dir / "wandb")],
        capture_output=True, text=True, timeout=120,
    )
    assert json.loads(inspect.stdout)["exit_code"] == 130

    # the printed command resumes the run
    command = shlex.split(printed[0][len(prefix):])
    assert command[:2] == ["python", "evaluate.py"]
    assert f"hydra.run.dir={run_dir}" in command
    resumed = run_cli(command[1], command[2:])
    assert resumed.returncode == 0, resumed.stderr
    log = (run_dir / "evaluate.log").read_text()
    assert f"{saved} of {ITEMS * MODES} (item, mode) pairs are already in results.jsonl and are skipped" in log
    assert_complete_and_equal(run_dir, reference)


def test_changed_config_is_rejected(tiny_dir, reference, tmp_path):
    run_dir = tmp_path / "rerun"
    shutil.copytree(reference, run_dir)
    before = (run_dir / "results.jsonl").read_bytes()

    changed = run_cli("evaluate.py", overrides(tiny_dir, run_dir, "speculative.k=2", "seed=1", "beam.num_beams=3"))
    assert changed.returncode == 1
    assert stderr_lines(changed) == [
        f"error: the results in {run_dir} were made with a different config (beam.num_beams: 2 -> 3; seed: 0 -> 1; "
        "speculative.k: 4 -> 2); rerun with the stored values to resume, or choose a new hydra.run.dir"
    ]
    assert (run_dir / "results.jsonl").read_bytes() == before


def test_result_neutral_changes_are_accepted(tiny_dir, reference, tmp_path):
    run_dir = tmp_path / "rerun"
    shutil.copytree(reference, run_dir)
    before = (run_dir / "results.jsonl").read_bytes()

    # which modes run, how many items, W&B and debug settings leave the stored records valid
    rerun = run_cli("evaluate.py", overrides(tiny_dir, run_dir, "modes=[beam]", "dataset.limit=2",
                                             "debug.render_input_text=true"))
    assert rerun.returncode == 0, rerun.stderr
    assert "2 of 2 (item, mode) pairs are already in results.jsonl and are skipped" in (
        run_dir / "evaluate.log"
    ).read_text()
    assert (run_dir / "results.jsonl").read_bytes() == before
