"""Speed benchmark: our decoders against transformers `generate`, on real QA prompts.

    python -m benchmarks.speed                        # defaults: SmolLM2-135M and its config draft
    python -m benchmarks.speed --k 4 --repeats 5 --num-prompts 20
    python -m benchmarks.speed --device cuda --dtype bfloat16

One process, one run: after a warm-up call of each method, every method decodes the
same rendered prompts `--repeats` times, and the median total wall time counts.
Compared pairs (tokens per second as a ratio of totals, and identical outputs):

- greedy: ours against transformers `generate(do_sample=False)`;
- beam: ours against transformers `generate(num_beams=..., do_sample=False)`;
- speculative: ours against the target's greedy decoding (ours), and against
  transformers assisted generation with the same draft and k draft tokens per step
  (constant schedule, no confidence threshold), or transformers prompt lookup
  decoding for `--drafter prompt_lookup`.

It also reports the acceptance rate alpha, the draft cost c, the speedup Leviathan et
al.'s formula predicts from them, batched against unbatched evaluation throughput,
and the peak memory of evaluate.py. The JSON goes to `--out`, a table to stdout, and
the last line is `greedy_vs_hf=... beam_vs_hf=... spec_vs_greedy=... spec_vs_hf_assisted=...`.
The exit status is 1 when any compared outputs differ.
"""

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from benchmarks.batching import measure_batching
from benchmarks.memory import measure_evaluate_memory
from benchmarks.report import format_table, headline, target_checks
from benchmarks.timing import Method, Prompt, compare, time_methods
from decoding import beam_search, greedy_generate, speculative_generate
from decoding.prompt_lookup import PromptLookupDrafter
from decoding.speculative import CombinedDrafter, ModelDrafter, as_drafter
from experiments.auto_k import (
    DEFAULT_MAX_K,
    PROBE_ITEMS,
    AutoK,
    estimate_alpha,
    expected_speedup,
    has_draft_model,
    measure_step_costs,
)
from experiments.data import load_dataset
from experiments.generation import ModeRunner, model_source
from experiments.llama_drafter import LlamaDrafter, model_drafter
from experiments.models import LoadedModel, check_same_vocabulary, load_model
from experiments.prompts import render_prompt

