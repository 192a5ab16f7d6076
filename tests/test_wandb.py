"""W&B logging: an offline run read back with `wandb leet inspect`, and failures that cost nothing local."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import compose_config, run_cli, save_tiny_model, tiny_overrides
from experiments.evaluation import evaluate
from experiments.wandb_logging import WandbLogger

WANDB = str(Path(sys.executable).parent / "wandb")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def leet(*args: str) -> str:
    result = subprocess.run([WANDB, "leet", "inspect", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_offline_run_reads_back(tiny_dir, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_dir, "modes=[greedy,speculative]", "wandb.mode=offline"))
    result = evaluate(cfg, tmp_path)

    # the run is written inside the run folder
    run_folders = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_folders) == 1

    summary = json.loads(leet("--summary", "--json", str(tmp_path / "wandb")))
    assert summary["state"] == "finished"
    assert summary["exit_code"] == 0
    assert summary["project"] == "specqa"
    assert summary["config"]["speculative"]["k"] == 7
    assert summary["config"]["dataset"]["limit"] == 2
    assert summary["summary"]["greedy/n"] == 2
    assert summary["summary"]["speculative/acceptance_rate"] == 1.0
    assert summary["summary"]["speculative/accuracy"] == result.summaries["speculative"]["accuracy"]
    assert summary["summary"]["outputs"]["_type"] == "table-file"
    assert summary["summary"]["outputs"]["nrows"] == 4

    # the run record names the script as job type; a single run has no group
    records = [json.loads(line) for line in leet("--json", str(tmp_path / "wandb")).splitlines()]
    run = next(record["run"] for record in records if record["type"] == "run")
    assert run["job_type"] == "evaluate"
    assert "run_group" not in run


def test_online_without_credentials_warns_once(tiny_dir, tmp_path):
    result = run_cli(
        "evaluate.py",
        tiny_overrides(tiny_dir, "modes=[greedy]", "wandb.mode=online", f"hydra.run.dir={tmp_path}"),
        # loopback port 9 (discard) refuses connections, so nothing leaves the machine
        WANDB_API_KEY="", WANDB_BASE_URL="http://127.0.0.1:9", WANDB_INIT_TIMEOUT="20",
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "W&B" in line and "[WARNING]" in line]
    assert len(warnings) == 1
    assert "W&B failed to start (UsageError: No API key configured." in warnings[0]
    assert f"the local results in {tmp_path} are complete" in warnings[0]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "summary.json").read_text())["modes"]["greedy"]["n"] == 2


def test_disabled_mode_starts_nothing(tmp_path):
    cfg = compose_config(["wandb.mode=disabled"])
    logger = WandbLogger.start(cfg, tmp_path, job_type="evaluate")
    assert not logger.active
    logger.log_results({"modes": {}}, [])
    logger.finish()
    assert not (tmp_path / "wandb").exists()


class _BrokenSummary:
    def update(self, values):
        raise ConnectionError("service went away")


class _BrokenRun:
    summary = _BrokenSummary()
    finished_with = None

    def finish(self, exit_code=0):
        self.finished_with = exit_code
        raise ConnectionError("still away")


def test_failure_while_logging_is_one_warning(tmp_path, caplog):
    run = _BrokenRun()
    logger = WandbLogger(run, tmp_path, mode="online")
    caplog.set_level(logging.WARNING)

    logger.log_results({"modes": {"greedy": {"n": 1}}}, [])
    logger.finish()
    assert not logger.active
    assert run.finished_with == 1
    assert [record.getMessage() for record in caplog.records] == [
        "W&B failed to log the results (ConnectionError: service went away); W&B logging is off for this run, "
        f"the local results in {tmp_path} are complete"
    ]
