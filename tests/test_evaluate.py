"""evaluate.py and run.py end to end on tiny models: outputs, resumption, interruption, determinism.

The plain functions are called with configs built by Hydra's compose API; the CLI
behaviour (exit status, one-line errors, SIGKILL and SIGINT) is tested on subprocesses.
"""

import errno
import json
import logging
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cli_helpers import compose_config, run_cli, save_tiny_model, start_cli, stderr_lines, tiny_overrides
from experiments import evaluation
from experiments.evaluation import evaluate
from experiments.generation import run_prompts
from experiments.records import ResultsFile, ResultsFileError, ResultsWriteError
from experiments.schema import ConfigError

RECORD_KEYS = [
    "id", "mode", "question", "prompt_text", "prompt_token_ids", "output_text", "output_token_ids",
    "answers", "em", "contains", "f1", "stats",
]
# summary fields that depend on the wall clock
TIMING_KEYS = ("wall_time_s", "tokens_per_s", "speed_vs_greedy")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def run_evaluate(tiny_dir: Path, run_dir: Path, *extra: str):
    cfg = compose_config(tiny_overrides(tiny_dir, "wandb.mode=disabled", *extra))
    return evaluate(cfg, run_dir)


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


# decoder stats that depend on the wall clock
TIMING_STATS = ("wall_time_s", "tokens_per_second")


def without_wall_times(records: list[dict]) -> list[dict]:
    stripped = []
    for record in records:
        stats = {key: value for key, value in record["stats"].items() if key not in TIMING_STATS}
        stripped.append({**record, "stats": stats})
    return stripped


