"""Structured configs for run.py and evaluate.py, and the value checks Hydra cannot express.

The dataclasses below are registered in Hydra's ConfigStore as `specqa_schema`, which
`config/config.yaml` lists first in its defaults. Hydra then rejects a misspelled key or
a value of the wrong type while composing. `validate_config` checks the ranges and
choices and raises `ConfigError` with one line that names the key and the fix.
"""

import secrets
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from decoding.speculative import DRAFT_PROPOSALS
from experiments.models import ModelConfig

MODES = ("greedy", "beam", "speculative")
DRAFTERS = ("model", "prompt_lookup")
WANDB_MODES = ("offline", "online", "disabled")
DEFAULT_SPECULATIVE_LOG = "logs/speculative_debug.log"


class ConfigError(ValueError):
    """A config value outside its allowed range or choices; the message names the key and the fix."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32


@dataclass
class BeamConfig:
    num_beams: int = 3
    length_penalty: float = 1.0
    early_stopping: bool = False


@dataclass
class SpeculativeConfig:
    # an int >= 1, or "auto": chosen from the acceptance and draft cost of the first items
    k: Any = 4
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    # None: the draft uses the target's value
    draft_temperature: Optional[float] = None
    draft_top_k: Optional[int] = None
    draft_top_p: Optional[float] = None
    drafter: str = "model"
    draft_proposal: str = "sample"


@dataclass
class DatasetConfig:
    name: str = "qa30"
    path: str = "datasets/qa_dataset.json"
    limit: Optional[int] = None


@dataclass
class DebugConfig:
    render_input_text: bool = False
    # None or False: off; True: DEFAULT_SPECULATIVE_LOG; a string: that file
    speculative_log: Any = None
    traceback: bool = False


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "specqa"
    entity: Optional[str] = None
    # None: the sweep folder name in a multirun, no group for a single run
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class SpecQAConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    draft: ModelConfig = field(default_factory=ModelConfig)
    modes: list[str] = field(default_factory=lambda: list(MODES))
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    seed: int = 0
    system_prompt: Optional[str] = None
    batch_size: int = 1
    beam: BeamConfig = field(default_factory=BeamConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    prompts: list[str] = field(default_factory=list)
    debug: DebugConfig = field(default_factory=DebugConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore and the `specqa_unique` resolver (idempotent)."""
    ConfigStore.instance().store(name="specqa_schema", node=SpecQAConfig)
    if not OmegaConf.has_resolver("specqa_unique"):
        # cached per config object like Hydra's `now`, so every read of hydra.run.dir
        # in one process sees the same suffix
        OmegaConf.register_new_resolver("specqa_unique", lambda: secrets.token_hex(3), use_cache=True)


register_configs()


def validate_config(cfg: DictConfig, *, script: str = "evaluate") -> None:
    """Check every value whose range or choices the schema cannot express.

    Raises ConfigError naming the first bad key, its value and the fix.
    """
    _check_known_keys(cfg, SpecQAConfig, "")
    _check_modes(cfg.modes)
    _check_int(cfg.generation.max_new_tokens, "generation.max_new_tokens", minimum=1)
    _check_int(cfg.batch_size, "batch_size", minimum=1)
    if "beam" in cfg.modes:
        _check_int(cfg.beam.num_beams, "beam.num_beams", minimum=1)
    if "speculative" in cfg.modes:
        _check_speculative(cfg.speculative)
    if script == "evaluate" and cfg.dataset.limit is not None:
        _check_int(cfg.dataset.limit, "dataset.limit", minimum=1)
    if script == "run":
        _check_prompts(cfg.prompts)
    _check_choice(cfg.wandb.mode, "wandb.mode", WANDB_MODES)
    speculative_log_path(cfg.debug.speculative_log)


