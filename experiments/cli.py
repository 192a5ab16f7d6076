"""Error handling shared by the run.py and evaluate.py entry points.

A user error (bad config value, bad dataset, unloadable model, bad prompt, failed
write) ends a single run with one line `error: <message>` on stderr and exit
status 1; `debug.traceback=true` adds the traceback. Hydra's own errors (a
misspelled key, a value of the wrong type, an unknown preset) get the same one-line
form with exit status 2. Inside a `-m` sweep a failing job is logged, recorded in
its folder as failure.json and skipped, so the other jobs still run.
"""

import json
import logging
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from experiments.data import DatasetError
from experiments.models import ModelLoadError
from experiments.prompts import PromptError
from experiments.records import RESULTS_FILE, ResultsFileError, ResultsWriteError
from experiments.schema import ConfigError

logger = logging.getLogger(__name__)

FAILURE_FILE = "failure.json"
# ValueError covers the decoders' own argument checks; OSError covers unwritable folders and full disks
USER_ERRORS = (
    ConfigError, DatasetError, ModelLoadError, PromptError, ResultsFileError, ResultsWriteError, ValueError, OSError,
)


@dataclass
class JobContext:
    """Run folder, sweep folder, job number and overrides of one job, read from Hydra's runtime config."""

    script: str
    run_dir: Path
    sweep_dir: Path | None = None
    job_number: int | None = None
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def from_hydra(cls, script: str) -> "JobContext":
        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        return cls(
            script=script,
            run_dir=Path(hydra_cfg.runtime.output_dir),
            sweep_dir=Path(hydra_cfg.sweep.dir).resolve() if multirun else None,
            job_number=hydra_cfg.job.num if multirun else None,
            overrides=list(hydra_cfg.overrides.task),
        )


def run_job(cfg: DictConfig, script: str, job: Callable[[DictConfig, JobContext], None]) -> None:
    """Run `job` inside a Hydra task function, turning its errors into one-line reports."""
    context = JobContext.from_hydra(script)
    route_library_logs()
    try:
        job(cfg, context)
    except KeyboardInterrupt:
        _report_interrupt(context)
        if context.sweep_dir is not None:
            raise
        sys.exit(130)
    except USER_ERRORS as error:
        _report_failure(error, cfg, context)
    except Exception as error:
        if context.sweep_dir is None:
            raise  # a bug, not a user error: show the traceback
        _report_failure(error, cfg, context)


def route_library_logs() -> None:
    """Send transformers' and huggingface_hub's log records to Hydra's handlers (console on stdout, the job's log file).

    Both libraries write their warnings to stderr through handlers of their own. Without
    this, a warning such as the one about a prompt longer than the tokenizer's maximum,
    or the hub client's retry messages, would print more stderr lines beside the
    one-line error that follows them.
    """
    import huggingface_hub.utils.logging as hub_logging
    import transformers.utils.logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    hub_root = logging.getLogger("huggingface_hub")
    for handler in list(hub_root.handlers):
        hub_root.removeHandler(handler)
    hub_logging.enable_propagation()


def _report_failure(error: BaseException, cfg: DictConfig, context: JobContext) -> None:
    message = one_line(error)
    _log_to_files(f"{context.script} failed: {message}", error)
    if context.sweep_dir is None:
        print(f"error: {message}", file=sys.stderr)
        _print_traceback_if_asked(cfg, error)
        sys.exit(1)

    # in a sweep: record the failure for the sweep report and let the next job run
    print(f"error: sweep job {context.job_number} ({' '.join(context.overrides)}): {message}", file=sys.stderr)
    _print_traceback_if_asked(cfg, error)
    failure = {"job": context.job_number, "overrides": context.overrides, "error": message, "type": type(error).__name__}
    try:
        (context.run_dir / FAILURE_FILE).write_text(json.dumps(failure, indent=2) + "\n", encoding="utf-8")
    except OSError as write_error:
        logger.error("could not write %s in %s: %s", FAILURE_FILE, context.run_dir, write_error)


def _print_traceback_if_asked(cfg: DictConfig, error: BaseException) -> None:
    if cfg.get("debug", {}).get("traceback", False):
        traceback.print_exception(error, file=sys.stderr)


def _log_to_files(message: str, error: BaseException) -> None:
    """Write the error and its traceback to the log files only; the console gets the one-line message."""
    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, message, None, (type(error), error, error.__traceback__))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _report_interrupt(context: JobContext) -> None:
    results = context.run_dir / RESULTS_FILE
    saved = _count_lines(results)
    overrides = [o for o in context.overrides if not o.startswith("hydra.run.dir=")]
    command = ["python", f"{context.script}.py", *overrides, f"hydra.run.dir={context.run_dir}"]
    records = "record is" if saved == 1 else "records are"
    logger.warning("interrupted; %d %s saved in %s", saved, records, results)
    print(
        f"interrupted: {saved} {records} saved in {results}; resume with: {shlex.join(command)}",
        file=sys.stderr,
    )


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def one_line(error: BaseException) -> str:
    """Return the error's message on one line, or its type name when the message is empty."""
    return " ".join(str(error).split()) or type(error).__name__


def run_cli(main: Callable[[], None]) -> None:
    """Call a `@hydra.main` function, printing Hydra's composition errors as one `error:` line.

    HYDRA_FULL_ERROR=1 in the environment keeps Hydra's full report instead.
    """
    user_wants_full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra re-raises instead of printing its multi-line report when this is set
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as error:
        if user_wants_full_error:
            raise
        print(f"error: {hydra_error_message(error)}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        # raised before the job starts, e.g. when Hydra cannot create the run folder
        if user_wants_full_error:
            raise
        reason = f"cannot write {error.filename}: {error.strerror}" if error.filename else one_line(error)
        print(f"error: {reason} (set hydra.run.dir, or hydra.sweep.dir for -m, to a writable folder)", file=sys.stderr)
        sys.exit(1)


def hydra_error_message(error: BaseException) -> str:
    """Join a Hydra or OmegaConf error and its OmegaConf cause into one line with a hint."""
    text = str(error)
    parts = [text.splitlines()[0] if text else type(error).__name__]
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException):
        parts.append(str(cause).splitlines()[0])
    message = ": ".join(part.rstrip(".") for part in parts if part)

    options = getattr(error, "options", None)
    if isinstance(error, MissingConfigException) and options:
        return f"{message}; available: {', '.join(options)}"
    return f"{message} (docs/USAGE.md lists the keys and their types; HYDRA_FULL_ERROR=1 shows Hydra's full report)"
