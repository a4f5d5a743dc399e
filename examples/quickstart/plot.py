"""Draw the quickstart's reward curve (rollout and eval reward per step) from the driver's metrics JSONL."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


TITLE = "Kiln quickstart: GRPO on a + b (operands 0-19)"


def plot_rewards(metrics_file: str | Path, out_png: str | Path,
                 title: str = TITLE) -> dict[str, list[tuple[int, float]]]:
    """Write a PNG of rollout/reward_mean and eval/reward_mean by step; the plotted series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {"rollout/reward_mean": [], "eval/reward_mean": []}
    for line in Path(metrics_file).read_text().splitlines():
        row = json.loads(line)
        for key, points in series.items():
            if key in row:
                points.append((row["step"], row[key]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in series.items():
        if points:
            ax.plot(*zip(*points), marker="o" if key.startswith("eval") else None, markersize=3,
                    label=key.replace("/reward_mean", " reward"))
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return series


def main() -> None:
    """Command line: python -m examples.quickstart.plot [METRICS_JSONL [OUT_PNG]] (defaults under runs/quickstart)"""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics_file", nargs="?", default="runs/quickstart/metrics.jsonl",
                        help="train.py's --metrics-file (default %(default)s)")
    parser.add_argument("out_png", nargs="?", default="runs/quickstart/reward_curve.png",
                        help="the plot to write (default %(default)s)")
    parser.add_argument("--title", default=TITLE, help="the plot's title (default: the CPU quickstart's)")
    a = parser.parse_args()
    series = plot_rewards(a.metrics_file, a.out_png, title=a.title)
    rollout = [r for _, r in series["rollout/reward_mean"]]
    evals = series["eval/reward_mean"]
    if rollout:
        k = min(5, len(rollout))
        print(f"rollout reward: first {k} steps {sum(rollout[:k]) / k:.3f}, "
              f"last {k} steps {sum(rollout[-k:]) / k:.3f}, peak {max(rollout):.3f}")
    if evals:
        print(f"eval reward (held-out, greedy): step {evals[0][0]} {evals[0][1]:.3f} -> step {evals[-1][0]} "
              f"{evals[-1][1]:.3f}, best {max(r for _, r in evals):.3f}")
    print(f"plot: {a.out_png}")


if __name__ == "__main__":
    main()
