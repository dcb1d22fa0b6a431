"""The fault suite: long runs survive kills, a full disk and a second run on their workdir.

    pytest tests/test_faults.py -n 0 -s      # alone: about 3 minutes on 2 cores (189 s measured)

A short CosPlace + GRL run and a short triplet run on random 48 px images are each killed 10 times
with SIGKILL at random moments: when a step's batch is due, right after a checkpoint's save returned
(its files still being written in the background), inside Orbax's write of a checkpoint before the
step folder gets its name, inside the write of a classifier part once its step is complete (CosPlace),
and once from outside while a second run tries the same workdir (CosPlace; it must refuse). Once the disk fills during a save (the run must stop with a clear error and
leave its last checkpoint loadable). Each time the run resumes from its workdir; at the end its
parameters, classifiers and ``metrics.jsonl`` must be those of an uninterrupted run, bit for bit (CPU).

The fault plan comes from one seed, printed (``-s``) and taken from ``$JAXVPR_FAULT_SEED`` when set:
``JAXVPR_FAULT_SEED=<seed> pytest tests/test_faults.py -n 0 -s`` replays the plan (the steps the
resumes start from may still differ: they depend on when the background writes end). Runs are
subprocesses sharing a persistent XLA compilation cache, so that only the first one compiles.
"""

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import checkpoint_steps, final_params, tiny_cosplace_config, tiny_triplet_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests/scripts/faulty_run.py"
pytestmark = [pytest.mark.faults, pytest.mark.slow]

SEED = int(os.environ.get("JAXVPR_FAULT_SEED") or random.SystemRandom().randrange(2**32))


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _start(spec, root, workdir, fault, at, env, logs: Path):
    """The run in a subprocess, its output in ``logs``.out/.err (files: nothing blocks on a full pipe)."""
    out, err = open(f"{logs}.out", "w"), open(f"{logs}.err", "w")
    with out, err:
        return subprocess.Popen([sys.executable, str(SCRIPT), spec, str(root), str(workdir), fault, str(at)],
                                env=env, cwd=REPO, stdout=out, stderr=err, text=True)


def _output(logs: Path) -> tuple[str, str]:
    return Path(f"{logs}.out").read_text(), Path(f"{logs}.err").read_text()


def _run(spec, root, workdir, fault, at, env, logs: Path):
    proc = _start(spec, root, workdir, fault, at, env, logs)
    proc.wait(timeout=300)
    return (proc.returncode, *_output(logs))


def _save_steps(config, steps_per_epoch: int) -> list[int]:
    """The steps a run saves at: every ``checkpoint_every`` steps inside an epoch, and every epoch's end."""
    t = config.train
    total = t.epochs * steps_per_epoch
    ends = {steps_per_epoch * (e + 1) for e in range(t.epochs)}
    return sorted(ends | {s for s in range(t.checkpoint_every, total, t.checkpoint_every) if s % steps_per_epoch})


def _records(workdir):
    """``metrics.jsonl`` without what depends on the clock."""
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in rows]


def _host_parts(workdir):
    """Every group classifier's latest version, as saved ({group: {key path: array}})."""
    import jax
    import orbax.checkpoint as ocp

    out = {}
    for folder in sorted((Path(workdir) / "host_parts").iterdir()):
        with ocp.CheckpointManager(folder, item_names=("part",)) as m:
            tree = m.restore(m.latest_step(), args=ocp.args.Composite(part=ocp.args.StandardRestore()))["part"]
        out[folder.name] = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    return out


def _assert_second_run_refused(make_config, root, workdir):
    from jaxvpr.train import train
    from jaxvpr.train.loop import WorkdirInUseError

    with pytest.raises(WorkdirInUseError, match=r"Another run is training in .*pid \d+.*another --workdir"):
        train(make_config(root), workdir)


