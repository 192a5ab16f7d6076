"""Helpers for the tests that run evaluate.py and run.py: tiny model folders, composed configs, subprocesses.

The tiny target and draft are the same random Llama (tests/tiny.py) saved with a byte-level
ChatML tokenizer (tests/tiny_tokenizers.py), so speculative decoding at temperature 0
accepts every draft token. Outputs are random bytes, which do not contain the answers
to the first questions of qa30.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import experiments.schema  # noqa: F401 - registers the structured config before composing
from tiny import make_tiny_model
from tiny_tokenizers import make_tiny_tokenizer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "config"


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Save a tiny Llama with a ChatML tokenizer into `folder` with save_pretrained."""
    model = make_tiny_model("llama", seed=seed)
    tokenizer = make_tiny_tokenizer("chatml")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_overrides(model_dir: Path, *extra: str) -> list[str]:
    """Overrides for a quick run on the tiny model as both target and draft (no int8)."""
    return [
        f"model.name_or_path={model_dir}",
        f"draft.name_or_path={model_dir}",
        "draft.quantize=null",
        "generation.max_new_tokens=6",
        "beam.num_beams=2",
        "dataset.limit=2",
        *extra,
    ]


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose config/config.yaml with `overrides`, as evaluate.py would, without the hydra node."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: offline hub, no W&B prompts, one torch thread, plus `extra`."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    # The tiny models' matrices are too small to gain from a second thread, which only adds
    # synchronisation: a 3-question run took 5.2 s with one thread and 9.7 s with two (2-core CPU).
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(extra)
    return env


def start_cli(script: str, overrides: list[str], **env: str) -> subprocess.Popen:
    """Start `python <script> <overrides>` in the project root, SIGINT at its default disposition.

    A shell that starts pytest in the background ignores SIGINT for its children;
    resetting it lets the CLI's own KeyboardInterrupt handling run.
    """
    return subprocess.Popen(
        [sys.executable, script, *overrides],
        cwd=PROJECT_ROOT,
        env=cli_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def run_cli(script: str, overrides: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run `python <script> <overrides>` to completion and return its exit status and output."""
    process = start_cli(script, overrides, **env)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    """Return stderr without the progress bars and library warnings that are not the CLI's own output."""
    noise = ("Loading weights", "Writing model shards", "UserWarning", "warnings.warn", "quantize_per_tensor",
             "torchao", "_pytree.py", "qweight =")
    return [line for line in result.stderr.splitlines() if line.strip() and not any(n in line for n in noise)]