def untimed_summary(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {mode: {k: v for k, v in metrics.items() if k not in TIMING_KEYS} for mode, metrics in summary["modes"].items()}


def test_evaluate_writes_every_output(tiny_dir, tmp_path):
    result = run_evaluate(tiny_dir, tmp_path)

    records = read_records(tmp_path)
    assert [(r["mode"], r["id"]) for r in records] == [
        ("greedy", "capital-france"), ("greedy", "capital-japan"),
        ("beam", "capital-france"), ("beam", "capital-japan"),
        ("speculative", "capital-france"), ("speculative", "capital-japan"),
    ]
    for record in records:
        assert list(record) == RECORD_KEYS
        assert record["prompt_text"].startswith("<|im_start|>system\nAnswer the question")
        assert 1 <= len(record["output_token_ids"]) <= 6
        assert record["stats"]["new_tokens"] == len(record["output_token_ids"])
    assert records[0]["answers"] == ["Paris"]

    # temperature 0 with the target as its own draft: greedy output, every draft accepted
    assert records[4]["output_token_ids"] == records[0]["output_token_ids"]
    assert records[5]["output_token_ids"] == records[1]["output_token_ids"]
    assert result.summaries["speculative"]["acceptance_rate"] == 1.0
    assert result.summaries["greedy"]["speed_vs_greedy"] == 1.0
    assert result.summaries["greedy"]["acceptance_rate"] is None

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["modes"]) == ["greedy", "beam", "speculative"]
    assert summary["modes"]["beam"]["n"] == 2
    assert summary["dataset"]["items"] == 2
    assert summary["config"]["beam"]["num_beams"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "| mode | n | accuracy ± SE | EM | F1 | acceptance | mean accepted length | fallbacks | tokens/s | speed vs greedy |" in report
    assert "| speculative | 2 | 0.000 ± 0.000 |" in report
    for plot in ("accuracy.png", "acceptance.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run_config.json").exists()


def test_resume_skips_finished_pairs(tiny_dir, tmp_path, caplog):
    run_evaluate(tiny_dir, tmp_path, "modes=[greedy]")
    first = (tmp_path / "results.jsonl").read_bytes()

    caplog.set_level(logging.INFO)
    run_evaluate(tiny_dir, tmp_path, "modes=[greedy,beam]")
    assert "2 of 4 (item, mode) pairs are already in results.jsonl and are skipped" in caplog.text
    records = read_records(tmp_path)
    assert (tmp_path / "results.jsonl").read_bytes().startswith(first)
    assert [(r["mode"], r["id"]) for r in records][2:] == [("beam", "capital-france"), ("beam", "capital-japan")]

    caplog.clear()
    result = run_evaluate(tiny_dir, tmp_path, "modes=[greedy,beam]")
    assert "4 of 4 (item, mode) pairs are already in results.jsonl and are skipped" in caplog.text
    assert "loaded model" not in caplog.text
    assert list(result.summaries) == ["greedy", "beam"]


def test_resume_rejects_changed_config(tiny_dir, tmp_path):
    run_evaluate(tiny_dir, tmp_path, "modes=[greedy]", "dataset.limit=1")
    with pytest.raises(ConfigError) as raised:
        run_evaluate(tiny_dir, tmp_path, "modes=[greedy]", "dataset.limit=1", "speculative.k=2", "seed=5")
    assert str(raised.value) == (
        f"the results in {tmp_path} were made with a different config (seed: 0 -> 5; speculative.k: 7 -> 2); "
        "rerun with the stored values to resume, or choose a new hydra.run.dir"
    )
    assert len(read_records(tmp_path)) == 1


def test_truncated_last_line_is_redone(tiny_dir, tmp_path, caplog):
    run_evaluate(tiny_dir, tmp_path, "modes=[greedy,beam]", "dataset.limit=1")
    complete = read_records(tmp_path)

    # a process killed inside the write of the second record leaves half a line
    lines = (tmp_path / "results.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "results.jsonl").write_bytes(lines[0] + lines[1][:40])

    caplog.set_level(logging.INFO)
    run_evaluate(tiny_dir, tmp_path, "modes=[greedy,beam]", "dataset.limit=1")
    assert "line 2 was cut short by an interrupted write (40 bytes)" in caplog.text
    assert "1 of 2 (item, mode) pairs are already in results.jsonl and are skipped" in caplog.text
    assert without_wall_times(read_records(tmp_path)) == without_wall_times(complete)


def test_broken_middle_line_is_rejected(tiny_dir, tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text('{"id": "a", "mode": "greedy"}\nnot json\n{"id": "b", "mode": "greedy"}\n')
    with pytest.raises(ResultsFileError) as raised:
        ResultsFile(results).load()
    assert str(raised.value) == (
        f"{results} line 2 is not a valid record; this program never writes such a line, so move the file "
        "away or repair that line before resuming"
    )


def test_write_error_keeps_earlier_records(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    results = ResultsFile(path)
    results.append({"id": "1", "mode": "greedy"})

    # the disk fills up after half of the second record
    real_write = os.write
    calls = []

    def failing_write(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("experiments.records.os.write", failing_write)
    with pytest.raises(ResultsWriteError) as raised:
        results.append({"id": "2", "mode": "greedy"})
    results.close()
    assert str(raised.value) == (
        f"writing a record to {path} failed: No space left on device; the 30 bytes written before are intact, "
        "so free space or fix permissions and rerun with the same hydra.run.dir to resume"
    )
    assert path.read_text() == '{"id": "1", "mode": "greedy"}\n'


@pytest.mark.parametrize("temperature", ["0", "0.7"])
def test_same_seed_gives_identical_results(tiny_dir, tmp_path, temperature):
    overrides = (f"speculative.temperature={temperature}", "dataset.limit=2")
    run_evaluate(tiny_dir, tmp_path / "first", *overrides)
    run_evaluate(tiny_dir, tmp_path / "second", *overrides)
    first, second = read_records(tmp_path / "first"), read_records(tmp_path / "second")
    assert without_wall_times(first) == without_wall_times(second)
    assert [r["mode"] for r in first] == ["greedy", "greedy", "beam", "beam", "speculative", "speculative"]


def test_batched_greedy_and_beam_match_one_at_a_time(tiny_dir, tmp_path):
    single = run_evaluate(tiny_dir, tmp_path / "single", "modes=[greedy,beam]", "dataset.limit=3")
    batched = run_evaluate(tiny_dir, tmp_path / "batched", "modes=[greedy,beam]", "dataset.limit=3", "batch_size=2")
    single_ids = [r["output_token_ids"] for r in read_records(single.run_dir)]
    batched_records = read_records(batched.run_dir)
    assert [r["output_token_ids"] for r in batched_records] == single_ids
    assert [r["stats"].get("batch_size") for r in batched_records] == [2, 2, None, 2, 2, None]


def test_prompt_lookup_drafter_and_debug_log(tiny_dir, tmp_path):
    log = tmp_path / "spec.log"
    result = run_evaluate(
        tiny_dir, tmp_path / "run", "modes=[greedy,speculative]", "speculative.drafter=prompt_lookup",
        f"debug.speculative_log={log}", "dataset.limit=1",
    )
    records = read_records(result.run_dir)
    assert records[1]["output_token_ids"] == records[0]["output_token_ids"]
    assert records[1]["stats"]["draft_forward_calls"] == 0
    assert result.summaries["speculative"]["fallbacks"] == records[1]["stats"]["undrafted_tokens"]
    assert log.read_text().strip()


def test_run_prompts_answers_each_prompt_and_mode(tiny_dir):
    cfg = compose_config(tiny_overrides(tiny_dir, "prompts=[Hello there,Why?]"))
    answers = run_prompts(cfg)
    assert [(a.mode, a.index, a.prompt) for a in answers] == [
        ("greedy", 0, "Hello there"), ("greedy", 1, "Why?"),
        ("beam", 0, "Hello there"), ("beam", 1, "Why?"),
        ("speculative", 0, "Hello there"), ("speculative", 1, "Why?"),
    ]
    assert answers[4].output.output_token_ids == answers[0].output.output_token_ids
    assert answers[4].output.stats["accepted"] == answers[4].output.stats["drafted"]


def test_run_py_prints_outputs(tiny_dir, tmp_path):
    result = run_cli(
        "run.py",
        tiny_overrides(tiny_dir, "modes=[greedy,speculative]", "debug.render_input_text=true",
                       "prompts=[Hi]", f"hydra.run.dir={tmp_path}"),
        WANDB_MODE="disabled",
    )
    assert result.returncode == 0, result.stderr
    assert "=== prompt 0 | greedy ===" in result.stdout
    assert "=== prompt 0 | speculative ===" in result.stdout
    assert "[Rendered prompt]\n<|im_start|>system\n" in result.stdout
    assert result.stdout.count("[Output] ") == 2
    assert '[Stats] {"new_tokens": ' in result.stdout


def test_cli_bad_dataset_is_one_line(tiny_dir, tmp_path):
    missing = tmp_path / "missing.jsonl"
    result = run_cli("evaluate.py", tiny_overrides(tiny_dir, f"dataset.path={missing}", f"hydra.run.dir={tmp_path / 'run'}"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: dataset file not found: {missing} (set dataset.path to an existing .json or .jsonl file)"
    ]
    assert "Traceback" in (tmp_path / "run" / "evaluate.log").read_text()

    result = run_cli(
        "evaluate.py",
        tiny_overrides(tiny_dir, f"dataset.path={missing}", "debug.traceback=true", f"hydra.run.dir={tmp_path / 'run'}"),
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"error: dataset file not found: {missing} (set dataset.path to an existing .json or .jsonl file)"
    assert "Traceback (most recent call last):" in result.stderr


def wait_for_records(path: Path, count: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {count} records: {process.stderr.read()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no {count} records in {path} after {timeout} s")


def test_kill_and_resume_equals_uninterrupted_run(tiny_dir, tmp_path):
    overrides = tiny_overrides(tiny_dir, "dataset.limit=3", "speculative.temperature=0.7", "wandb.mode=disabled")
    run_dir = tmp_path / "killed"

    # SIGKILL after two records, then add half a record as if killed inside a write
    process = start_cli("evaluate.py", [*overrides, f"hydra.run.dir={run_dir}"])
    wait_for_records(run_dir / "results.jsonl", 2, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    saved = (run_dir / "results.jsonl").read_bytes()
    done = saved.count(b"\n")
    assert 2 <= done < 9
    (run_dir / "results.jsonl").write_bytes(saved[: saved.rfind(b"\n") + 1] + b'{"id": "capital-italy", "mo')

    resumed = run_cli("evaluate.py", [*overrides, f"hydra.run.dir={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr
    log = (run_dir / "evaluate.log").read_text()
    assert f"{done} of 9 (item, mode) pairs are already in results.jsonl and are skipped" in log
    assert "was cut short by an interrupted write (27 bytes)" in log

    records = read_records(run_dir)
    assert len(records) == 9
    assert len({(r["id"], r["mode"]) for r in records}) == 9

    # the uninterrupted reference run, in the test process
    reference = tmp_path / "reference"
    run_evaluate(tiny_dir, reference, "dataset.limit=3", "speculative.temperature=0.7")
    assert without_wall_times(records) == without_wall_times(read_records(reference))
    assert untimed_summary(run_dir) == untimed_summary(reference)


def test_sigint_stops_cleanly_and_tells_how_to_resume(tiny_dir, tmp_path):
    run_dir = tmp_path / "interrupted"
    overrides = tiny_overrides(tiny_dir, "dataset.limit=3", "generation.max_new_tokens=12")
    process = start_cli("evaluate.py", [*overrides, f"hydra.run.dir={run_dir}"])
    wait_for_records(run_dir / "results.jsonl", 1, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130

    lines = [line for line in stderr.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1
    saved = len(read_records(run_dir))
    record_word = "record is" if saved == 1 else "records are"
    prefix = f"interrupted: {saved} {record_word} saved in {run_dir / 'results.jsonl'}; resume with: "
    assert lines[0].startswith(prefix)
    command = shlex.split(lines[0][len(prefix):])
    assert command[:2] == ["python", "evaluate.py"]
    assert command[-1] == f"hydra.run.dir={run_dir}"

    # W&B finished the offline run with the interrupt's exit status
    inspect = subprocess.run(
        [str(Path(os.sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json", str(run_dir / "wandb")],
        capture_output=True, text=True, timeout=120,
    )
    assert json.loads(inspect.stdout)["exit_code"] == 130

    # the printed command resumes the run
    resumed = run_cli(command[1], command[2:])
    assert resumed.returncode == 0, resumed.stderr
    assert len(read_records(run_dir)) == 9
    assert stderr_lines(resumed) == []


@pytest.mark.slow
def test_smollm2_smoke(tmp_path):
    cfg = compose_config(["dataset.limit=2", "generation.max_new_tokens=16", "wandb.mode=disabled"])
    result = evaluate(cfg, tmp_path)
    records = read_records(tmp_path)
    assert len(records) == 6
    greedy = {r["id"]: r for r in records if r["mode"] == "greedy"}
    for record in records:
        if record["mode"] == "speculative":
            assert record["output_token_ids"] == greedy[record["id"]]["output_token_ids"]
    # the int4 draft is a close copy of the target, so most draft tokens pass greedy verification
    assert result.summaries["speculative"]["acceptance_rate"] > 0.5
    assert "Paris" in greedy["capital-france"]["output_text"]


@pytest.mark.parametrize(("load", "warned"), [(0.5, False), (1.0, False), (1.5, True)])
def test_busy_cpu_warning(monkeypatch, caplog, load, warned):
    monkeypatch.setattr(evaluation.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(evaluation.os, "cpu_count", lambda: 2)

    with caplog.at_level(logging.WARNING, logger="experiments.evaluation"):
        message = evaluation.warn_if_cpu_busy()

    assert (message is not None) is warned
    assert [record.getMessage() for record in caplog.records] == ([message] if warned else [])
