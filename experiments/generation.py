"""Generation with each decoding mode, shared by run.py and evaluate.py.

`ModeRunner` loads the target (and, for speculative decoding, the drafter) once,
renders questions with the chat template and returns, per question, the prompt and
output as text and token ids together with the decoder's stats.
"""

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from decoding import beam_search, greedy_generate
from decoding.prompt_lookup import PromptLookupDrafter
from decoding.speculative import SpeculativeStats, speculative_generate
from experiments.auto_k import AutoK, has_draft_model, measure_step_costs
from experiments.llama_drafter import model_drafter
from experiments.models import PACKAGED_GGUF_FILES, LoadedModel, check_same_vocabulary, load_model
from experiments.prompts import PromptError, render_prompt
from experiments.schema import ConfigError, speculative_log_path, validate_config

logger = logging.getLogger(__name__)


@dataclass
class ModeOutput:
    """One question's prompt and output under one decoding mode."""

    prompt_text: str
    prompt_token_ids: list[int]
    output_text: str
    output_token_ids: list[int]
    stats: dict[str, Any]


def item_seed(seed: int, item_id: str) -> int:
    """Derive the sampling seed of one item from the run seed, independent of run order and process.

    A sha256 of both values is used rather than `hash`, which Python salts per process.
    """
    digest = hashlib.sha256(f"{seed}\0{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ModeRunner:
    """The loaded models and settings of one run; `generate` runs one mode on a batch of questions."""

    def __init__(self, cfg: DictConfig, target: LoadedModel, draft: Any = None):
        self.cfg = cfg
        self.target = target
        self.draft = draft
        # speculative.k=auto: probe items first, then a k chosen from their acceptance and the draft cost
        self.auto_k = AutoK() if "speculative" in cfg.modes and cfg.speculative.k == "auto" else None
        if self.auto_k is not None:
            logger.info(
                "speculative.k=auto: the first %d items run at k=%d, then k is chosen from their "
                "acceptance rate and the measured draft cost", self.auto_k.probe_items, self.auto_k.probe_k,
            )
        self.eos_ids = _eos_ids(target)
        self.max_prompt_tokens = _max_prompt_tokens(target, cfg.generation.max_new_tokens)
        log_path = speculative_log_path(cfg.debug.speculative_log)
        self.speculative_log = Path(to_absolute_path(log_path)) if log_path else None
        if self.speculative_log is not None:
            self.speculative_log.parent.mkdir(parents=True, exist_ok=True)
            logger.info("speculative decoding steps are logged to %s", self.speculative_log)

    @classmethod
    def load(cls, cfg: DictConfig) -> "ModeRunner":
        """Load the target, and the drafter when speculative decoding runs."""
        target = load_model(model_source(cfg.model, "model"))
        draft = None
        if "speculative" in cfg.modes:
            if cfg.speculative.drafter == "model":
                draft_model = load_model(model_source(cfg.draft, "draft"))
                check_same_vocabulary(target, draft_model)
                draft = model_drafter(draft_model.model)
            else:
                draft = PromptLookupDrafter()
        return cls(cfg, target, draft)

    def check_prompts(self, questions: list[str], names: list[str]) -> None:
        """Render every question once before any generation, so a bad one fails early and by name."""
        for question, name in zip(questions, names):
            try:
                render_prompt(self.target.tokenizer, [question], self.cfg.system_prompt, max_length=self.max_prompt_tokens)
            except PromptError as error:
                # render_prompt numbers the prompts of its batch, and this batch holds only `name`
                message = str(error)
                if message.startswith("prompt 0 "):
                    raise PromptError(f"{name} {message.removeprefix('prompt 0 ')}") from error
                raise PromptError(f"{name}: {message}") from error

    def generate(self, mode: str, questions: list[str], item_ids: list[str]) -> list[ModeOutput]:
        """Generate the answers to `questions` with `mode`; speculative decoding takes them one at a time."""
        tokenizer = self.target.tokenizer
        batch = render_prompt(
            tokenizer,
            questions,
            self.cfg.system_prompt,
            max_length=self.max_prompt_tokens,
            log_text=self.cfg.debug.render_input_text,
        )
        device = self.target.model.device
        input_ids = batch["input_ids"].to(device)  # (B, T)
        attention_mask = batch["attention_mask"].to(device)  # (B, T)

        if mode == "speculative":
            rows = []
            for row, item_id in enumerate(item_ids):
                rows.append(self._speculative_row(input_ids[row : row + 1], attention_mask[row : row + 1], item_id))
        else:
            rows = self._batched(mode, input_ids, attention_mask)

        outputs = []
        for row, (new_ids, stats) in enumerate(rows):
            prompt_ids = input_ids[row][attention_mask[row].bool()].tolist()
            output_ids = self._trim_at_eos(new_ids)
            outputs.append(
                ModeOutput(
                    prompt_text=tokenizer.decode(prompt_ids, skip_special_tokens=False),
                    prompt_token_ids=prompt_ids,
                    output_text=tokenizer.decode(output_ids, skip_special_tokens=True).strip(),
                    output_token_ids=output_ids,
                    stats=stats,
                )
            )
        return outputs

    def _batched(self, mode: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[list[int], dict]]:
        """Run greedy or beam search on the whole batch and split the result into per-row stats."""
        common = dict(
            max_new_tokens=self.cfg.generation.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.target.tokenizer.pad_token_id,
        )
        if mode == "greedy":
            new_ids, stats = greedy_generate(self.target.model, input_ids, attention_mask, **common)
        elif mode == "beam":
            beam = self.cfg.beam
            new_ids, stats = beam_search(
                self.target.model, input_ids, attention_mask, num_beams=beam.num_beams,
                length_penalty=beam.length_penalty, early_stopping=beam.early_stopping, **common,
            )
        else:
            raise ConfigError(f"unknown mode {mode!r}; choose from greedy, beam, speculative")

        batch_size = new_ids.shape[0]
        batch_stats = stats.to_dict()
        rows = []
        for row in range(batch_size):
            row_ids = new_ids[row].tolist()
            row_stats = dict(batch_stats)
            if batch_size > 1:
                # NOTE: a batch shares its forward calls and wall time. Each row gets its own token
                # count and an equal share of the wall time; the other counters are the batch's.
                row_stats["new_tokens"] = len(self._trim_at_eos(row_ids))
                row_stats["wall_time_s"] = batch_stats["wall_time_s"] / batch_size
                row_stats["batch_size"] = batch_size
                if "sequence_scores" in batch_stats:
                    row_stats["sequence_scores"] = [batch_stats["sequence_scores"][row]]
            rows.append((row_ids, row_stats))
        return rows

    def _speculative_row(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, item_id: str) -> tuple[list[int], dict]:
        spec = self.cfg.speculative
        k = self.auto_k.k if self.auto_k is not None else spec.k
        generator = torch.Generator(device=input_ids.device).manual_seed(item_seed(self.cfg.seed, item_id))
        new_ids, stats = speculative_generate(
            self.target.model,
            self.draft,
            input_ids,
            attention_mask,
            k=k,
            max_new_tokens=self.cfg.generation.max_new_tokens,
            temperature=spec.temperature,
            top_k=spec.top_k,
            top_p=spec.top_p,
            draft_temperature=spec.draft_temperature,
            draft_top_k=spec.draft_top_k,
            draft_top_p=spec.draft_top_p,
            draft_proposal=spec.draft_proposal,
            eos_token_id=self.eos_ids,
            pad_token_id=self.target.tokenizer.pad_token_id,
            generator=generator,
            debug_log=self.speculative_log,
        )
        if self.auto_k is not None:
            self._update_auto_k(stats, input_ids[attention_mask.bool()][None])
        return new_ids[0].tolist(), stats.to_dict()

    def _update_auto_k(self, stats: SpeculativeStats, prompt: torch.Tensor) -> None:
        """Count a probe item for speculative.k=auto, and choose k once the probe items are done."""
        self.auto_k.record(stats.accepted, stats.rejected)
        if not self.auto_k.needs_choice:
            return
        c = 0.0
        if has_draft_model(self.draft):
            c = measure_step_costs(self.target.model, self.draft, prompt, self.auto_k.probe_k).c
        self.auto_k.choose(c)

    def _trim_at_eos(self, ids: list[int]) -> list[int]:
        """Cut a row after its first EOS token (kept), which drops the padding behind it."""
        for position, token_id in enumerate(ids):
            if token_id in self.eos_ids:
                return ids[: position + 1]
        return ids


def model_source(node: DictConfig, key: str) -> dict[str, Any]:
    """Return the model config to load, letting `name_or_path` replace a packaged preset's source.

    Packaged presets set `package` and `gguf_file` and never `name_or_path`. Both
    being set therefore means that `<key>.name_or_path=...` was given on top of such
    a preset, so the package is dropped and the given model is loaded. `gguf_file` is
    dropped too while it still names the package's own file, and kept when it was
    changed, so `name_or_path=<repo> gguf_file=<file>` loads that file of the repo.
    The model is then named by `name_or_path` in logs and errors, not by the preset.
    """
    config = OmegaConf.to_container(node, resolve=True)
    package = config.get("package")
    if package is not None and config.get("name_or_path") is not None:
        gguf_file = config.get("gguf_file")
        if gguf_file == PACKAGED_GGUF_FILES.get(package):
            gguf_file = None
        logger.info(
            "%s.name_or_path=%s replaces the packaged source of preset %r (package %s)%s",
            key, config["name_or_path"], config.get("name"), package,
            f", with gguf_file={gguf_file}" if gguf_file else "",
        )
        config.update(package=None, gguf_file=gguf_file, name=config["name_or_path"] or config.get("name"))
    return config


def _eos_ids(target: LoadedModel) -> list[int]:
    """Return the model's EOS ids: the generation config's (a chat model's end-of-turn) and the tokenizer's."""
    ids = []
    configured = getattr(target.model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids += [configured] if isinstance(configured, int) else list(configured)
    if target.tokenizer.eos_token_id is not None:
        ids.append(target.tokenizer.eos_token_id)
    return sorted(set(ids))


def _max_prompt_tokens(target: LoadedModel, max_new_tokens: int) -> int | None:
    """Return how many prompt tokens fit in the target's context with `max_new_tokens` after them."""
    context = getattr(target.model.config, "max_position_embeddings", None)
    if context is None:
        return None
    if max_new_tokens >= context:
        raise ConfigError(
            f"generation.max_new_tokens={max_new_tokens} leaves no room for a prompt in the context "
            f"of {target.name!r} ({context} tokens); set generation.max_new_tokens below {context}"
        )
    return context - max_new_tokens


@dataclass
class PromptAnswer:
    """run.py's output for one prompt under one mode."""

    index: int
    prompt: str
    mode: str
    output: ModeOutput


def run_prompts(cfg: DictConfig) -> list[PromptAnswer]:
    """Generate answers to every prompt of `cfg.prompts` with every mode of `cfg.modes`, in that order."""
    validate_config(cfg, script="run")
    runner = ModeRunner.load(cfg)
    prompts = list(cfg.prompts)
    runner.check_prompts(prompts, [f"prompts[{index}]" for index in range(len(prompts))])

    answers = []
    for mode in cfg.modes:
        batch_size = 1 if mode == "speculative" else cfg.batch_size
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            ids = [f"prompt-{index}" for index in range(start, start + len(batch))]
            outputs = runner.generate(mode, batch, ids)
            for row, (prompt, output) in enumerate(zip(batch, outputs)):
                answers.append(PromptAnswer(start + row, prompt, mode, output))
    return answers
