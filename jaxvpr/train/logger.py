"""Run logs: ``metrics.jsonl`` (one JSON object per line), TensorBoard event files, a PNG plot.

Only the main process (``jax.process_index() == 0``) writes; the others get a logger that drops
everything, so call sites need no ``if``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


def _summary_writer_class():
    """``tensorboardX.SummaryWriter``, imported without importing PyTorch.

    tensorboardX's writer module imports torch when it is installed (the torch extra), only to accept
    torch tensors as values; that import costs 2.5 s at every start of a run, a resumed one included.
    jaxvpr logs floats: while tensorboardX is imported, ``import torch`` is made to fail (a ``None``
    entry in ``sys.modules``, which tensorboardX's ``except ImportError`` expects), then torch is
    importable again as before. Where torch is already imported nothing is blocked.
    """
    import sys

    if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and TensorBoard.

    ``resume_step``: the run resumes from the checkpoint of that step, so the records of later steps
    (written by the killed run after its last checkpoint, and written again now) are dropped from
    ``metrics.jsonl`` and hidden in TensorBoard (``purge_step``): a resumed run's log holds every
    step once. None: a new run; whatever an earlier attempt left in the workdir is dropped.
    """

    def __init__(self, workdir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            path = self.workdir / "metrics.jsonl"
            truncate_records(path, -1 if resume_step is None else resume_step)
            self._file = open(path, "a", buffering=1)
            try:
                SummaryWriter = _summary_writer_class()
                self._tb = SummaryWriter(str(self.workdir / "tensorboard"),
                                         purge_step=0 if resume_step is None else resume_step + 1)
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
            self.enabled = False


def truncate_records(path: Path, last_step: int) -> None:
    """Keeps the records of steps <= ``last_step`` (and drops a line cut short by a kill)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


LOSSES = ("cosface_loss", "domain_loss", "triplet_loss")  # whichever the recipe logs


def plot_run(workdir: str | Path) -> Path | None:
    """``training.png``: losses and the discriminator's accuracy with the GRL coefficient per logged step
    (the picture of thesis Figs. 4.5/4.6; chance level dashed), recalls per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    steps = [r for r in records if r["kind"] == "train"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    if not epochs and not steps:
        return None
    panels = []  # (title, x label, records, keys)
    if steps:
        panels.append(("loss", "step", steps, [k for k in LOSSES if k in steps[0]]))
        panels.append(("discriminator accuracy / GRL coefficient", "step", steps,
                       [k for k in ("disc_accuracy", "grl_coeff") if k in steps[0]]))
        panels.append(("triplets violating the margin (share)", "step", steps,
                       [k for k in ("active_triplets",) if k in steps[0]]))
    elif epochs:
        panels.append(("loss", "epoch", epochs, [k for k in LOSSES if k in epochs[0]]))
    if epochs:
        recalls = sorted(k for k in epochs[0] if k.startswith("R@") or "/R@" in k)
        if len(recalls) > 8:  # many monitored sets x thresholds: the validation curves only
            recalls = [k for k in recalls if k.startswith("val/")]
        panels.append(("recall (%)", "epoch", epochs, recalls))
    panels = [p for p in panels if p[3]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (title, xlabel, rows, keys) in zip(axes[0], panels):
        x = [r["step"] if xlabel == "step" else r["epoch"] + 1 for r in rows]
        for k in keys:
            ax.plot(x, [r.get(k, float("nan")) for r in rows], marker="o" if xlabel == "epoch" else ".", label=k)
        if "disc_accuracy" in keys:
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance (2 domains)")
            ax.set_ylim(-0.02, 1.05)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(workdir) / "training.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
