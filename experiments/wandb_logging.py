"""Weights & Biases logging that can never cost the local results.

One W&B run per job: the resolved config, the per-mode summary and a Table of the
per-item outputs. Offline runs are written inside the Hydra run folder. Every W&B
call is wrapped: the first failure is logged as one warning and turns the logger off,
and the evaluation carries on.
"""

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

# columns of the per-item Table, taken from the results.jsonl records
TABLE_COLUMNS = ("id", "mode", "question", "output_text", "answers", "contains", "em", "f1", "new_tokens", "wall_time_s")


class WandbLogger:
    """A W&B run, or a stand-in that does nothing when W&B is disabled or failed."""

    def __init__(self, run: Any = None, run_dir: Path | None = None, mode: str = "disabled"):
        self.run = run
        self.run_dir = run_dir
        self.mode = mode

    @classmethod
    def start(cls, cfg: DictConfig, run_dir: Path, job_type: str, sweep_dir: Path | None = None) -> "WandbLogger":
        """Start a W&B run for this job; on any failure, warn once and return a disabled logger."""
        mode = cfg.wandb.mode
        if mode == "disabled":
            return cls()

        # silent mode makes wandb raise instead of prompting for an API key on a terminal
        os.environ.setdefault("WANDB_SILENT", "true")
        group = cfg.wandb.group or (_sweep_group(sweep_dir) if sweep_dir is not None else None)
        try:
            import wandb

            run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                group=group,
                job_type=job_type,
                name=_run_name(run_dir, sweep_dir),
                tags=list(cfg.wandb.tags),
                config=OmegaConf.to_container(cfg, resolve=True),
                dir=str(run_dir),
                mode=mode,
                settings=wandb.Settings(console="off"),
            )
        except Exception as error:  # any W&B failure must leave the evaluation running
            _warn(error, run_dir, "start")
            return cls()
        logger.info("W&B %s run %s started (project %s, group %s)", mode, run.id, cfg.wandb.project, group)
        return cls(run, run_dir, mode)

    @property
    def active(self) -> bool:
        return self.run is not None

    def log_results(self, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """Put the per-mode aggregates in the run summary and the records in a Table."""
        if not self.active:
            return
        try:
            import wandb

            flat = {
                f"{mode}/{name}": value
                for mode, metrics in summary["modes"].items()
                for name, value in metrics.items()
                if value is not None
            }
            self.run.summary.update(flat)
            table = wandb.Table(columns=list(TABLE_COLUMNS))
            for record in records:
                table.add_data(*_table_row(record))
            self.run.log({"outputs": table})
        except Exception as error:  # any W&B failure must leave the evaluation running
            self._fail(error, "log the results")

    def finish(self, exit_code: int = 0) -> None:
        """Finish the run (a no-op when inactive); called from a `finally` block."""
        if not self.active:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as error:  # any W&B failure must leave the evaluation running
            _warn(error, self.run_dir, "finish the run")
            return
        if self.mode == "offline":
            folder = Path(run.dir).parent
            logger.info("W&B offline run saved in %s; view it with `wandb leet %s`, upload it with `wandb sync %s`",
                        folder, folder, folder)

    def _fail(self, error: Exception, action: str) -> None:
        _warn(error, self.run_dir, action)
        run, self.run = self.run, None
        try:
            run.finish(exit_code=1)
        except Exception:  # already warned once; a second W&B failure adds nothing
            pass


def _warn(error: Exception, run_dir: Path | None, action: str) -> None:
    message = " ".join(str(error).split()) or type(error).__name__
    logger.warning(
        "W&B failed to %s (%s: %s); W&B logging is off for this run, the local results in %s are complete",
        action,
        type(error).__name__,
        message,
        run_dir,
    )


def _sweep_group(sweep_dir: Path) -> str:
    """Name a sweep's group after its folder, e.g. `multirun/2025-01-31/12-00-00-ab12cd` -> `2025-01-31_12-00-00-ab12cd`."""
    return "_".join(sweep_dir.parts[-2:])


def _run_name(run_dir: Path, sweep_dir: Path | None) -> str:
    """Name a run after its folder: the date and time for a single run, the job number inside a sweep."""
    if sweep_dir is not None:
        return f"{_sweep_group(sweep_dir)}_{run_dir.name}"
    return "_".join(run_dir.parts[-2:])


def _table_row(record: dict[str, Any]) -> list[Any]:
    stats = record.get("stats", {})
    values = {**record, "new_tokens": stats.get("new_tokens"), "wall_time_s": stats.get("wall_time_s")}
    row = [values.get(column) for column in TABLE_COLUMNS]
    answers_index = TABLE_COLUMNS.index("answers")
    row[answers_index] = " | ".join(row[answers_index])
    return row
