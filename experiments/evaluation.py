"""The QA evaluation behind evaluate.py: every question with every mode, scored and saved.

Outputs in the run folder: results.jsonl (one record per item and mode, appended
and fsync'ed one at a time), run_config.json (the config that results depend on),
summary.json (per-mode aggregates and the resolved config), report.md with the
table, accuracy.png and acceptance.png. A rerun in the same folder skips the
(item, mode) pairs already in results.jsonl.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from experiments.data import QAItem, load_dataset, resolve_dataset_path
from experiments.generation import ModeOutput, ModeRunner
from experiments.records import RESULTS_FILE, ResultsFile, check_run_config, write_json_atomic
from experiments.report import format_table, plot_modes, summarize, write_report
from experiments.schema import result_config, validate_config
from experiments.scoring import score_prediction
from experiments.wandb_logging import WandbLogger

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
# share of the CPU cores that other processes may keep busy before the speed columns are unreliable
BUSY_CPU_SHARE = 0.5


@dataclass
class EvaluationResult:
    """Result of `evaluate`: the run folder, the per-mode aggregates and the markdown table."""

    run_dir: Path
    summaries: dict[str, dict[str, Any]]
    table: str


def evaluate(cfg: DictConfig, run_dir: str | Path, sweep_dir: str | Path | None = None) -> EvaluationResult:
    """Evaluate every configured mode on the dataset and write the outputs into `run_dir`.

    Raises ConfigError, DatasetError, ModelLoadError, PromptError, ResultsFileError
    or ResultsWriteError with a one-line message. Records written before an error
    or a KeyboardInterrupt stay in results.jsonl.
    """
    validate_config(cfg, script="evaluate")
    warn_if_cpu_busy()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    items = load_dataset(cfg.dataset.path, cfg.dataset.limit)
    torch.manual_seed(cfg.seed)

    # resume: keep the finished pairs, after checking that they were made with this config
    results = ResultsFile(run_dir / RESULTS_FILE)
    stored = results.load()
    check_run_config(run_dir, result_config(cfg), has_records=bool(stored))
    done = {(record["id"], record["mode"]) for record in stored}
    pending = [(mode, item) for mode in cfg.modes for item in items if (item.id, mode) not in done]
    total = len(items) * len(cfg.modes)
    if total > len(pending):
        logger.info(
            "resuming in %s: %d of %d (item, mode) pairs are already in %s and are skipped",
            run_dir, total - len(pending), total, RESULTS_FILE,
        )

    runner = None
    if pending:
        runner = ModeRunner.load(cfg)
        pending_items = list({item.id: item for _, item in pending}.values())
        runner.check_prompts([item.question for item in pending_items], [f"question {item.id!r}" for item in pending_items])
    wandb_run = WandbLogger.start(cfg, run_dir, job_type="evaluate", sweep_dir=Path(sweep_dir) if sweep_dir else None)
    exit_code = 1
    try:
        with results:
            new_records = _run_pending(cfg, runner, results, pending) if runner is not None else []
        records = _select(stored + new_records, items, cfg.modes)
        summaries = summarize(records)
        _write_outputs(cfg, run_dir, items, summaries)
        wandb_run.log_results({"modes": summaries}, [r for mode in records.values() for r in mode])
        exit_code = 0
    except KeyboardInterrupt:
        exit_code = 130  # the shell's status for SIGINT
        raise
    finally:
        wandb_run.finish(exit_code=exit_code)
    return EvaluationResult(run_dir=run_dir, summaries=summaries, table=format_table(summaries))


def _run_pending(cfg: DictConfig, runner: ModeRunner, results: ResultsFile, pending: list[tuple[str, QAItem]]) -> list[dict]:
    """Generate, score, log and append a record for each pending (mode, item) pair."""
    new_records = []
    with logging_redirect_tqdm(), tqdm(total=len(pending), desc="evaluate", unit="answer", disable=None) as progress:
        for mode, batch in _batches(pending, cfg.batch_size):
            outputs = runner.generate(mode, [item.question for item in batch], [item.id for item in batch])
            for item, output in zip(batch, outputs):
                record = build_record(item, mode, output)
                _log_block(record)
                results.append(record)
                new_records.append(record)
                progress.update(1)
    return new_records


def _batches(pending: list[tuple[str, QAItem]], batch_size: int):
    """Yield (mode, items) groups of at most `batch_size` items of one mode; speculative groups hold one item."""
    batch: list[QAItem] = []
    batch_mode = None
    for mode, item in pending:
        limit = 1 if mode == "speculative" else batch_size
        if batch and (mode != batch_mode or len(batch) >= limit):
            yield batch_mode, batch
            batch = []
        batch_mode = mode
        batch.append(item)
    if batch:
        yield batch_mode, batch


def build_record(item: QAItem, mode: str, output: ModeOutput) -> dict[str, Any]:
    """Return the results.jsonl record of one item under one mode, its scores included."""
    score = score_prediction(output.output_text, item.answers)
    return {
        "id": item.id,
        "mode": mode,
        "question": item.question,
        "prompt_text": output.prompt_text,
        "prompt_token_ids": output.prompt_token_ids,
        "output_text": output.output_text,
        "output_token_ids": output.output_token_ids,
        "answers": list(item.answers),
        "em": score.em,
        "contains": score.contains,
        "f1": score.f1,
        "stats": output.stats,
    }


def warn_if_cpu_busy() -> str | None:
    """Log a warning, and return it, when other processes keep the CPU busy before the run starts.

    Modes are timed one after the other, so a load that comes and goes makes their
    tokens per second, and the speed column, incomparable. The check is the 1-minute
    load average against half the CPU cores.
    """
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= BUSY_CPU_SHARE * cores:
        return None
    message = (
        f"the 1-minute load average is {load:.2f} on {cores} CPU cores: other processes share the CPU, so "
        f"tokens/s and speed vs greedy are unreliable in this run (accuracy is not affected)"
    )
    logger.warning(message)
    return message


def _log_block(record: dict[str, Any]) -> None:
    verdict = "correct" if record["contains"] else "wrong"
    logger.info(
        "%s | %s\n[Prompt] %s\n[Output] %s\n[Answer] %s\n[Score] %s (contains=%d em=%d f1=%.2f)",
        record["mode"], record["id"], record["question"], record["output_text"],
        " | ".join(record["answers"]), verdict, record["contains"], record["em"], record["f1"],
    )


def _select(records: list[dict], items: list[QAItem], modes: list[str]) -> dict[str, list[dict]]:
    """Return the records of the current items per mode, in dataset order, one per (item, mode)."""
    by_key = {}
    for record in records:
        by_key.setdefault((record["id"], record["mode"]), record)
    return {mode: [by_key[(item.id, mode)] for item in items if (item.id, mode) in by_key] for mode in modes}


def _write_outputs(cfg: DictConfig, run_dir: Path, items: list[QAItem], summaries: dict) -> None:
    dataset = {"name": cfg.dataset.name, "path": str(resolve_dataset_path(cfg.dataset.path)), "items": len(items)}
    write_json_atomic(
        run_dir / SUMMARY_FILE,
        {"dataset": dataset, "modes": summaries, "config": OmegaConf.to_container(cfg, resolve=True)},
    )
    details = [
        f"dataset: {dataset['name']} ({dataset['items']} questions, {dataset['path']})",
        f"target: {cfg.model.name}; draft: {cfg.draft.name if cfg.speculative.drafter == 'model' else 'prompt lookup'}",
        f"max_new_tokens={cfg.generation.max_new_tokens}, num_beams={cfg.beam.num_beams}, "
        f"k={cfg.speculative.k}, temperature={cfg.speculative.temperature}, seed={cfg.seed}",
    ]
    write_report(run_dir / REPORT_FILE, "specqa evaluation", summaries, details)
    plot_modes(run_dir, summaries)
    logger.info("wrote %s, %s and plots to %s", SUMMARY_FILE, REPORT_FILE, run_dir)
