"""The benchmark's table, its one-line headline and its checks against the speed targets."""

from typing import Any

# target ratios: ours over the baseline, higher is better
TARGETS = {
    "greedy_vs_hf": 1.0,
    "beam_vs_hf": 1.0,
    "spec_vs_greedy": 1.5,
}
BATCHING_TARGET = 3.0
PEAK_RSS_TARGET_MIB = 2048.0
HEADLINE_KEYS = ("greedy_vs_hf", "beam_vs_hf", "spec_vs_greedy", "spec_vs_hf_assisted")


def target_checks(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return, per target, the measured value, the target and whether it is met (with identical outputs)."""
    checks = {}
    for key, target in TARGETS.items():
        comparison = record["comparisons"].get(key)
        if comparison is not None:
            met = comparison["ratio"] >= target and comparison["identical"]
            checks[key] = {"value": comparison["ratio"], "target": f">= {target}", "met": met}
    for result in record.get("batching", []):
        checks[f"batched_{result['mode']}_{result['batch_size']}"] = {
            "value": result["ratio"], "target": f">= {BATCHING_TARGET}", "met": result["ratio"] >= BATCHING_TARGET,
        }
    if "memory" in record:
        peak = record["memory"]["peak_rss_mib"]
        checks["peak_rss_mib"] = {"value": peak, "target": f"<= {PEAK_RSS_TARGET_MIB:.0f}", "met": peak <= PEAK_RSS_TARGET_MIB}
    return checks


def headline(record: dict[str, Any]) -> str:
    """Return the last output line, e.g. `greedy_vs_hf=1.02 beam_vs_hf=1.10 spec_vs_greedy=1.48 ...`."""
    parts = []
    for key in HEADLINE_KEYS:
        comparison = record["comparisons"].get(key)
        value = "n/a" if comparison is None else f"{comparison['ratio']:.2f}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def _format_optional(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(record: dict[str, Any]) -> str:
    """Return the Markdown tables of throughput, comparisons, speculative analysis, batching and memory."""
    lines = ["| method | tokens | median s | tokens/s |", "|---|---:|---:|---:|"]
    for name, result in record["methods"].items():
        lines.append(f"| {name} | {result['tokens']} | {result['median_seconds']:.2f} | {result['tokens_per_second']:.1f} |")

    lines += ["", "| comparison | ratio | identical outputs |", "|---|---:|---|"]
    for key, comparison in record["comparisons"].items():
        identical = "yes" if comparison["identical"] else f"no (prompts {comparison['mismatched_prompts']})"
        lines.append(f"| {key} | {comparison['ratio']:.2f} | {identical} |")

    spec = record["speculative"]
    lines += [
        "",
        "| speculative | value |",
        "|---|---:|",
        f"| k | {spec['k']} |",
        f"| alpha = accepted / (accepted + rejected) | {_format_optional(spec['alpha'])} |",
        f"| accepted / drafted | {_format_optional(spec['acceptance_rate'])} |",
        f"| new tokens per verification | {_format_optional(spec['mean_accepted_length'], 2)} |",
        f"| c = draft step / target step | {_format_optional(spec['c'])} |",
        f"| (k+1)-token target pass / 1-token pass | {_format_optional(spec['verification_cost'], 2)} |",
        f"| predicted speedup (Leviathan et al.) | {_format_optional(spec.get('predicted_speedup'), 2)} |",
        f"| predicted, with the measured verification cost | "
        f"{_format_optional(spec.get('predicted_speedup_with_verification_cost'), 2)} |",
        f"| measured speedup over greedy | {spec['measured_speedup']:.2f} |",
    ]

    if "batching" in record:
        lines += ["", "| batched evaluation (qa30) | batch | items/s at 1 | items/s batched | ratio | same output |",
                  "|---|---:|---:|---:|---:|---:|"]
        for result in record["batching"]:
            lines.append(
                f"| {result['mode']} | {result['batch_size']} | {result['unbatched_items_per_second']:.2f} | "
                f"{result['batched_items_per_second']:.2f} | {result['ratio']:.2f} | "
                f"{result['identical_items']}/{result['items']} |"
            )
    if "memory" in record:
        lines += ["", f"evaluate.py peak RSS: {record['memory']['peak_rss_mib']:.0f} MiB ({record['memory']['method']})"]

    lines += ["", "| target | measured | required | met |", "|---|---:|---|---|"]
    for key, check in record["targets"].items():
        lines.append(f"| {key} | {check['value']:.2f} | {check['target']} | {'yes' if check['met'] else 'no'} |")
    return "\n".join(lines)
