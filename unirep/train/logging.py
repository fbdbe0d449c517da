"""Metric logging: a wide CSV (``metrics.csv``), TensorBoard (``tb/``), a JSON of evaluations and a loss curve.

The CSV has one row per logged step and one column per metric; a metric seen for the first time (an evaluation
result) rewrites the header. A resumed run drops rows after the resumed step, so the file reads as one run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = ["MetricLogger", "plot_loss_curve", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a ``metrics.csv`` as dicts of floats, ``step`` an int (empty cells left out).

    A row that does not parse (the torn last line of a run killed while writing it) is skipped with a warning.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                parsed = {k: float(v) for k, v in row.items() if v not in ("", None)}
                if None in row or None in row.values() or "step" not in parsed:
                    raise ValueError("wrong number of cells")
            except (TypeError, ValueError) as err:
                warnings.warn(f"{path}:{line}: skipping a torn or malformed row ({err})", stacklevel=2)
                continue
            parsed["step"] = int(parsed["step"])
            rows.append(parsed)
    return rows


class MetricLogger:
    """Append metrics to ``out_dir/metrics.csv`` and TensorBoard; evaluations also to ``out_dir/metrics.json``."""

    def __init__(self, out_dir: str | os.PathLike, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / "metrics.csv"
        self.json_path = self.out_dir / "metrics.json"
        rows = read_metrics(self.csv_path) if resume_step is not None else []
        self.rows = [r for r in rows if r.get("step", 0) <= (resume_step or 0)]
        self.columns: list[str] = ["step"]
        for r in self.rows:
            self.columns += [k for k in r if k not in self.columns]
        self.evals: list[dict[str, Any]] = []
        if resume_step is not None and self.json_path.is_file():
            with open(self.json_path) as f:
                self.evals = [e for e in json.load(f).get("history", []) if e.get("step", 0) <= resume_step]
        self._rewrite()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported here: it is slow to import

            self.writer = SummaryWriter(log_dir=str(self.out_dir / "tb"), purge_step=resume_step)

    def _rewrite(self) -> None:
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.csv_path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new:
            self.columns += new
            self._rewrite()
        else:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)
        if self.writer is not None:
            for k, v in metrics.items():
                if math.isfinite(float(v)):
                    self.writer.add_scalar(k, float(v), step)

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        scalars = {
            f"eval/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if scalars:
            self.log(step, scalars)
        self.evals.append({"step": step, **{k: v for k, v in metrics.items() if _jsonable(v)}})
        tmp = self.json_path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump({"history": self.evals, "last": self.evals[-1]}, f, indent=1)
        os.replace(tmp, self.json_path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def plot_loss_curve(csv_path: str | os.PathLike, png_path: str | os.PathLike, key: str = "loss") -> Path | None:
    """Plot ``key`` against step from a ``metrics.csv`` into ``png_path``; None when there is nothing to plot."""
    rows = [r for r in read_metrics(csv_path) if key in r and math.isfinite(r[key])]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    values = [r[key] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(steps, values, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if min(values) > 0 and max(values) / min(values) > 20:  # a loss spanning decades reads better in log scale
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(f"{key} vs step")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
