"""Runs a test training config and injects one fault at step N (the fault suite's and the resume tests' run).

    python tests/scripts/faulty_run.py MODULE:FUNCTION ROOT WORKDIR FAULT N

``MODULE:FUNCTION(ROOT)`` (a module of tests/) gives the config. FAULT:

- ``none``: runs to the end;
- ``kill-at-step``: SIGKILL when the batch of step N (0-based: N steps done) is due;
- ``kill-after-save``: SIGKILL as soon as the save of a step >= N returns, its files still being
  written in the background;
- ``kill-in-write``: SIGKILL inside Orbax's write of a checkpoint step >= N, before the step's
  folder gets its final name;
- ``kill-in-part-write``: SIGKILL inside the write of a host part (CosPlace's classifiers) of version
  >= N, once the checkpoint step of that version is complete (a step naming a part that is not);
- ``disk-full``: every file write of a checkpoint step >= N fails with ENOSPC (a full disk);
- ``hold-at-step``: prints ``HOLDING`` when step N's batch is due and waits to be killed from outside.

SIGKILL, not an exception: no ``finally``, no checkpoint flush, no cleanup runs, as when a job is
killed by a scheduler or the machine goes down.
"""

import errno
import importlib
import os
import re
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxvpr.checkpoint import TrainCheckpointer  # noqa: E402
from jaxvpr.train.loop import Trainer  # noqa: E402


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _checkpoint_step(path, workdir: Path) -> tuple[str, int] | None:
    """``(folder, step)`` of a path inside a checkpoint step of ``workdir`` (``checkpoints/7/...``,
    ``host_parts/group_1/7.orbax-checkpoint-tmp/...``, ``best/...``), else None."""
    try:
        parts = Path(path).absolute().relative_to(workdir).parts
    except ValueError:
        return None
    folder = parts[:2] if parts[:1] == ("host_parts",) else parts[:1]
    rest = parts[len(folder):]
    m = re.fullmatch(r"(\d+)(\.orbax-checkpoint-tmp.*)?", rest[0]) if rest else None
    return ("/".join(folder), int(m.group(1))) if m else None


def install(fault: str, at: int, workdir: Path) -> None:
    if fault in ("kill-at-step", "hold-at-step"):
        real_fit = Trainer.fit

        def fit(self):  # wraps this recipe's batches: the step counter is the loop's own
            real_batches = self.batches

            def batches(epoch, start, current_state):
                done = sum(self.steps_per_epoch(e) for e in range(epoch)) + start
                for n, item in enumerate(real_batches(epoch, start, current_state)):
                    if done + n == at:
                        if fault == "hold-at-step":
                            print("HOLDING", flush=True)
                            while True:
                                time.sleep(1)
                        _die()
                    yield item

            self.batches = batches
            return real_fit(self)

        Trainer.fit = fit
    elif fault == "kill-after-save":
        real_save = TrainCheckpointer.save

        def save(self, state, *args, **kwargs):
            real_save(self, state, *args, **kwargs)
            if int(state.step) >= at:
                _die()

        TrainCheckpointer.save = save
    elif fault in ("kill-in-write", "kill-in-part-write", "disk-full"):
        from orbax.checkpoint._src.path import async_path

        name = "write_text" if fault == "disk-full" else "rename"
        real = getattr(async_path, name)

        async def patched(path, *args, **kwargs):
            where = _checkpoint_step(path, workdir)
            if where is not None and where[1] >= at:
                if fault == "disk-full":
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                if fault == "kill-in-write" and where[0] == "checkpoints":  # its parts may be complete
                    _die()
                if fault == "kill-in-part-write" and where[0].startswith("host_parts/"):
                    for _ in range(600):  # the step's own folder first (its own thread)
                        if (workdir / "checkpoints" / str(where[1])).is_dir():
                            break
                        time.sleep(0.05)
                    _die()
            return await real(path, *args, **kwargs)

        setattr(async_path, name, patched)
    elif fault != "none":
        sys.exit(f"unknown fault {fault!r}")


def main(spec: str, root: str, workdir: str, fault: str, at: int) -> None:
    module, function = spec.split(":")
    config = getattr(importlib.import_module(module), function)(root)
    install(fault, at, Path(workdir).absolute())
    from jaxvpr.train import train

    train(config, workdir)
    if fault != "none":
        sys.exit(f"the run ended before its fault ({fault} at {at})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
