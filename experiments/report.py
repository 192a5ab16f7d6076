"""Per-mode aggregates of the results records, the comparison table, report.md and the plots.

Every aggregate is defined where it is computed, in `summarize_mode`. Speeds and
speculative counters are ratios of totals over the mode's items (not means of
per-item ratios), so long answers weigh more than short ones.
"""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODE_COLUMNS = (
    ("mode", "mode"),
    ("n", "n"),
    ("accuracy ± SE", "accuracy"),
    ("EM", "em"),
    ("F1", "f1"),
    ("acceptance", "acceptance_rate"),
    ("mean accepted length", "mean_accepted_length"),
    ("fallbacks", "fallbacks"),
    ("tokens/s", "tokens_per_s"),
    ("speed vs greedy", "speed_vs_greedy"),
)


def summarize_mode(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate one mode's records (higher is better for every metric but `wall_time_s`).

    accuracy: mean of `contains` (the normalised answer occurs in the output);
        accuracy_se: its binomial standard error sqrt(p (1 - p) / n).
    em, f1: means of the per-item exact match and token F1.
    tokens_per_s: total new tokens / total wall time.
    acceptance_rate: total accepted / total drafted draft tokens (speculative only).
    mean_accepted_length: total new tokens / total target verification calls
        (speculative only); 1.0 means no gain over one token per target call.
    fallbacks: total tokens the target produced alone because the drafter proposed
        nothing (prompt lookup without a match, or one token left to generate).
    """
    n = len(records)
    stats = [record["stats"] for record in records]
    accuracy = sum(record["contains"] for record in records) / n
    new_tokens = sum(item["new_tokens"] for item in stats)
    wall_time = sum(item["wall_time_s"] for item in stats)
    summary: dict[str, Any] = {
        "n": n,
        "accuracy": accuracy,
        "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / n),
        "em": sum(record["em"] for record in records) / n,
        "f1": sum(record["f1"] for record in records) / n,
        "new_tokens": new_tokens,
        "wall_time_s": wall_time,
        "tokens_per_s": new_tokens / wall_time if wall_time > 0 else None,
        "target_forward_calls": sum(item["target_forward_calls"] for item in stats),
        "acceptance_rate": None,
        "mean_accepted_length": None,
        "fallbacks": None,
    }

    if all("drafted" in item for item in stats):
        drafted = sum(item["drafted"] for item in stats)
        accepted = sum(item["accepted"] for item in stats)
        verification_calls = sum(item["verification_calls"] for item in stats)
        summary.update(
            drafted=drafted,
            accepted=accepted,
            verification_calls=verification_calls,
            draft_forward_calls=sum(item["draft_forward_calls"] for item in stats),
            cache_refills=sum(item["cache_refills"] for item in stats),
            acceptance_rate=accepted / drafted if drafted else None,
            mean_accepted_length=new_tokens / verification_calls if verification_calls else None,
            fallbacks=sum(item["undrafted_tokens"] for item in stats),
        )
    return summary


def summarize(records_by_mode: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Aggregate each mode and add `speed_vs_greedy`.

    speed_vs_greedy: the mode's tokens_per_s / greedy's tokens_per_s, each a ratio of
    totals over the same items; None when greedy did not run.
    """
    summaries = {mode: summarize_mode(records) for mode, records in records_by_mode.items() if records}
    greedy_speed = summaries.get("greedy", {}).get("tokens_per_s")
    for summary in summaries.values():
        speed = summary["tokens_per_s"]
        summary["speed_vs_greedy"] = speed / greedy_speed if speed is not None and greedy_speed else None
    return summaries


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Return the per-mode table as GitHub markdown, "-" where a metric does not apply."""
    header = "| " + " | ".join(title for title, _ in MODE_COLUMNS) + " |"
    rule = "|" + "|".join("---" if key == "mode" else "---:" for _, key in MODE_COLUMNS) + "|"
    rows = [header, rule]
    for mode, summary in summaries.items():
        cells = [_format_cell(key, mode, summary) for _, key in MODE_COLUMNS]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _format_cell(key: str, mode: str, summary: dict[str, Any]) -> str:
    if key == "mode":
        return mode
    value = summary.get(key)
    if value is None:
        return "-"
    if key == "accuracy":
        return f"{value:.3f} ± {summary['accuracy_se']:.3f}"
    if key in ("n", "fallbacks"):
        return str(value)
    if key == "tokens_per_s":
        return f"{value:.1f}"
    if key in ("speed_vs_greedy", "mean_accepted_length"):
        return f"{value:.2f}x" if key == "speed_vs_greedy" else f"{value:.2f}"
    return f"{value:.3f}"


TABLE_NOTES = """\
- accuracy: share of answers whose output contains an accepted answer after SQuAD
  normalisation, on token boundaries; ± is the binomial standard error.
- EM: the whole output equals an accepted answer after normalisation. F1: token F1,
  best over the accepted answers.
- acceptance: accepted / drafted draft tokens; mean accepted length: new tokens per
  target verification call; fallbacks: tokens the target produced with no draft.
  All three are totals over the items and apply to speculative decoding only.
- tokens/s: total new tokens / total wall time; speed vs greedy: tokens/s divided by
  greedy's tokens/s (higher is faster).
"""


def write_report(path: Path, title: str, summaries: dict[str, dict[str, Any]], details: Sequence[str] = ()) -> None:
    """Write report.md: the title, the run details, the table and how to read it."""
    lines = [f"# {title}", ""]
    lines += [f"- {detail}" for detail in details]
    lines += ["", format_table(summaries), "", TABLE_NOTES]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot_modes(run_dir: Path, summaries: dict[str, dict[str, Any]]) -> list[Path]:
    """Write accuracy.png (accuracy ± SE per mode) and acceptance.png (speculative acceptance and speed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(summaries)
    written = []

    # accuracy per mode with standard-error bars
    figure, axes = plt.subplots(figsize=(5, 3.5))
    axes.bar(modes, [summaries[m]["accuracy"] for m in modes],
             yerr=[summaries[m]["accuracy_se"] for m in modes], capsize=4, color="tab:blue")
    axes.set_ylim(0, 1)
    axes.set_ylabel("accuracy (contains)")
    axes.set_title("QA accuracy per decoding mode")
    written.append(_save(figure, run_dir / "accuracy.png"))

    # acceptance rate and tokens/s per mode; modes without drafts show no acceptance bar
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
    left.bar(modes, [summaries[m]["acceptance_rate"] or 0.0 for m in modes], color="tab:green")
    left.set_ylim(0, 1)
    left.set_ylabel("acceptance rate")
    left.set_title("draft acceptance")
    right.bar(modes, [summaries[m]["tokens_per_s"] or 0.0 for m in modes], color="tab:orange")
    right.set_ylabel("tokens / s")
    right.set_title("decoding speed")
    written.append(_save(figure, run_dir / "acceptance.png"))
    return written


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
