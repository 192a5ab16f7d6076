"""Peak resident memory of the main job, `evaluate.py`, run as a child process.

The job runs with the given Hydra overrides into a temporary folder. Its peak resident
set size is read with `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` once it has ended:
Linux reports the largest peak among the terminated children the caller has waited for,
in KiB. The caller must therefore start no other child process before this one. Any
process that the job itself starts and waits for (W&B's service in offline mode) is
included in that maximum, not added to it.
"""

import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class JobMemory:
    """Peak resident memory of one evaluate.py run and how it was measured."""

    peak_rss_mib: float
    wall_seconds: float
    command: list[str]
    method: str = "resource.getrusage(RUSAGE_CHILDREN).ru_maxrss of the evaluate.py child process"

    def to_dict(self) -> dict:
        return {
            "peak_rss_mib": self.peak_rss_mib,
            "wall_seconds": self.wall_seconds,
            "command": " ".join(self.command),
            "method": self.method,
        }


class JobFailedError(RuntimeError):
    """evaluate.py ended with a nonzero exit status; the message contains the end of its stderr."""


def measure_evaluate_memory(overrides: list[str], timeout_s: float = 600.0) -> JobMemory:
    """Run `evaluate.py` with `overrides` and return its peak resident memory.

    Raises JobFailedError when the job fails, and RuntimeError when another child
    process of this one has already ended (its peak would hide the job's).
    """
    if resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss != 0:
        raise RuntimeError(
            "measure_evaluate_memory must run before any other child process of this one ends, "
            "because ru_maxrss of RUSAGE_CHILDREN is the maximum over all of them"
        )

    with tempfile.TemporaryDirectory(prefix="specqa-memory-") as run_dir:
        command = [sys.executable, "evaluate.py", *overrides, f"hydra.run.dir={run_dir}"]
        logger.info("measuring the peak memory of: %s", " ".join(command))
        started = time.perf_counter()
        completed = subprocess.run(
            command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout_s,
            env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")},
        )
        wall_seconds = time.perf_counter() - started

    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-15:])
        raise JobFailedError(f"evaluate.py failed with exit status {completed.returncode}:\n{tail}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return JobMemory(peak_rss_mib=peak_kib / 1024, wall_seconds=wall_seconds, command=command)
