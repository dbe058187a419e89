"""One JSONL metrics file per run, and the loss-curve PNG drawn from it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per line. On resume, records past the resumed step are dropped,
    since those steps are about to be trained again."""

    def __init__(self, path: str | Path, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except (json.JSONDecodeError, AttributeError):
        return math.inf  # a line cut off by a kill


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = "training loss") -> Path:
    """Loss against step on a log scale, with a moving average to see the trend through the noise."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if "loss" in r and "step" in r]
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.plot(steps, losses, color="tab:blue", alpha=0.4, linewidth=1, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smoothed = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                    for i in range(len(losses))]
        axis.plot(steps, smoothed, color="tab:blue", linewidth=2, label=f"moving average ({window})")
    if losses and min(losses) > 0:
        axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("MSE loss")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    png_path = Path(png_path)
    figure.savefig(png_path)
    plt.close(figure)
    return png_path