def _check_known_keys(node: Any, schema: type, prefix: str) -> None:
    """Raise ConfigError for a key that the schema does not define.

    Hydra rejects a misspelled key while composing, except one added with `+key=value`,
    which it appends to the structured config. Such a key would have no effect.
    """
    known = {item.name: item for item in fields(schema)}
    for key in node:
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(
                f"unknown key {name!r} (added with +{name}=...); it has no effect, so remove it or fix its "
                f"spelling (docs/USAGE.md lists the keys)"
            )
        child_schema = known[key].type
        if isinstance(child_schema, type) and is_dataclass(child_schema) and isinstance(node[key], DictConfig):
            _check_known_keys(node[key], child_schema, f"{name}.")


def _check_modes(modes: Any) -> None:
    if not modes:
        raise ConfigError(f"modes is empty; list at least one of {', '.join(MODES)} (e.g. modes=[greedy,speculative])")
    seen = set()
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r} in modes; choose from {', '.join(MODES)}")
        if mode in seen:
            raise ConfigError(f"mode {mode!r} is listed twice in modes={list(modes)}; list each mode once")
        seen.add(mode)


def _check_speculative(spec: DictConfig) -> None:
    if spec.k == "auto":
        _check_speculative_choices(spec)
        return
    if isinstance(spec.k, bool) or not isinstance(spec.k, int):
        raise ConfigError(f"speculative.k must be an integer >= 1 or 'auto', got {spec.k!r} (set speculative.k)")
    _check_int(spec.k, "speculative.k", minimum=1)
    _check_speculative_choices(spec)


def _check_speculative_choices(spec: DictConfig) -> None:
    _check_choice(spec.drafter, "speculative.drafter", DRAFTERS)
    _check_choice(spec.draft_proposal, "speculative.draft_proposal", DRAFT_PROPOSALS)
    for prefix in ("", "draft_"):
        temperature = spec[f"{prefix}temperature"]
        top_k = spec[f"{prefix}top_k"]
        top_p = spec[f"{prefix}top_p"]
        if temperature is not None and temperature < 0:
            raise ConfigError(
                f"speculative.{prefix}temperature must be >= 0 (0 means greedy), got {temperature} "
                f"(set speculative.{prefix}temperature)"
            )
        if top_k is not None and top_k < 0:
            raise ConfigError(
                f"speculative.{prefix}top_k must be >= 0 (0 turns top-k filtering off), got {top_k} "
                f"(set speculative.{prefix}top_k)"
            )
        if top_p is not None and not 0 < top_p <= 1:
            raise ConfigError(
                f"speculative.{prefix}top_p must be in (0, 1] (1 turns nucleus filtering off), got {top_p} "
                f"(set speculative.{prefix}top_p)"
            )


def _check_prompts(prompts: Any) -> None:
    if not prompts:
        raise ConfigError("prompts is empty; give at least one, e.g. prompts='[What is the capital of France?]'")
    for index, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ConfigError(f"prompts[{index}] is empty; remove it or write a question")


def _check_int(value: Any, key: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r} (set {key})")
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value} (set {key})")


def _check_choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r} (set {key})")


def speculative_log_path(value: Any) -> str | None:
    """Return the speculative debug log path chosen by `debug.speculative_log`, or None when off."""
    if value is None or value is False:
        return None
    if value is True:
        return DEFAULT_SPECULATIVE_LOG
    if isinstance(value, str) and value.strip():
        return value
    raise ConfigError(
        f"debug.speculative_log must be a file path, true (for {DEFAULT_SPECULATIVE_LOG}) or false, got {value!r}"
    )


# keys that change no stored record: which modes run, how many items, logging and debugging
_RESULT_NEUTRAL_KEYS = ("hydra", "modes", "prompts", "debug", "wandb")


def result_config(cfg: DictConfig) -> dict[str, Any]:
    """Return the resolved config without the keys that leave every stored record unchanged.

    A rerun into a folder that already has results must match this exactly.
    `modes`, `dataset.limit`, `prompts`, `debug` and `wandb` may differ, because each
    record stands for one (item, mode) pair whatever else runs. The settings of a
    mode that does not run still count, which keeps the rule simple.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in _RESULT_NEUTRAL_KEYS:
        container.pop(key, None)
    container.get("dataset", {}).pop("limit", None)
    return container
