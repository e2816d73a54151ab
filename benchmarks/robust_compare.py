"""Issue 24's targets across runs: the worst run and the spread of each arm, per training and
test renderer, from the JSON files of ``benchmarks.robust_training``.

    python -m benchmarks.robust_compare benchmarks/results/robust_training.json \
        benchmarks/results/robust_training_wide.json ... [--json out.json]

Each run counts once at its last evaluated epoch, on held-out compositions (all queries where a
test set has none). For every (training renderer, arm, test renderer) it prints the reranked
t2v R@1 of each run, the worst, the spread (best - worst) and the smallest margin of a run over
its own broad view (the issue's "≥ broad + 25"). Writes the JSON and a plot beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def summarise(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (training renderer, arm, test renderer), runs in file order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for report in reports:
        trained_on = report["train_renderer"]
        for entry in report["runs"]:
            last = entry["eval"][max(entry["eval"], key=int)]
            for test_renderer, scores in last.items():
                picked = scores.get("heldout", scores["all"])
                groups.setdefault((trained_on, entry["arm"], test_renderer), []).append(
                    {"data_seed": entry["data_seed"], "seed": entry["seed"], **picked}
                )
    rows = []
    for (trained_on, arm, test_renderer), runs in groups.items():
        reranked = [r["reranked"] for r in runs]
        rows.append({
            "train_renderer": trained_on, "arm": arm, "test_renderer": test_renderer,
            "runs": runs, "worst": min(reranked),
            "spread": round(max(reranked) - min(reranked), 1),
            "min_margin_over_broad": round(min(r["reranked"] - r["broad"] for r in runs), 1),
        })  # fmt: skip
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["train_renderer"], r["test_renderer"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), sharey=True)
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (trained_on, tested_on) in zip(axes, panels, strict=True):
        chosen = [r for r in rows if (r["train_renderer"], r["test_renderer"]) == (trained_on, tested_on)]  # fmt: skip
        for x, row in enumerate(chosen):
            values = [run["reranked"] for run in row["runs"]]
            ax.scatter([x] * len(values), values, color="tab:orange", zorder=3)
            ax.scatter([x] * len(values), [run["broad"] for run in row["runs"]],
                       color="tab:blue", marker="x", zorder=3)  # fmt: skip
            ax.hlines(row["worst"], x - 0.3, x + 0.3, color="tab:red")
        ax.axhline(75, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(chosen)), [r["arm"] for r in chosen], rotation=45, ha="right")
        ax.set_xlim(-0.6, len(chosen) - 0.4)
        ax.set_ylim(0, 100)
        ax.set_title(f"trained on {trained_on}, tested on {tested_on}", fontsize=9)
    axes[0].set_ylabel("held-out t2v R@1")
    fig.suptitle(
        "each run: o reranked, x broad; red: the worst run; dotted: the target 75", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", help="robust_training JSON files")
    parser.add_argument("--json", default="benchmarks/results/robust_compare.json")
    args = parser.parse_args()
    reports = [json.loads(Path(p).read_text()) for p in args.reports]
    out = {"reports": args.reports, "rows": summarise(reports)}
    text = json.dumps(out, indent=1)
    Path(args.json).write_text(text + "\n")
    _plot(out["rows"], Path(args.json).with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
