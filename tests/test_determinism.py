"""The same config and seed give byte-identical results.jsonl outside wall times, across processes.

Two separate `evaluate.py -m speculative.temperature=0,0.7` sweeps run greedy, beam
and speculative decoding. Job N of the first sweep must match job N of the second
byte for byte once the wall-clock values are masked. The second job of each sweep
runs after the first in the same process, so state left behind by a job (the
global RNG, caches) must not leak into the next job's results.

k is fixed: speculative.k=auto picks k from draft and target timings measured in
each run, so its speculative records (k, and at temperature > 0 the samples) may
differ between runs.
"""

import json
from pathlib import Path

import pytest

from cli_helpers import run_cli, tiny_overrides
from hardening_helpers import mask_wall_times, read_records, shared_tiny_dir

TEMPERATURES = ("0", "0.7")


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> tuple[Path, Path]:
    tiny_dir = shared_tiny_dir(tmp_path_factory)
    root = tmp_path_factory.mktemp("determinism")
    for name in ("first", "second"):
        result = run_cli(
            "evaluate.py",
            [
                "-m",
                *tiny_overrides(tiny_dir, "dataset.limit=3", "generation.max_new_tokens=10", "speculative.k=4",
                                "wandb.mode=disabled"),
                f"speculative.temperature={','.join(TEMPERATURES)}",
                f"hydra.sweep.dir={root / name}",
            ],
        )
        assert result.returncode == 0, result.stderr
    return root / "first", root / "second"


@pytest.mark.parametrize("job", range(len(TEMPERATURES)), ids=[f"temperature {t}" for t in TEMPERATURES])
def test_results_are_byte_identical(sweeps, job):
    first, second = (sweep / str(job) / "results.jsonl" for sweep in sweeps)
    assert mask_wall_times(first.read_bytes()) == mask_wall_times(second.read_bytes())

    records = read_records(first.parent)
    assert [record["mode"] for record in records] == ["greedy"] * 3 + ["beam"] * 3 + ["speculative"] * 3
    # the mask leaves everything but wall-clock values: token ids and counters still compare
    assert all(record["stats"]["new_tokens"] == len(record["output_token_ids"]) for record in records)


def test_mask_changes_only_wall_times(sweeps):
    data = (sweeps[0] / "0" / "results.jsonl").read_bytes()
    for line, masked_line in zip(data.splitlines(), mask_wall_times(data).splitlines(), strict=True):
        record, masked = json.loads(line), json.loads(masked_line)
        changed = {key for key in record["stats"] if record["stats"][key] != masked["stats"][key]}
        assert changed <= {"wall_time_s", "tokens_per_second"}
        assert masked["stats"]["wall_time_s"] == 0
        assert {key: value for key, value in record.items() if key != "stats"} == {
            key: value for key, value in masked.items() if key != "stats"
        }


def test_sampling_differs_from_greedy(sweeps):
    # at temperature 0.7 the speculative outputs are samples, so the comparison above covers the sampler's seeding
    records = read_records(sweeps[0] / "1")
    greedy = [record["output_token_ids"] for record in records if record["mode"] == "greedy"]
    sampled = [record["output_token_ids"] for record in records if record["mode"] == "speculative"]
    assert sampled != greedy
