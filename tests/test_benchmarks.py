"""Smoke tests of the benchmarks: the speed benchmark on tiny models, the load benchmark on SmolLM2.

Nothing here asserts a speed: the tiny models only exercise the machinery (timing
loop, identity checks, JSON, table and last line, batching, the memory child process).
The load benchmark checks only the order of its figures: a cold load is slower than a
cached one.
"""

import json
import re
import subprocess
import sys

import pytest
import torch
from cli_helpers import PROJECT_ROOT, cli_env, save_tiny_model

from benchmarks.report import headline, target_checks
from benchmarks.timing import Method, Prompt, compare, time_methods, trim_at_eos

HEADLINE = re.compile(r"^greedy_vs_hf=\d+\.\d\d beam_vs_hf=\d+\.\d\d spec_vs_greedy=\d+\.\d\d spec_vs_hf_assisted=\d+\.\d\d$")


def test_trim_at_eos():
    assert trim_at_eos([5, 6, 2, 0, 0], [2]) == [5, 6, 2]
    assert trim_at_eos([5, 6, 7], [2]) == [5, 6, 7]
    assert trim_at_eos([9, 3, 2], [3, 2]) == [9, 3]


def fixed_method(name: str, outputs: list[list[int]]) -> Method:
    """A method that returns `outputs[i]` for the prompt whose first id is i."""
    return Method(name, lambda prompt: (torch.tensor([outputs[int(prompt.input_ids[0, 0])]]), {"calls": 1}))


def prompts(count: int) -> list[Prompt]:
    return [Prompt(f"q{i}", torch.tensor([[i, 7]]), torch.ones(1, 2, dtype=torch.long)) for i in range(count)]


def test_time_methods_and_compare():
    methods = [fixed_method("a", [[4, 2, 0], [5, 5]]), fixed_method("b", [[4, 2, 9], [5, 6]])]

    results = time_methods(methods, prompts(2), repeats=3, eos_ids=[2], device=torch.device("cpu"))

    assert results["a"].token_ids == [[4, 2], [5, 5]]
    assert results["a"].tokens == 4
    assert len(results["a"].repeat_seconds) == 3
    assert results["a"].stats == [{"calls": 1}, {"calls": 1}]
    assert results["a"].deterministic
    comparison = compare(results, "a", "b")
    assert comparison.identical is False
    assert comparison.mismatched_prompts == [1]
    assert comparison.ratio == pytest.approx(results["a"].tokens_per_second / results["b"].tokens_per_second)


def test_time_methods_flags_nondeterminism():
    calls = {"n": 0}

    def changing(prompt):
        calls["n"] += 1
        return torch.tensor([[calls["n"]]]), None

    results = time_methods([Method("x", changing)], prompts(1), repeats=2, eos_ids=[2], device=torch.device("cpu"))

    assert results["x"].deterministic is False


def test_headline_and_targets():
    record = {
        "comparisons": {
            "greedy_vs_hf": {"ratio": 1.024, "identical": True},
            "beam_vs_hf": {"ratio": 1.1, "identical": True},
            "spec_vs_greedy": {"ratio": 1.6, "identical": False},
        },
        "batching": [{"mode": "greedy", "batch_size": 10, "ratio": 3.5}],
        "memory": {"peak_rss_mib": 2100.0},
    }

    assert headline(record) == "greedy_vs_hf=1.02 beam_vs_hf=1.10 spec_vs_greedy=1.60 spec_vs_hf_assisted=n/a"
    checks = target_checks(record)
    assert checks["greedy_vs_hf"]["met"] is True
    # a speedup with different outputs does not count
    assert checks["spec_vs_greedy"]["met"] is False
    assert checks["batched_greedy_10"]["met"] is True
    assert checks["peak_rss_mib"]["met"] is False


@pytest.mark.parametrize("k", ["auto", "3"])
def test_benchmark_runs_on_tiny_model(tmp_path, k):
    model_dir = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "benchmarks.speed",
        "--override", f"model.name_or_path={model_dir}",
        "--override", f"draft.name_or_path={model_dir}",
        "--override", "draft.quantize=null",
        "--override", "wandb.mode=disabled",
        "--prompts", "qa30", "--num-prompts", "2", "--repeats", "2", "--max-new-tokens", "6",
        "--num-beams", "2", "--k", k, "--batch-size", "4", "8", "--memory-items", "1", "--out", str(out),
    ]

    result = subprocess.run(command, cwd=PROJECT_ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert HEADLINE.match(lines[-1]), lines[-1]
    record = json.loads(out.read_text())
    assert set(record["methods"]) == {"greedy", "hf_greedy", "beam", "hf_beam", "speculative", "hf_assisted"}
    assert record["all_outputs_identical"] is True
    assert all(comparison["identical"] for comparison in record["comparisons"].values())
    # target and draft are the same model, so every draft token is accepted
    assert record["speculative"]["alpha"] == 1.0
    assert record["speculative"]["c"] > 0
    assert record["memory"]["peak_rss_mib"] > 0
    assert [(result["mode"], result["batch_size"]) for result in record["batching"]] == [
        ("greedy", 4), ("greedy", 8), ("beam", 4), ("beam", 8)
    ]
    assert all(result["items"] == 30 for result in record["batching"])
    assert record["machine"]["cpu_cores"] >= 1
    if k == "auto":
        assert 1 <= record["k_auto"]["k"] <= 16
        assert record["settings"]["k"] == record["k_auto"]["k"]
    else:
        assert record["settings"]["k"] == 3


def test_load_benchmark_cold_and_cached(tmp_path):
    out = tmp_path / "load.json"
    command = [sys.executable, "-m", "benchmarks.load", "--repeats", "1", "--out", str(out)]

    result = subprocess.run(command, cwd=PROJECT_ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"first_load_s=[\d.]+ second_load_s=[\d.]+ second_in_process_s=[\d.]+ import_floor_s=[\d.]+", last
    ), last
    record = json.loads(out.read_text())
    summary = record["summary"]
    # the cold load dequantizes; every cached load skips that
    assert summary["first_load_s"] > summary["second_load_s"] > summary["second_in_process_s"]
    assert summary["second_load_s"] > summary["import_floor_s"] > 0
    assert len(record["second"]) == 1


def test_load_benchmark_rejects_zero_repeats():
    command = [sys.executable, "-m", "benchmarks.load", "--repeats", "0"]

    result = subprocess.run(command, cwd=PROJECT_ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)

    assert result.returncode == 2
    assert "--repeats must be >= 1, got 0" in result.stderr
