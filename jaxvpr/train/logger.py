"""Run logs: ``metrics.jsonl`` (one JSON object per line), TensorBoard event files, a PNG plot.

Only the main process (``jax.process_index() == 0``) writes; the others get a logger that drops
everything, so call sites need no ``if``.
"""

from __future__ import annotations

import json
import time
import math
from pathlib import Path


class MetricsLogger:
    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.workdir / "metrics.jsonl", "a", buffering=1)
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
            except ImportError:  # tensorboardX is a core dependency; tolerate its absence anyway
                self._tb = None

    def write(self, kind: str, step: int, **values) -> None:
        """One record: ``kind`` is "train" (per log interval), "epoch" or "eval"."""
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v) for k, v in values.items()}
        record = {"kind": kind, "step": int(step), "time": round(time.time(), 3), **clean}  # time: unix seconds
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}".replace("@", "_at_"), v, int(step))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(workdir: str | Path) -> Path | None:
    """PNG of losses, discriminator accuracy, GRL coefficient and recalls per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(workdir) if r["kind"] == "epoch"]
    if not records:
        return None
    epochs = [r["epoch"] for r in records]
    panels = [
        ("loss", [k for k in ("cosface_loss", "domain_loss") if k in records[0]]),
        ("discriminator accuracy / GRL coefficient", [k for k in ("disc_accuracy", "grl_coeff") if k in records[0]]),
        ("recall (%)", sorted(k for k in records[0] if k.startswith("R@") or "/R@" in k)),
    ]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            ax.plot(epochs, [r.get(k, float("nan")) for r in records], marker="o", label=k)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(workdir) / "training.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