def fault_chain(spec, make_config, steps_per_epoch, plan, root, tmp_path, env):
    """Runs the uninterrupted reference, then ``plan`` (faults, in order) on one workdir, then the resume
    that ends it; returns (reference workdir, faulted workdir, the log of what happened)."""
    config = make_config(root)
    total = config.train.epochs * steps_per_epoch
    saves = _save_steps(config, steps_per_epoch)
    rng = random.Random(SEED)
    log = [f"fault seed {SEED} (replay: JAXVPR_FAULT_SEED={SEED})"]

    straight = tmp_path / "straight"
    t0 = time.time()
    code, _, err = _run(spec, root, straight, "none", 0, env, tmp_path / "straight")
    assert code == 0, err[-3000:]
    assert checkpoint_steps(straight)[-1] == total
    log.append(f"uninterrupted run: {time.time() - t0:.0f} s")

    work = tmp_path / "faulted"
    kills = 0
    for n, fault in enumerate(plan):
        logs = tmp_path / f"run{n}"
        done = checkpoint_steps(work)[-1] if checkpoint_steps(work) else 0
        # Fault n lands soon (one of the next two saves, or within two steps) after the resume point
        # or after n / len(plan) of the run, whichever is later: the plan visits the whole run.
        # (A complete last step can still be skipped on resume: kill-in-part-write. Hence the min.)
        lo = min(max(done, n * total // len(plan)), total - 1)
        later_saves = [s for s in saves if s > lo and (fault != "disk-full" or s > saves[0])][:2]
        if fault == "kill-after-save":  # not the last save: it may complete before the kill lands
            later_saves = [s for s in later_saves if s < total]
        if fault in ("kill-after-save", "kill-in-write", "kill-in-part-write", "disk-full") and later_saves:
            at = rng.choice(later_saves)
        else:
            fault = "hold-at-step" if fault == "hold-at-step" else "kill-at-step"
            at = rng.randrange(lo, min(lo + 2, total))
        t0 = time.time()
        if fault == "hold-at-step":  # a second run on the workdir is refused; then SIGKILL from outside
            proc = _start(spec, root, work, fault, at, env, logs)
            while "HOLDING" not in _output(logs)[0]:
                assert proc.poll() is None, _output(logs)[1][-3000:]
                time.sleep(0.2)
            _assert_second_run_refused(make_config, root, work)
            proc.send_signal(signal.SIGKILL)
            code, err = proc.wait(), _output(logs)[1]
        else:
            code, _, err = _run(spec, root, work, fault, at, env, logs)
        if fault == "disk-full":  # a clear error; the last complete checkpoint (one at least) still loads
            from jaxvpr.checkpoint import load_model, read_meta

            assert code == 1, err[-3000:]
            assert "No space left on device" in err and f"Writing checkpoint step {at}" in err, err[-3000:]
            _, _, latest = read_meta(work / "checkpoints", "latest")
            assert latest < at
            load_model(work / "checkpoints", "latest")
        else:
            assert code == -signal.SIGKILL, err[-3000:]
            kills += 1
        log.append(f"{fault} at step {at} (latest checkpoint before: step {done}): {time.time() - t0:.0f} s")

    t0 = time.time()
    code, out, err = _run(spec, root, work, "none", 0, env, tmp_path / "final")
    assert code == 0, err[-3000:]
    assert "Resuming" in out
    log.append(f"final resume: {time.time() - t0:.0f} s; {kills} SIGKILLs survived")
    print("\n".join(log))
    return straight, work, kills


def _assert_same_run(straight, work):
    step_a, a = final_params(straight)
    step_b, b = final_params(work)
    assert step_a == step_b
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit
    # Every step logged once, with the uninterrupted run's values (epoch means over the whole epoch).
    assert _records(straight) == _records(work)
    ra, rb = (json.loads((w / "results.json").read_text()) for w in (straight, work))
    assert ra["test"] == rb["test"] and ra["best_epoch"] == rb["best_epoch"]


def test_cosplace_survives_ten_sigkills_a_full_disk_and_a_second_run(tiny_root, tmp_path, run_env):
    from jaxvpr.models.grl import grl_coefficient

    plan = ["kill-at-step", "kill-after-save", "kill-in-write"] * 3 + ["kill-in-part-write", "hold-at-step", "disk-full"]
    plan.remove("kill-in-write")  # 10 kills
    random.Random(SEED).shuffle(plan)
    straight, work, kills = fault_chain("helpers:tiny_cosplace_config", tiny_cosplace_config, 4, plan,
                                        tiny_root, tmp_path, run_env)
    assert kills == 10
    _assert_same_run(straight, work)
    a, b = _host_parts(straight), _host_parts(work)
    assert a.keys() == b.keys() == {"group_0", "group_1"}
    for g in a:
        for k in a[g]:
            np.testing.assert_array_equal(a[g][k], b[g][k], err_msg=f"{g} {k}")

    # What the uninterrupted run leaves: results, plot, TensorBoard, records of every step and epoch.
    assert (straight / "training.png").exists() and list((straight / "tensorboard").iterdir())
    records = _records(straight)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["grl_coeff"] for r in epochs] == pytest.approx([grl_coefficient(e, 3, 10.0) for e in range(3)])
    assert {"cosface_loss", "domain_loss", "disc_accuracy", "val/R@1"} <= set(epochs[0])
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert {"lr", "classifiers_lr", "grl_lr", "grl_coeff", "steps_averaged"} <= set(steps[0])


def test_triplet_survives_ten_sigkills_with_its_mined_triplets(tiny_root, tmp_path, run_env):
    plan = ["kill-at-step", "kill-in-write", "kill-after-save"] * 3 + ["kill-at-step"]  # 10 kills
    random.Random(SEED + 1).shuffle(plan)
    straight, work, kills = fault_chain("helpers:tiny_triplet_config", tiny_triplet_config, 4, plan,
                                        tiny_root, tmp_path, run_env)
    assert kills == len(plan)
    _assert_same_run(straight, work)


# ----------------------------------------------------------------------------- the pieces, without training
def test_metrics_are_fetched_one_step_late_and_a_resume_continues_their_sums():
    """``EpochMetrics`` fetches step k's metrics only once step k+1 is dispatched (logging never waits
    for the step just started), and its checkpointed sums make a resumed epoch log what an
    uninterrupted one logs."""
    from jaxvpr.train.loop import EpochMetrics

    events = []

    class Probe:  # a metric of step ``k`` that records when it is fetched
        def __init__(self, k):
            self.k = k

        def __float__(self):
            events.append(("fetch", self.k))
            return float(self.k) / 3

    def run(metrics, steps):
        records = []
        for k in steps:
            events.append(("dispatch", k))
            records.append(metrics.push({"loss": Probe(k)}, k - 1, k))
        records.append(metrics.flush())
        return [r for r in records if r is not None]

    straight = EpochMetrics(0, log_every=2, images_per_step=4)
    records = run(straight, range(1, 8))
    for k in range(1, 7):  # every fetch after the next step's dispatch
        assert events.index(("fetch", k)) > events.index(("dispatch", k + 1)), events
    assert [s for s, _ in records] == [2, 4, 6]
    assert records[1][1]["loss"] == pytest.approx((3 + 4) / 2 / 3) and records[1][1]["steps_averaged"] == 2

    first = EpochMetrics(0, log_every=2, images_per_step=4)
    part1 = run(first, range(1, 4))  # a checkpoint after step 3, mid-interval
    saved = json.loads(json.dumps(first.progress()))  # through the checkpoint's JSON
    resumed = EpochMetrics(0, log_every=2, images_per_step=4, saved=saved)
    part2 = run(resumed, range(4, 8))
    strip = lambda recs: [(s, {k: v for k, v in r.items() if k != "images_per_s"}) for s, r in recs]
    assert strip(part1 + part2) == strip(records)
    assert resumed.means() == straight.means() and resumed.images == straight.images == 28


def test_a_resumed_log_drops_the_records_after_its_checkpoint(tmp_path):
    from jaxvpr.train.logger import MetricsLogger, read_metrics

    log = MetricsLogger(tmp_path)
    for step in (1, 2, 3, 4):
        log.write("train", step, loss=float(step))
    log.write("epoch", 4, loss=2.5)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a line cut short by a kill
    log = MetricsLogger(tmp_path, resume_step=2)  # resumed from the checkpoint of step 2
    log.write("train", 3, loss=30.0)
    log.close()
    assert [(r["kind"], r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        ("train", 1, 1.0), ("train", 2, 2.0), ("train", 3, 30.0)]
    MetricsLogger(tmp_path).close()  # a new run (no checkpoint): nothing of an earlier attempt stays
    assert read_metrics(tmp_path) == []


def test_the_logger_writes_tensorboard_scalars_without_importing_torch(tmp_path):
    """tensorboardX imports torch (2.5 s) only to accept its tensors; the logger keeps it out, and torch
    stays importable afterwards (checked where the torch extra is installed)."""
    code = ("import importlib.util, sys\n"
            "from jaxvpr.train.logger import MetricsLogger\n"
            f"log = MetricsLogger({str(tmp_path)!r})\n"
            "log.write('train', 1, loss=0.5)\n"
            "log.close()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "if importlib.util.find_spec('torch') is not None:\n"
            "    import torch\n"
            "    assert torch.zeros(2).sum().item() == 0.0\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    from tensorboardX.proto.event_pb2 import Event

    (events,) = (tmp_path / "tensorboard").iterdir()
    data, records = events.read_bytes(), []
    while data:  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
        (length,) = struct.unpack("<Q", data[:8])
        records.append(Event.FromString(data[12:12 + length]))
        data = data[16 + length:]
    scalars = [(v.tag, v.simple_value, e.step) for e in records for v in e.summary.value]
    assert events.name.startswith("events.out") and scalars == [("train/loss", 0.5, 1)]


def test_the_workdir_lock_refuses_a_second_run_and_dies_with_its_process(tmp_path):
    from jaxvpr.train.loop import WorkdirInUseError, WorkdirLock

    code = f"from jaxvpr.train.loop import WorkdirLock\nwith WorkdirLock({str(tmp_path)!r}):\n" \
           "    print('held', flush=True)\n    import time; time.sleep(300)\n"
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(WorkdirInUseError, match=rf"pid {holder.pid} on .* another --workdir"):
            with WorkdirLock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with WorkdirLock(tmp_path):  # the dead run's lock is gone
        with pytest.raises(WorkdirInUseError):  # and this one holds it (even against this process)
            with WorkdirLock(tmp_path):
                pass


def test_the_deterministic_switch_compiles_the_step_with_xlas_deterministic_gpu_options(monkeypatch):
    """``train.deterministic``: the step is jitted with the options of ``DETERMINISTIC_XLA_FLAGS``
    (deterministic ops, no autotuning), which CPU accepts too (a GPU run cannot be checked here)."""
    import jax
    from types import SimpleNamespace

    from jaxvpr import parallel
    from jaxvpr.train import loop
    from jaxvpr.train.config import cosplace_config

    flags = dict(f.lstrip("-").split("=") for f in loop.DETERMINISTIC_XLA_FLAGS.split())
    assert flags == {k: str(v).lower() for k, v in loop.DETERMINISTIC_GPU_OPTIONS.items()}
    assert jax.jit(lambda x: x + 1, compiler_options=loop.DETERMINISTIC_GPU_OPTIONS)(1.0) == 2.0
    real_jit, seen = jax.jit, []
    monkeypatch.setattr(jax, "jit", lambda f, **kw: seen.append(kw.get("compiler_options")) or real_jit(f, **kw))
    for deterministic in (True, False):
        config = cosplace_config()
        config.train.deterministic = deterministic
        trainer = SimpleNamespace(mesh=parallel.make_mesh(), config=config, step_args=0,
                                  make_step=lambda: (lambda state, batch: (state, {})), shardings=lambda state: None)
        loop.Trainer.jit_step(trainer, None)
    assert seen == [loop.DETERMINISTIC_GPU_OPTIONS, None]
