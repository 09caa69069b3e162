"""What a run leaves for a person to read: ``metrics.jsonl`` (one line per logging step) and
``loss.png`` (the loss curve)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fila_cli.atomic_files import write_bytes_atomically

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop the records past ``last_step`` (and a torn last line): a resumed run writes each step once."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text().split("\n"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    write_bytes_atomically(path, "".join(line + "\n" for line in kept).encode())


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def plot_loss(run_dir: Path) -> Path | None:
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([r["step"] for r in records], [r["loss"] for r in records], linewidth=1.2)
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("loss (mean over answer tokens)")
    axis.set_title(f"{run_dir.name}")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path = run_dir / LOSS_PLOT
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
