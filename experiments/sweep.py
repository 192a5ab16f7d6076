"""Hydra callback that compares the jobs of a `-m` sweep when the sweep ends.

It reads every job folder of the sweep: summary.json of a finished job,
failure.json of a failed one. It then writes comparison.md and comparison.json
(one row per job and mode) into the sweep folder, with comparison.png
(speculative acceptance rate and tokens/s against k, one line per temperature).
A failed or unfinished job is listed with its error. When any job failed, the
sweep command exits with status 1 after the report is written.
"""

import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments.cli import FAILURE_FILE
from experiments.evaluation import SUMMARY_FILE
from experiments.records import write_json_atomic

logger = logging.getLogger(__name__)

COMPARISON_MD = "comparison.md"
COMPARISON_JSON = "comparison.json"
COMPARISON_PNG = "comparison.png"


class SweepReportCallback(Callback):
    """Write the sweep comparison after the last job (the `on_multirun_end` hook)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        jobs = collect_jobs(sweep_dir)
        if not jobs:
            logger.warning("no job folders found in %s; nothing to compare", sweep_dir)
            return
        write_comparison(sweep_dir, jobs)

        failed = [job for job in jobs if job["status"] != "finished"]
        finished = len(jobs) - len(failed)
        print(f"\n{format_comparison(jobs)}\n\nsweep comparison: {sweep_dir / COMPARISON_MD}")
        if failed:
            # each failed job printed its own error line when it failed
            print(f"error: {len(failed)} of {len(jobs)} sweep jobs did not finish ({finished} finished); "
                  f"see {sweep_dir / COMPARISON_MD}", file=sys.stderr)
            sys.exit(1)


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Read each job folder (one with .hydra/overrides.yaml) into a dict, in job-number order."""
    jobs = []
    for folder in sweep_dir.iterdir():
        overrides_file = folder / ".hydra" / "overrides.yaml"
        if not folder.is_dir() or not overrides_file.exists():
            continue
        job: dict[str, Any] = {
            "job": int(folder.name) if folder.name.isdigit() else folder.name,
            "dir": str(folder),
            "overrides": yaml.safe_load(overrides_file.read_text()) or [],
            "status": "unfinished",
            "error": "no summary.json or failure.json (killed, or still running)",
            "modes": {},
        }
        summary_file, failure_file = folder / SUMMARY_FILE, folder / FAILURE_FILE
        if summary_file.exists():
            summary = json.loads(summary_file.read_text())
            job.update(status="finished", error=None, modes=summary["modes"], settings=_settings(summary["config"]))
        elif failure_file.exists():
            job.update(status="failed", error=json.loads(failure_file.read_text())["error"])
        jobs.append(job)
    return sorted(jobs, key=lambda job: (isinstance(job["job"], str), job["job"]))


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    spec = config["speculative"]
    return {"k": spec["k"], "temperature": spec["temperature"], "drafter": spec["drafter"]}


COLUMNS = ("job", "overrides", "mode", "n", "accuracy", "acceptance_rate", "mean_accepted_length",
           "tokens_per_s", "speed_vs_greedy")


def varying_overrides(jobs: list[dict[str, Any]]) -> set[str]:
    """Return the overrides that not every job shares: the swept values."""
    shared = set.intersection(*(set(job["overrides"]) for job in jobs)) if jobs else set()
    return {override for job in jobs for override in job["overrides"]} - shared


def comparison_rows(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return one row per (job, mode), and one row with the error for a job without results.

    A row's `overrides` lists only the swept values; the overrides every job shares
    are in the header of comparison.md.
    """
    varying = varying_overrides(jobs)
    rows = []
    for job in jobs:
        swept = " ".join(override for override in job["overrides"] if override in varying)
        base = {"job": job["job"], "overrides": swept, "status": job["status"]}
        if job["status"] != "finished":
            rows.append({**base, "mode": "-", "error": job["error"]})
            continue
        for mode, metrics in job["modes"].items():
            rows.append({**base, "mode": mode, **{key: metrics.get(key) for key in COLUMNS[3:]},
                         "accuracy_se": metrics.get("accuracy_se"), **job["settings"]})
    return rows


def format_comparison(jobs: list[dict[str, Any]]) -> str:
    """Return the comparison as a markdown table; a job without results shows its error."""
    header = "| job | overrides | mode | n | accuracy ± SE | acceptance | mean accepted length | tokens/s | speed vs greedy |"
    lines = [header, "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in comparison_rows(jobs):
        if row["status"] != "finished":
            lines.append(f"| {row['job']} | {row['overrides']} | {row['status']}: {row['error']} | | | | | | |")
            continue
        accuracy = f"{row['accuracy']:.3f} ± {row['accuracy_se']:.3f}"
        cells = [str(row["job"]), row["overrides"], row["mode"], str(row["n"]), accuracy,
                 _number(row["acceptance_rate"], "{:.3f}"), _number(row["mean_accepted_length"], "{:.2f}"),
                 _number(row["tokens_per_s"], "{:.1f}"), _number(row["speed_vs_greedy"], "{:.2f}x")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def write_comparison(sweep_dir: Path, jobs: list[dict[str, Any]]) -> None:
    """Write comparison.md, comparison.json and comparison.png into the sweep folder."""
    write_json_atomic(sweep_dir / COMPARISON_JSON, {"jobs": jobs, "rows": comparison_rows(jobs)})
    notes = ("accuracy: share of outputs that contain an accepted answer (± binomial standard error); "
             "acceptance: accepted / drafted draft tokens; mean accepted length: new tokens per target "
             "verification call; tokens/s: total new tokens / total wall time; speed vs greedy: tokens/s "
             "divided by greedy's tokens/s in the same job.")
    shared = [override for override in jobs[0]["overrides"] if override not in varying_overrides(jobs)]
    header = f"- sweep folder: {sweep_dir}\n- overrides shared by every job: {' '.join(shared) or '(none)'}"
    text = f"# Sweep comparison\n\n{header}\n\n{format_comparison(jobs)}\n\n{notes}\n"
    (sweep_dir / COMPARISON_MD).write_text(text, encoding="utf-8")
    plot_sweep(sweep_dir / COMPARISON_PNG, comparison_rows(jobs))
    logger.info("wrote the sweep comparison of %d jobs to %s", len(jobs), sweep_dir)


def plot_sweep(path: Path, rows: list[dict[str, Any]]) -> None:
    """Plot speculative acceptance rate and tokens/s against k, one line per target temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_temperature: dict[float, list[tuple[int, float | None, float | None]]] = defaultdict(list)
    for row in rows:
        if row.get("mode") == "speculative" and isinstance(row.get("k"), int):
            by_temperature[row["temperature"]].append((row["k"], row["acceptance_rate"], row["tokens_per_s"]))

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for temperature, points in sorted(by_temperature.items()):
        points.sort()
        ks = [point[0] for point in points]
        left.plot(ks, [point[1] if point[1] is not None else float("nan") for point in points],
                  marker="o", label=f"temperature {temperature:g}")
        right.plot(ks, [point[2] if point[2] is not None else float("nan") for point in points],
                   marker="o", label=f"temperature {temperature:g}")
    left.set_xlabel("k (draft tokens per step)")
    left.set_ylabel("acceptance rate")
    left.set_ylim(0, 1)
    right.set_xlabel("k (draft tokens per step)")
    right.set_ylabel("tokens / s")
    for axes in (left, right):
        if by_temperature:
            axes.legend()
    figure.suptitle("speculative decoding across the sweep")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
