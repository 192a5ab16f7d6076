"""Failures of the parts around an evaluation, through the real CLI.

- W&B online with a key but an unreachable service: one warning, complete local results.
  The service address is a closed loopback port, so nothing leaves the machine.
- A write error on results.jsonl (ENOSPC injected into the CLI process's `os.write`):
  one error line, the records before it intact, and a rerun completes the run.
- Two runs started with the same timestamp get different folders.
- One failing job of a `-m` sweep is reported in its own log; the other jobs finish.
"""

import json
from pathlib import Path

import pytest
import yaml

from cli_helpers import CONFIG_DIR, run_cli, start_cli, stderr_lines, tiny_overrides
from hardening_helpers import fault_env, read_records, shared_tiny_dir

# port 9 (discard) on loopback: nothing listens there, so every connection is refused
UNREACHABLE_WANDB = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return shared_tiny_dir(tmp_path_factory)


def quick(tiny_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(tiny_dir, "modes=[greedy,speculative]", "wandb.mode=disabled"),
            f"hydra.run.dir={run_dir}", *extra]


def test_wandb_service_unreachable_is_one_warning(tiny_dir, tmp_path):
    result = run_cli(
        "evaluate.py",
        quick(tiny_dir, tmp_path, "wandb.mode=online"),
        WANDB_API_KEY="x" * 40, WANDB_BASE_URL=UNREACHABLE_WANDB, WANDB_INIT_TIMEOUT="3",
    )
    assert result.returncode == 0, result.stderr
    assert stderr_lines(result) == []
    # the busy-CPU warning depends on what else runs on the machine, so it is left out
    warnings = [line for line in result.stdout.splitlines() if "[WARNING]" in line and "load average" not in line]
    assert len(warnings) == 1, warnings
    assert "W&B failed to start (CommError: " in warnings[0]
    assert f"W&B logging is off for this run, the local results in {tmp_path} are complete" in warnings[0]

    assert len(read_records(tmp_path)) == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(mode, metrics["n"]) for mode, metrics in summary["modes"].items()] == [("greedy", 2), ("speculative", 2)]
    assert (tmp_path / "report.md").exists()


def test_write_error_keeps_earlier_records(tiny_dir, tmp_path):
    run_dir = tmp_path / "run"
    # the 3rd record is half written when the disk fills up
    failed = run_cli("evaluate.py", quick(tiny_dir, run_dir), **fault_env(tmp_path / "faults", FAIL_AT=3))
    results = run_dir / "results.jsonl"
    assert failed.returncode == 1
    intact = results.read_bytes()
    assert stderr_lines(failed) == [
        f"error: writing a record to {results} failed: No space left on device; the {len(intact)} bytes written "
        "before are intact, so free space or fix permissions and rerun with the same hydra.run.dir to resume"
    ]
    assert "Traceback" not in failed.stderr
    # the half-written third record was cut away
    assert intact.count(b"\n") == 2
    assert intact.endswith(b"\n")
    assert [(record["mode"], record["id"]) for record in read_records(run_dir)] == [
        ("greedy", "capital-france"), ("greedy", "capital-japan"),
    ]
    assert not (run_dir / "summary.json").exists()

    # with space again, the rerun adds the missing records after the intact ones
    resumed = run_cli("evaluate.py", quick(tiny_dir, run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert results.read_bytes().startswith(intact)
    assert [(record["mode"], record["id"]) for record in read_records(run_dir)][2:] == [
        ("speculative", "capital-france"), ("speculative", "capital-japan"),
    ]


def test_runs_in_the_same_second_get_different_folders(tiny_dir, tmp_path):
    # The default folder is <date>/<time>-<random suffix>. Here both runs get the same date and time.
    default = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())["hydra"]["run"]["dir"]
    assert default.endswith("${now:%H-%M-%S}-${specqa_unique:}")
    same_second = f"hydra.run.dir={tmp_path}/2030-01-01/12-00-00-${{specqa_unique:}}"
    overrides = [*tiny_overrides(tiny_dir, "modes=[greedy]", "dataset.limit=1", "wandb.mode=disabled"), same_second]

    processes = [start_cli("evaluate.py", overrides) for _ in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr

    folders = sorted((tmp_path / "2030-01-01").iterdir())
    assert len(folders) == 2
    for folder in folders:
        assert folder.name.startswith("12-00-00-")
        assert len(read_records(folder)) == 1


def test_failing_sweep_job_is_reported_and_others_finish(tiny_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    sweep = [
        "-m",
        *tiny_overrides(tiny_dir, "modes=[greedy]", "dataset.limit=1", "wandb.mode=disabled"),
        f"model.name_or_path={tiny_dir},{broken},{tiny_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    result = run_cli("evaluate.py", sweep)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr

    # the failing middle job: one error line, its log has the error and the traceback
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr
    assert errors[0].startswith("error: sweep job 1 (")
    assert f"transformers could not load folder '{broken}'" in errors[0]
    assert errors[1] == f"error: 1 of 3 sweep jobs did not finish (2 finished); see {sweep_dir / 'comparison.md'}"
    log = (sweep_dir / "1" / "evaluate.log").read_text()
    assert f"evaluate failed: model '{broken}': transformers could not load folder '{broken}'" in log
    assert "Traceback (most recent call last):" in log
    failure = json.loads((sweep_dir / "1" / "failure.json").read_text())
    assert failure["type"] == "ModelLoadError"

    # the jobs before and after it finished
    for job in ("0", "2"):
        summary = json.loads((sweep_dir / job / "summary.json").read_text())
        assert summary["modes"]["greedy"]["n"] == 1
    assert not (sweep_dir / "1" / "summary.json").exists()
    comparison = (sweep_dir / "comparison.md").read_text()
    assert f"| 1 | model.name_or_path={broken} | failed: " in comparison
