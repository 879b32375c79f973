"""How accuracy depends on the number of supervision steps, and what the Q-head's halting costs or saves:
the table, the summary line and the figure of ``python -m analysis.evaluate RUN --steps ... --halt ...``
(the scoring is :class:`evaluators.depth.DepthEvaluation`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

DepthResults = dict[str, dict[int, dict[str, float]]]
"""``{rule: {budget: {metric: value}}}`` as :meth:`evaluators.depth.DepthEvaluation.result` returns it."""

ACCURACY = "eval/exact_accuracy"
RULE_LABELS = {"max": "run to the budget (max)", "q": "halt when the Q-head says so (q)"}


def depth_table(results: DepthResults) -> list[str]:
    """One line per budget: each rule's exact accuracy with its Wilson interval, its mean steps, and every other metric.

    Example:
        >>> row = {"eval/exact_accuracy": 0.5, "eval/exact_accuracy_ci_low": 0.3, "eval/exact_accuracy_ci_high": 0.7, "mean_steps": 2.0}
        >>> print("\\n".join(depth_table({"max": {2: row}})))
        steps  max: exact [95% CI]        steps used
            2  0.5000 [0.3000, 0.7000]        2.00
    """
    rules = list(results)
    depths = sorted({depth for by_depth in results.values() for depth in by_depth})
    extra = sorted({key for by_depth in results.values() for row in by_depth.values() for key in row if key.startswith("ARC/")})
    header = "steps" + "".join(f"  {rule + ': exact [95% CI]':<24}  steps used" for rule in rules) + "".join(f"  {key:>12}" for key in extra)
    lines = [header]
    for depth in depths:
        line = f"{depth:>5}"
        for rule in rules:
            row = results[rule][depth]
            interval = f"{row[ACCURACY]:.4f} [{row[ACCURACY + '_ci_low']:.4f}, {row[ACCURACY + '_ci_high']:.4f}]"
            line += f"  {interval:<24}  {row['mean_steps']:>10.2f}"
        line += "".join(f"  {results[rules[0]][depth].get(key, float('nan')):>12.4f}" for key in extra)
        lines.append(line)
    return lines


def halting_summary(results: DepthResults, metric: str = ACCURACY) -> dict[str, Any]:
    """The best fixed depth (under ``max``) and, for each budget, what the Q-head's choice gives (under ``q``).

    Example:
        >>> results = {"max": {1: {"eval/exact_accuracy": 0.2, "mean_steps": 1.0}, 4: {"eval/exact_accuracy": 0.6, "mean_steps": 4.0}},
        ...            "q": {1: {"eval/exact_accuracy": 0.2, "mean_steps": 1.0}, 4: {"eval/exact_accuracy": 0.5, "mean_steps": 2.5}}}
        >>> halting_summary(results)["q_at_budget"][4]
        {'value': 0.5, 'mean_steps': 2.5, 'best_fixed_depth_within': 4, 'best_fixed_value_within': 0.6}
    """
    summary: dict[str, Any] = {"metric": metric}
    fixed = results.get("max", {})
    if fixed:
        best_depth = max(fixed, key=lambda depth: (fixed[depth][metric], -depth))
        summary["best_fixed_depth"] = {"steps": best_depth, "value": fixed[best_depth][metric]}
    if "q" in results:
        summary["q_at_budget"] = {}
        for budget, row in sorted(results["q"].items()):
            entry: dict[str, Any] = {"value": row[metric], "mean_steps": row["mean_steps"]}
            within = {depth: values for depth, values in fixed.items() if depth <= budget}
            if within:
                depth = max(within, key=lambda d: (within[d][metric], -d))
                entry.update(best_fixed_depth_within=depth, best_fixed_value_within=within[depth][metric])
            summary["q_at_budget"][budget] = entry
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary in words: the best fixed depth, and the Q-head's choice at the largest budget against it."""
    lines = []
    best = summary.get("best_fixed_depth")
    if best:
        lines.append(f"best fixed depth: {best['steps']} steps, {summary['metric']} {best['value']:.4f}")
    if summary.get("q_at_budget"):
        budget, entry = max(summary["q_at_budget"].items())
        line = f"Q-head halting within {budget} steps: {entry['value']:.4f} in {entry['mean_steps']:.2f} steps on average"
        if "best_fixed_depth_within" in entry:
            delta = entry["value"] - entry["best_fixed_value_within"]
            line += f" ({delta:+.4f} against the best fixed depth within the budget, {entry['best_fixed_depth_within']} steps)"
        lines.append(line)
    return lines


def plot_depth(results: DepthResults, path: Path, halt_max_steps: int) -> None:
    """Accuracy against steps, one line per halting rule with its Wilson interval shaded; ``halt_max_steps`` marked."""
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for rule, by_depth in results.items():
        depths = sorted(by_depth)
        values = [by_depth[d][ACCURACY] for d in depths]
        line = axes.plot(depths, values, marker="o", label=RULE_LABELS.get(rule, rule))[0]
        low = [by_depth[d][ACCURACY + "_ci_low"] for d in depths]
        high = [by_depth[d][ACCURACY + "_ci_high"] for d in depths]
        axes.fill_between(depths, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    axes.axvline(halt_max_steps, color="grey", linestyle=":", linewidth=1, label=f"halt_max_steps = {halt_max_steps}")
    axes.set_xscale("log", base=2)
    budgets = sorted({depth for by_depth in results.values() for depth in by_depth})
    axes.set_xticks(budgets, [str(depth) for depth in budgets])
    axes.minorticks_off()
    axes.set_xlabel("supervision steps (budget)")
    axes.set_ylabel("exact accuracy (95% Wilson interval)")
    lows = [row[ACCURACY + "_ci_low"] for by_depth in results.values() for row in by_depth.values()]
    axes.set_ylim(max(0.0, math.floor((min(lows) - 0.02) * 10) / 10), 1.0)  # from the lowest interval's decile, to 1
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize="small")
    figure.savefig(path, dpi=120)
