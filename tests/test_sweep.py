"""`-m` sweeps: one folder and W&B run per job, the comparison in the sweep folder, failing jobs reported."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli_helpers import run_cli, save_tiny_model, tiny_overrides
from experiments.sweep import collect_jobs, format_comparison

WANDB = str(Path(sys.executable).parent / "wandb")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def sweep_overrides(tiny_dir: Path, sweep_dir: Path, *extra: str) -> list[str]:
    return [
        "-m",
        *tiny_overrides(tiny_dir, "modes=[greedy,speculative]", "dataset.limit=1", "generation.max_new_tokens=4"),
        f"hydra.sweep.dir={sweep_dir}",
        *extra,
    ]


def run_record(job_dir: Path) -> dict:
    output = subprocess.run(
        [WANDB, "leet", "inspect", "--json", str(job_dir / "wandb")], capture_output=True, text=True, timeout=120
    ).stdout
    return next(json.loads(line)["run"] for line in output.splitlines() if '"type":"run"' in line)


def test_basic_launcher_sweep_writes_comparison(tiny_dir, tmp_path):
    result = run_cli(
        "evaluate.py",
        sweep_overrides(tiny_dir, tmp_path, "speculative.k=1,2", "speculative.temperature=0,0.7", "wandb.mode=offline"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr

    # four jobs, each with its own folder, results and W&B run in one group
    swept = [
        ["speculative.k=1", "speculative.temperature=0"], ["speculative.k=1", "speculative.temperature=0.7"],
        ["speculative.k=2", "speculative.temperature=0"], ["speculative.k=2", "speculative.temperature=0.7"],
    ]
    groups = set()
    for number, overrides in enumerate(swept):
        job_dir = tmp_path / str(number)
        assert yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())[-3:-1] == overrides
        assert json.loads((job_dir / "summary.json").read_text())["modes"]["speculative"]["n"] == 1
        run = run_record(job_dir)
        assert run["job_type"] == "evaluate"
        groups.add(run["run_group"])
    assert groups == {f"{tmp_path.parent.name}_{tmp_path.name}"}

    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert [(row["job"], row["mode"], row["overrides"]) for row in comparison["rows"]] == [
        (number, mode, " ".join(overrides)) for number, overrides in enumerate(swept) for mode in ("greedy", "speculative")
    ]
    speculative = [row for row in comparison["rows"] if row["mode"] == "speculative"]
    assert [(row["k"], row["temperature"]) for row in speculative] == [(1, 0.0), (1, 0.7), (2, 0.0), (2, 0.7)]
    # the target is its own draft, so greedy verification accepts every draft token
    assert [row["acceptance_rate"] for row in speculative if row["temperature"] == 0.0] == [1.0, 1.0]

    markdown = (tmp_path / "comparison.md").read_text()
    assert "| job | overrides | mode | n | accuracy ± SE | acceptance | mean accepted length | tokens/s | speed vs greedy |" in markdown
    assert "| 3 | speculative.k=2 speculative.temperature=0.7 | speculative | 1 |" in markdown
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert f"sweep comparison: {tmp_path / 'comparison.md'}" in result.stdout


def test_failing_job_is_reported_and_others_complete(tiny_dir, tmp_path):
    result = run_cli("evaluate.py", sweep_overrides(tiny_dir, tmp_path, "speculative.k=0,2", "wandb.mode=disabled"))
    assert result.returncode == 1

    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2
    assert errors[0].startswith("error: sweep job 0 (")
    assert errors[0].endswith("speculative.k=0 wandb.mode=disabled): speculative.k must be >= 1, got 0 (set speculative.k)")
    assert errors[1] == f"error: 1 of 2 sweep jobs did not finish (1 finished); see {tmp_path / 'comparison.md'}"

    failure = json.loads((tmp_path / "0" / "failure.json").read_text())
    assert failure["error"] == "speculative.k must be >= 1, got 0 (set speculative.k)"
    assert failure["type"] == "ConfigError"
    assert "evaluate failed: speculative.k must be >= 1, got 0" in (tmp_path / "0" / "evaluate.log").read_text()
    assert json.loads((tmp_path / "1" / "summary.json").read_text())["modes"]["speculative"]["n"] == 1
    assert "| 0 | speculative.k=0 | failed: speculative.k must be >= 1, got 0 (set speculative.k) |" in (
        tmp_path / "comparison.md"
    ).read_text()


def test_joblib_launcher_sweep(tiny_dir, tmp_path):
    result = run_cli(
        "evaluate.py",
        sweep_overrides(tiny_dir, tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "speculative.k=1,2",
                        "wandb.mode=disabled"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    jobs = collect_jobs(tmp_path)
    assert [(job["job"], job["status"], job["settings"]["k"]) for job in jobs] == [(0, "finished", 1), (1, "finished", 2)]
    assert (tmp_path / "comparison.md").exists()


def test_comparison_lists_unfinished_jobs(tmp_path):
    for number, overrides in enumerate([["speculative.k=1"], ["speculative.k=2"]]):
        (tmp_path / str(number) / ".hydra").mkdir(parents=True)
        (tmp_path / str(number) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    summary = {
        "modes": {"speculative": {"n": 3, "accuracy": 1 / 3, "accuracy_se": 0.272, "acceptance_rate": 0.5,
                                  "mean_accepted_length": 2.0, "tokens_per_s": 10.0, "speed_vs_greedy": None}},
        "config": {"speculative": {"k": 1, "temperature": 0.0, "drafter": "model"}},
    }
    (tmp_path / "0" / "summary.json").write_text(json.dumps(summary))

    jobs = collect_jobs(tmp_path)
    assert [job["status"] for job in jobs] == ["finished", "unfinished"]
    assert format_comparison(jobs).splitlines()[2:] == [
        "| 0 | speculative.k=1 | speculative | 3 | 0.333 ± 0.272 | 0.500 | 2.00 | 10.0 | - |",
        "| 1 | speculative.k=2 | unfinished: no summary.json or failure.json (killed, or still running) | | | | | | |",
    ]