logger = logging.getLogger("benchmarks.speed")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "config"
DATASETS = {"qa30": "datasets/qa_dataset.json", "nq_open": "datasets/nq_open_subset.jsonl"}
DRAFTERS = ("model", "prompt_lookup", "combined")
DRAFT_RUNNERS = ("lean", "lean-own-cache", "transformers")
# a 1-minute load average above this, before the run starts, means another process is busy
LOAD_WARNING = 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=None, help="target model preset in config/model (default: the config's)")
    parser.add_argument("--draft", default=None, help="draft model preset in config/draft (default: the config's)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override of config/config.yaml, e.g. model.name_or_path=/path "
                             "(repeatable; applied after the options above)")
    parser.add_argument("--drafter", choices=DRAFTERS, default="model",
                        help="draft tokens from the draft model, prompt lookup, or prompt lookup first and the model otherwise")
    parser.add_argument("--draft-runner", choices=DRAFT_RUNNERS, default="lean",
                        help="how a draft model runs: lean (LlamaDraftRunner where supported, reading the target's "
                             "KV cache), lean-own-cache (LlamaDraftRunner with its own prefill), or transformers "
                             "(the model's own forward pass)")
    parser.add_argument("--prompts", default="nq_open",
                        help="questions to time: qa30, nq_open, or a dataset file path (default: nq_open)")
    parser.add_argument("--num-prompts", type=int, default=10, help="number of questions to time, from the start of the file")
    parser.add_argument("--k", default="auto",
                        help="draft tokens per speculative step, or 'auto' (default) to choose k from alpha and c "
                             "measured on the first prompts, as speculative.k=auto does")
    parser.add_argument("--max-k", type=int, default=DEFAULT_MAX_K, help="largest k that --k auto considers")
    parser.add_argument("--probe-prompts", type=int, default=PROBE_ITEMS,
                        help="prompts whose acceptance --k auto measures")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs over all prompts; the median counts")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens per answer (default: the config's)")
    parser.add_argument("--num-beams", type=int, default=None, help="beams for beam search (default: the config's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for target and draft")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16, for the target (and an unquantized draft)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[10, 30],
                        help="batch sizes whose evaluation throughput is compared with batch size 1 on qa30")
    parser.add_argument("--skip-batching", action="store_true", help="do not measure batched evaluation")
    parser.add_argument("--memory-items", type=int, default=3,
                        help="qa30 questions for the evaluate.py run whose peak memory is measured")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure evaluate.py's peak memory")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "latest.json",
                        help="JSON file to write")
    args = parser.parse_args(argv)

    if args.k != "auto":
        try:
            args.k = int(args.k)
        except ValueError:
            parser.error(f"--k must be an integer >= 1 or 'auto', got {args.k!r}")
        if args.k < 1:
            parser.error(f"--k must be >= 1, got {args.k}")
    for name in ("num_prompts", "repeats", "memory_items", "max_k", "probe_prompts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.batch_size) < 2:
        parser.error(f"--batch-size values must be >= 2, got {args.batch_size}")
    return args


# --- set-up ---------------------------------------------------------------------------


def config_overrides(args: argparse.Namespace) -> list[str]:
    """Return the Hydra overrides of config/config.yaml that the options select."""
    overrides = []
    if args.target:
        overrides.append(f"model={args.target}")
    if args.draft:
        overrides.append(f"draft={args.draft}")
    if args.max_new_tokens:
        overrides.append(f"generation.max_new_tokens={args.max_new_tokens}")
    if args.drafter == "prompt_lookup":
        overrides.append("speculative.drafter=prompt_lookup")
    if args.num_beams:
        overrides.append(f"beam.num_beams={args.num_beams}")
    overrides += [f"model.device={args.device}", f"model.dtype={args.dtype}", f"draft.device={args.device}"]
    return overrides + list(args.override)


def compose_config(overrides: list[str]):
    """Compose config/config.yaml with `overrides`, as evaluate.py would."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def set_draft_dtype(cfg, dtype: str, overrides: list[str]) -> None:
    """Give the draft the benchmark's dtype, except a CPU draft quantized from float32 weights.

    On CUDA a quantized draft preset (int4 and int8 run on the CPU only) is loaded
    unquantized instead, with a warning. Each change is also appended to `overrides`,
    so that the evaluate.py run of the memory measurement loads the same draft.
    """
    changes = {}
    if cfg.draft.quantize is None:
        changes["dtype"] = dtype
    elif cfg.draft.device.startswith("cuda"):
        logger.warning(
            "draft preset %r is quantized (%s), which runs on CPU only; on %s the draft is loaded "
            "without quantization, in %s", cfg.draft.name, cfg.draft.quantize, cfg.draft.device, dtype,
        )
        changes.update(quantize=None, dtype=dtype)
    elif dtype != cfg.draft.dtype:
        logger.info("draft preset %r stays in %s, which its %s quantization needs", cfg.draft.name,
                    cfg.draft.dtype, cfg.draft.quantize)
    for key, value in changes.items():
        cfg.draft[key] = value
        overrides.append(f"draft.{key}={'null' if value is None else value}")


def load_prompts(source: str, count: int, tokenizer, system_prompt: str | None, device: torch.device) -> list[Prompt]:
    """Render the first `count` questions of a dataset with the chat template, one prompt each."""
    items = load_dataset(DATASETS.get(source, source), count)
    prompts = []
    for item in items:
        batch = render_prompt(tokenizer, [item.question], system_prompt)
        prompts.append(Prompt(item.question, batch["input_ids"].to(device), batch["attention_mask"].to(device)))
    return prompts


def build_drafter(kind: str, runner: str, draft_model: torch.nn.Module | None):
    """Return the drafter that `speculative_generate` gets for --drafter and --draft-runner.

    The default (--draft-runner lean) builds it as evaluate.py does.
    """
    if kind == "prompt_lookup":
        return PromptLookupDrafter()
    if runner == "transformers":
        model = ModelDrafter(draft_model)
    else:
        model = model_drafter(draft_model)
        if runner == "lean-own-cache" and isinstance(model, LlamaDrafter):
            model.share_target_cache = False
    if kind == "model":
        return model
    return CombinedDrafter(PromptLookupDrafter(), as_drafter(model))


def timed_draft(drafter):
    """Return the part of a drafter that runs a model, for measuring c, or None for prompt lookup."""
    if isinstance(drafter, CombinedDrafter):
        drafter = drafter.fallback
    return drafter if has_draft_model(drafter) else None


def describe_machine(device: torch.device) -> dict[str, Any]:
    """Return the CPU model, core count, torch threads, library versions and GPU name."""
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    machine = {
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return machine


# --- methods --------------------------------------------------------------------------


def build_methods(target, drafter, draft_model, runner: ModeRunner, args, k: int) -> list[Method]:
    """Return the timed methods: ours and transformers' greedy, beam and speculative decoding."""
    model = target.model
    cfg = runner.cfg
    common = dict(
        max_new_tokens=cfg.generation.max_new_tokens,
        eos_token_id=runner.eos_ids,
        pad_token_id=target.tokenizer.pad_token_id,
    )
    beam = dict(num_beams=cfg.beam.num_beams, length_penalty=cfg.beam.length_penalty, early_stopping=cfg.beam.early_stopping)

    def generated(output: torch.Tensor, prompt: Prompt) -> torch.Tensor:
        return output[:, prompt.input_ids.shape[1] :]  # (1, N)

    def hf_generate(prompt: Prompt, **kwargs) -> tuple[torch.Tensor, None]:
        with torch.inference_mode():
            output = model.generate(
                input_ids=prompt.input_ids, attention_mask=prompt.attention_mask, do_sample=False, **common, **kwargs
            )
        return generated(output, prompt), None

    def ours(decoder, **kwargs):
        def run(prompt: Prompt) -> tuple[torch.Tensor, dict]:
            new_ids, stats = decoder(model, prompt.input_ids, prompt.attention_mask, **common, **kwargs)
            return new_ids, stats.to_dict()

        return run

    def speculative(prompt: Prompt) -> tuple[torch.Tensor, dict]:
        new_ids, stats = speculative_generate(
            model, drafter, prompt.input_ids, prompt.attention_mask, k=k, temperature=0.0, **common
        )
        return new_ids, stats.to_dict()

    methods = [
        Method("greedy", ours(greedy_generate)),
        Method("hf_greedy", lambda prompt: hf_generate(prompt, num_beams=1)),
        Method("beam", ours(beam_search, **beam)),
        Method("hf_beam", lambda prompt: hf_generate(prompt, **beam)),
        Method("speculative", speculative),
    ]
    if args.drafter == "model":
        # the assistant reads its settings from its own generation config
        assistant_config = draft_model.generation_config
        assistant_config.num_assistant_tokens = k
        assistant_config.num_assistant_tokens_schedule = "constant"
        assistant_config.assistant_confidence_threshold = 0.0
        methods.append(Method("hf_assisted", lambda prompt: hf_generate(prompt, assistant_model=draft_model)))
    elif args.drafter == "prompt_lookup":
        methods.append(Method("hf_assisted", lambda prompt: hf_generate(prompt, prompt_lookup_num_tokens=k)))
    # NOTE: transformers has no drafter that combines prompt lookup with a draft model, so
    # --drafter combined has no hf_assisted baseline.
    return methods


def choose_k_auto(target, drafter, prompts: list[Prompt], runner: ModeRunner, args) -> dict[str, Any]:
    """Choose k as evaluate.py does for speculative.k=auto: alpha from the probe prompts, then c."""
    auto_k = AutoK(probe_items=min(args.probe_prompts, len(prompts)), max_k=args.max_k)
    for prompt in prompts[: auto_k.probe_items]:
        _, stats = speculative_generate(
            target.model, drafter, prompt.input_ids, prompt.attention_mask, k=auto_k.k, temperature=0.0,
            max_new_tokens=runner.cfg.generation.max_new_tokens, eos_token_id=runner.eos_ids,
        )
        auto_k.record(stats.accepted, stats.rejected)
    draft = timed_draft(drafter)
    c = 0.0 if draft is None else measure_step_costs(target.model, draft, prompts[0].input_ids, auto_k.probe_k).c
    auto_k.choose(c)
    return auto_k.chosen


# --- analysis -------------------------------------------------------------------------


def speculative_summary(stats: list[dict], k: int, step_costs, measured_speedup: float) -> dict[str, Any]:
    """Sum the speculative stats over prompts and set the predicted speedup beside the measured one."""
    totals = {key: sum(s[key] for s in stats) for key in ("accepted", "rejected", "drafted", "bonus_tokens",
                                                          "new_tokens", "verification_calls", "draft_forward_calls")}
    alpha = estimate_alpha(totals["accepted"], totals["rejected"])
    summary = {
        "k": k,
        **totals,
        # alpha: accepted / (accepted + rejected), the per-token acceptance probability of the formula
        "alpha": alpha,
        # acceptance_rate: accepted / drafted, where drafted also counts tokens after a rejection
        "acceptance_rate": totals["accepted"] / totals["drafted"] if totals["drafted"] else None,
        "mean_accepted_length": totals["new_tokens"] / totals["verification_calls"] if totals["verification_calls"] else None,
        "measured_speedup": measured_speedup,
    }
    if step_costs is None:
        c, verification_cost = 0.0, None
    else:
        c, verification_cost = step_costs.c, step_costs.verification_cost
        summary["step_costs"] = step_costs.to_dict()
    summary["c"] = c
    summary["verification_cost"] = verification_cost
    if alpha is not None:
        summary["predicted_speedup"] = expected_speedup(alpha, c, k)
        if verification_cost is not None:
            summary["predicted_speedup_with_verification_cost"] = expected_speedup(alpha, c, k, verification_cost)
    return summary


# --- main -----------------------------------------------------------------------------

COMPARED_PAIRS = {
    "greedy_vs_hf": ("greedy", "hf_greedy"),
    "beam_vs_hf": ("beam", "hf_beam"),
    "spec_vs_greedy": ("speculative", "greedy"),
    "spec_vs_hf_assisted": ("speculative", "hf_assisted"),
}


@dataclass
class Setup:
    """The loaded models, drafter, prompts and settings of one benchmark run."""

    cfg: Any
    overrides: list[str]
    device: torch.device
    target: LoadedModel
    draft_model: torch.nn.Module | None
    drafter: Any
    runner: ModeRunner
    prompts: list[Prompt]


def load_setup(args: argparse.Namespace, cfg, overrides: list[str], device: torch.device) -> Setup:
    """Load target and draft as evaluate.py does, build the drafter and render the timed prompts."""
    target = load_model(model_source(cfg.model, "model"))
    draft_model = None
    if args.drafter != "prompt_lookup":
        draft = load_model(model_source(cfg.draft, "draft"))
        check_same_vocabulary(target, draft)
        draft_model = draft.model
    return Setup(
        cfg=cfg,
        overrides=overrides,
        device=device,
        target=target,
        draft_model=draft_model,
        drafter=build_drafter(args.drafter, args.draft_runner, draft_model),
        runner=ModeRunner(cfg, target),
        prompts=load_prompts(args.prompts, args.num_prompts, target.tokenizer, cfg.system_prompt, device),
    )


def settings_record(args: argparse.Namespace, setup: Setup, k: int) -> dict[str, Any]:
    """Return the settings of the run as they go into the JSON."""
    cfg, draft = setup.cfg, timed_draft(setup.drafter)
    return {
        "target": cfg.model.name,
        "draft": cfg.draft.name if setup.draft_model is not None else None,
        "drafter": args.drafter,
        "draft_runner": type(draft).__name__ if draft is not None else None,
        "prompts": args.prompts,
        "num_prompts": len(setup.prompts),
        "k": k,
        "repeats": args.repeats,
        "max_new_tokens": cfg.generation.max_new_tokens,
        "num_beams": cfg.beam.num_beams,
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "system_prompt": cfg.system_prompt,
        "overrides": setup.overrides,
    }


def run_timed_comparisons(args: argparse.Namespace, setup: Setup, k: int, record: dict[str, Any]) -> bool:
    """Time all methods, compare the pairs and summarise speculative decoding into `record`.

    Returns whether every compared pair has identical outputs and every method repeated its own.
    """
    # draft cost: 1-token passes of target and drafter and the target's (k+1)-token pass
    step_costs = None
    draft = timed_draft(setup.drafter)
    if draft is not None:
        step_costs = measure_step_costs(setup.target.model, draft, setup.prompts[0].input_ids, k)

    methods = build_methods(setup.target, setup.drafter, setup.draft_model, setup.runner, args, k)
    results = time_methods(
        methods, setup.prompts, repeats=args.repeats, eos_ids=setup.runner.eos_ids, device=setup.device
    )
    comparisons = {key: compare(results, *pair) for key, pair in COMPARED_PAIRS.items() if pair[1] in results}
    record["methods"] = {name: result.to_dict() for name, result in results.items()}
    record["comparisons"] = {key: comparison.to_dict() for key, comparison in comparisons.items()}
    record["speculative"] = speculative_summary(
        results["speculative"].stats, k, step_costs, comparisons["spec_vs_greedy"].ratio
    )
    identical = all(comparison.identical for comparison in comparisons.values())
    return identical and all(result.deterministic for result in results.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    record: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "benchmarks.speed", *(sys.argv[1:] if argv is None else argv)]),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_start": os.getloadavg(),
    }
    if record["load_average_start"][0] > LOAD_WARNING:
        logger.warning(
            "the 1-minute load average is %.2f: other processes share the CPU, so the timings are unreliable",
            record["load_average_start"][0],
        )
    # the memory measurement runs evaluate.py with these overrides, so with the config's own k
    overrides = config_overrides(args)
    cfg = compose_config([*overrides, f"speculative.k={args.k}"])
    set_draft_dtype(cfg, args.dtype, overrides)
    device = torch.device("cuda" if args.device.startswith("cuda") else "cpu")

    # memory first: it must be the first child process to end (see benchmarks/memory.py)
    if not args.skip_memory:
        memory_overrides = [*overrides, "dataset=qa30", f"dataset.limit={args.memory_items}"]
        record["memory"] = measure_evaluate_memory(memory_overrides).to_dict()

    # models and prompts, then k: given, or chosen from alpha and c measured on the first prompts
    setup = load_setup(args, cfg, overrides, device)
    record["machine"] = describe_machine(device)
    k = cfg.speculative.k
    if k == "auto":
        record["k_auto"] = choose_k_auto(setup.target, setup.drafter, setup.prompts, setup.runner, args)
        k = record["k_auto"]["k"]
    record["settings"] = settings_record(args, setup, k)

    all_identical = run_timed_comparisons(args, setup, k, record)

    # batched evaluation throughput on the 30 qa30 questions
    if not args.skip_batching:
        items = load_dataset(DATASETS["qa30"])
        record["batching"] = [
            result.to_dict()
            for mode in ("greedy", "beam")
            for result in measure_batching(setup.runner, items, mode, args.batch_size)
        ]

    if device.type == "cuda":
        record["gpu_peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    record["load_average_end"] = os.getloadavg()
    record["duration_s"] = time.perf_counter() - started
    record["targets"] = target_checks(record)
    record["all_outputs_identical"] = all_identical
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    logger.info("wrote %s", args.out)

    # the table and the headline are the command's output
    print(format_table(record))
    if not all_identical:
        print(f"ERROR: compared outputs differ; see 'comparisons' and 'methods' in {args.out}")
    print(headline(record))
    return 0 if all_identical else 1


if __name__ == "__main__":
    sys.exit(main())
