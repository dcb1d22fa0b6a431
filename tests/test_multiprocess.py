"""Multi-process runs on one machine (jax.distributed on 127.0.0.1, gloo CPU collectives).

- 2 processes x 2 simulated devices train the demo recipe (on the `tiny` synthetic city, a few
  steps, a small network) and end with the same parameters as 1 process x 4 devices;
- evaluation split over 2 processes gives the same recalls as 1 process (descriptors streamed to disk);
- a killed process makes the survivor exit with an error within a bounded time;
- one-off work on process 0 (AdAGeo's DDDA) is waited for as long as it takes, and its error is passed on;
- the launch scripts' dry runs print the commands they would run.
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_same_training, final_params

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


def _env(**extra):
    env = dict(os.environ)
    for k in ("XLA_FLAGS", "JAXVPR_COORDINATOR", "JAXVPR_NUM_PROCESSES", "JAXVPR_PROCESS_ID"):
        env.pop(k, None)
    env.update({"JAX_PLATFORMS": "cpu", "PYTHON": sys.executable, **extra})
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The demo recipe (CosPlace + GRL, night target) cut down to a few steps of a small network.
DEMO_OVERRIDES = [
    "--config", "configs/demo.py",
    "--config.data.synthetic_preset=tiny",
    "--config.data.image_size=48",
    "--config.data.eval_resize=64",
    "--config.model.backbone=resnet18conv4",
    "--config.model.head=gem",
    "--config.model.fc_output_dim=64",
    "--config.model.init_checkpoint=",
    "--config.model.train_all_layers=True",
    "--config.train.min_images_per_class=1",
    "--config.train.epochs=2",
    "--config.train.groups_num=2",
    "--config.train.iterations_per_epoch=2",
    "--config.train.batch_size=8",
    "--config.train.eval_before_training=False",
    "--config.data.monitor=()",  # the test queries are compared at the end; no per-epoch monitor
    "--config.grl.target_batch_size=4",
    "--config.grl.source_to_discriminator=4",
]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, tiny_city):
    cache = str(Path(tiny_city).parent)  # the session's synthetic-city cache
    env = _env(JAXVPR_CACHE=cache)
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "jaxvpr.main", *DEMO_OVERRIDES, "--workdir", str(one)],
                   env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"), cwd=REPO,
                   check=True, timeout=600, capture_output=True)
    two = tmp_path / "two"
    r = subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh"), "2", "--devices-per-process", "2",
                        "--port", str(_free_port()), *DEMO_OVERRIDES, "--workdir", str(two)],
                       env=env, cwd=REPO, timeout=600, capture_output=True, text=True)
    assert r.returncode == 0 or _aborted_after_finishing(r), r.stderr[-3000:]
    assert "2 processes, 2 local / 4 global cpu devices" in r.stdout
    assert r.stdout.count("epoch 2/2") == 1, "only process 0 prints"

    step_1, a = final_params(one)
    step_2, b = final_params(two)
    assert step_1 == step_2 == 4
    # min_close 0.9, as the other topology tests: BatchNorm arrays have 64 channels, and a running mean
    # downstream of a weight that Adam moved by ~lr on one side only may differ (on an AVX-512 EPYC,
    # 2026-12-07: 2 of bn1's 64 running means, within the absolute bound).
    assert_same_training(a, b, min_close=0.9)
    # Same training curve and the same test recalls, written once by process 0.
    epochs = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()
                        if json.loads(l)["kind"] == "epoch"]
    for ea, eb in zip(epochs(one), epochs(two), strict=True):
        assert ea["cosface_loss"] == pytest.approx(eb["cosface_loss"], rel=1e-4)
        assert ea["domain_loss"] == pytest.approx(eb["domain_loss"], rel=1e-4)
    ra = json.loads((one / "results.json").read_text())
    rb = json.loads((two / "results.json").read_text())
    for q in ("queries", "queries_night"):
        # One query may cross a rank boundary with parameters ~1e-4 apart (on an AVX-512 EPYC,
        # 2026-12-07: R@20 92 against 90 of 50 queries); before, the recalls were equal to the digit.
        one_query = 100.0 / ra["test"][q]["num_queries"]
        assert ra["test"][q]["results"][0]["recall"] == pytest.approx(rb["test"][q]["results"][0]["recall"],
                                                                     abs=one_query + 1e-6)

    # Resume on another topology: the 2-process run's end-of-epoch-1 checkpoint, continued by one
    # process with one device, ends where the uninterrupted runs ended.
    three = tmp_path / "three"
    (three / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints" / "2", three / "checkpoints" / "2")
    shutil.copytree(two / "host_parts", three / "host_parts")  # the classifiers (each saved when it changed)
    r = subprocess.run([sys.executable, "-m", "jaxvpr.main", *DEMO_OVERRIDES, "--workdir", str(three)],
                       env=env, cwd=REPO, timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming" in r.stdout
    step_3, c = final_params(three)
    assert step_3 == 4
    assert_same_training(a, c, min_close=0.9)


# The triplet demo (indoor floors, mined triplets) cut down to a few steps of a small network.
TRIPLET_OVERRIDES = [
    "--config", "configs/triplet_demo.py",
    "--config.data.synthetic_preset=indoor_tiny",
    "--config.data.val_split=mall_b1",
    "--config.data.test_splits=station_b2",
    "--config.data.monitor=()",
    "--config.data.train_crop=48",
    "--config.data.image_size=48",
    "--config.data.eval_resize=64",
    "--config.model.backbone=resnet18conv4",
    "--config.model.head=gem",
    "--config.model.fc_output_dim=64",
    "--config.model.init_checkpoint=",
    "--config.model.train_all_layers=True",
    "--config.train.epochs=2",
    "--config.train.queries_per_epoch=16",
    "--config.train.cache_refresh_rate=8",
    "--config.train.neg_samples_num=100",
    "--config.train.eval_before_training=False",
    "--config.train.eval_random_init=False",
]


@pytest.mark.slow
def test_two_processes_mine_and_train_triplets_like_one(tmp_path, tiny_indoor):
    """Two processes mine one set of triplets (descriptors gathered across processes; the trainer
    checks that every process holds the same triplets and stops otherwise) and train, with the
    parameters FSDP-sharded across the processes' devices, a run like one process on as many devices. Not to the bit: the two topologies describe images with different
    batch splits, and near-tied descriptors of a random network can then rank two negatives the
    other way round, so the runs may mine a few different triplets."""
    env = _env(JAXVPR_CACHE=str(Path(tiny_indoor).parent))
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "jaxvpr.main", *TRIPLET_OVERRIDES, "--workdir", str(one)],
                       env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"), cwd=REPO,
                       timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"  # and the parameters FSDP-sharded over the 4 devices of the two processes
    r = subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh"), "2", "--devices-per-process", "2",
                        "--port", str(_free_port()), *TRIPLET_OVERRIDES, "--config.mesh.shard_params=True",
                        "--workdir", str(two)],
                       env=env, cwd=REPO, timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("epoch 2/2") == 1, "only process 0 prints"
    step_1, _ = final_params(one)
    step_2, _ = final_params(two)
    assert step_1 == step_2 == 8
    epochs = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()
                        if json.loads(l)["kind"] == "epoch"]
    # Epoch 1 (mined by the random network, then after 4 steps) stays close; once a few triplets differ,
    # the runs drift apart. Measured on the AVX-512 EPYC with XLA's own convolutions: 0.0829 vs 0.0832
    # in epoch 1, 0.123 vs 0.091 in epoch 2.
    (a1, a2), (b1, b2) = epochs(one), epochs(two)
    assert np.isfinite([b1["triplet_loss"], b2["triplet_loss"]]).all()
    assert a1["triplet_loss"] == pytest.approx(b1["triplet_loss"], rel=0.05)
    assert a2["triplet_loss"] == pytest.approx(b2["triplet_loss"], rel=0.5)
    ra = json.loads((one / "results.json").read_text())["test"]["queries"]["results"]
    rb = json.loads((two / "results.json").read_text())["test"]["queries"]["results"]
    assert [x["upper_bound"] for x in ra] == [x["upper_bound"] for x in rb]


@pytest.mark.slow
def test_two_process_evaluation_gives_the_same_recalls(tmp_path, tiny_city):
    split = Path(tiny_city) / "images" / "test"
    common = ["-m", "jaxvpr.evaluate", "--dataset", str(split), "--queries", "queries_night",
              "--model", "cosplace_resnet18_512", "--random-init", "--resize", "96,96",
              "--thresholds", "10,25", "--save-descriptors"]
    single = tmp_path / "single"
    subprocess.run([sys.executable, *common, "--out", str(single)], env=_env(), cwd=REPO, check=True,
                   timeout=600, capture_output=True)
    multi = tmp_path / "multi"  # descriptors streamed to disk, gathered in row chunks into each process's file
    _two_processes([*common, "--out", str(multi), "--descriptors-dir", str(multi)], reports="results.json")
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())  # no leftovers

    a = json.loads((single / "results.json").read_text())
    b = json.loads((multi / "results.json").read_text())
    assert a["num_queries"] == b["num_queries"] and a["num_database"] == b["num_database"]
    for ra, rb in zip(a["results"], b["results"], strict=True):
        assert ra["upper_bound"] == rb["upper_bound"]
        assert ra["recall"] == pytest.approx(rb["recall"], abs=1e-9)
    np.testing.assert_allclose(np.load(single / "database_descriptors.npy"),
                               np.load(multi / "database_descriptors.npy"), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.load(single / "predictions.npy")[:, :5],
                                  np.load(multi / "predictions.npy")[:, :5])


def _aborted_after_finishing(r: subprocess.CompletedProcess) -> bool:
    """A known flake, twice in about ten runs on a loaded 2-core machine: with the whole run done
    (process 0 printed "run finished", which needs every process's collectives to the end), a process
    aborts (SIGABRT, status 134) inside JAX's exit-time distributed shutdown (``api.clean_up``). The
    results are then complete and are checked below like any others; the abort itself is not ours to
    fix here (jaxvpr.cli.leave_distributed already shuts down before exit; not yet understood why a
    process still reached the exit-time shutdown)."""
    return r.returncode == 134 and "run finished" in r.stdout and "distributed.py" in r.stderr


def _spawn_two(args: list[str], **env) -> list[tuple[str, str]]:
    """Runs ``python ARGS`` as 2 processes on 127.0.0.1 (``env`` added to the environment); both must
    succeed. Returns each process's (stdout, stderr)."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *args], cwd=REPO,
                              env=_env(JAXVPR_COORDINATOR=f"127.0.0.1:{port}", JAXVPR_NUM_PROCESSES="2",
                                       JAXVPR_PROCESS_ID=str(i), **env),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    return outs


def _result(stdout: str):
    """The JSON a spawned script printed on its ``RESULT`` line."""
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


def _two_processes(args: list[str], reports: str) -> str:
    """:func:`_spawn_two`, where only process 0 prints ``reports`` (the name of its report file).
    Returns process 0's output."""
    outs = _spawn_two(args)
    assert reports in outs[0][0] and reports not in outs[1][0], "only process 0 reports"
    return outs[0][0]


# Both processes build AdAGeo's phase-2 trainer on one workdir: process 0 runs DDDA, the other waits at
# the barrier, then both read the same pseudo-targets and few-shot images.
ADAGEO_PHASE1 = """
import hashlib, json, sys
sys.path.insert(0, {tests!r})
from jaxvpr import cli, parallel
parallel.initialize()
import jax
from jaxvpr.data import format as fmt
from jaxvpr.train.adageo import AdAGeoTrainer
from test_adageo import tiny_adageo_config

trainer = AdAGeoTrainer(tiny_adageo_config({root!r}), {workdir!r})
folder = fmt.read_image_folder(trainer.phase1["pseudo_targets"]["images/train/queries"])
digest = hashlib.sha256(b"".join(open(p, "rb").read() for p in folder.abs_paths())).hexdigest()
print("RESULT " + json.dumps(dict(process=jax.process_index(), targets=list(trainer.phase1["target_images"]),
                                  domains=[(n, len(p)) for n, p in trainer.grl_domains], images=len(folder.paths),
                                  digest=digest, training=str(trainer.grl_domains[1][1][0]))), flush=True)
cli.leave_distributed()
"""


@pytest.mark.slow
def test_two_processes_share_adageo_phase_one(tmp_path, tiny_city):
    """Multi-host AdAGeo: one process trains DDDA and writes the pseudo-targets, the others wait for it
    (no second DDDA, no half-written folder read), and every process trains on the same domains."""
    code = ADAGEO_PHASE1.format(tests=str(REPO / "tests"), root=str(tiny_city), workdir=str(tmp_path / "run"))
    outs = _spawn_two(["-c", code], JAXVPR_CACHE=str(Path(tiny_city).parent))
    results = [_result(out) for out, _ in outs]
    assert [r["process"] for r in results] == [0, 1]
    a, b = results
    assert a["domains"] == b["domains"] == [["source queries", 50], ["pseudo-target queries", 50], ["target images", 5]]
    assert a["targets"] == b["targets"] and a["digest"] == b["digest"] and a["images"] == b["images"] == 50
    assert "/ddda/pseudo_targets/" in a["training"] and a["training"] == b["training"]
    assert "DDDA:" in outs[0][0] and "DDDA:" not in outs[1][0], "only process 0 trains DDDA"
    ddda = tmp_path / "run" / "ddda"
    assert json.loads((ddda / "results.json").read_text())["n_target"] == 5
    assert not list(ddda.rglob("*.tmp-*"))


# parallel.on_main_process: process 0 works, process 1 waits on the coordination service.
ON_MAIN = """
import json, time
from jaxvpr import cli, parallel
parallel.initialize()
import jax

def work(seconds, error=None):
    def fn():
        time.sleep(seconds)
        if error:
            raise ValueError(error)
        return "done"
    return fn

out = {{}}
out["ok"] = parallel.on_main_process(work({slow}), "ok")  # longer than Gloo's 30 s set-up limit
try:
    parallel.on_main_process(work(0.5, "corrupt image x.jpg"), "fails")
except Exception as e:
    out["fails"] = f"{{type(e).__name__}}: {{e}}"
try:
    parallel.on_main_process(work(3), "late", timeout_s=0.5)
except RuntimeError as e:
    out["late"] = str(e)
print("RESULT " + json.dumps(out), flush=True)
cli.leave_distributed()
"""


@pytest.mark.slow
def test_on_main_process_waits_and_passes_on_the_error():
    """The other processes wait for process 0's one-off work (AdAGeo's DDDA) as long as it takes, not
    Gloo's 30 s; an error on process 0 stops them with its message; their own limit gives a clear error."""
    slow = float(os.environ.get("JAXVPR_TEST_ON_MAIN_SECONDS", "2"))  # 35 shows the Gloo limit is gone
    outs = _spawn_two(["-c", ON_MAIN.format(slow=slow)])
    a, b = (_result(out) for out, _ in outs)
    assert a["ok"] == "done" and b["ok"] is None
    assert a["fails"] == "ValueError: corrupt image x.jpg"
    assert b["fails"] == ("RuntimeError: Process 0 failed at 'fails', so process 1 stops: "
                          "ValueError: corrupt image x.jpg")
    assert "late" not in a and b["late"].startswith("Process 1 waited 0.5 s for process 0 to finish 'late'")


@pytest.mark.slow
def test_two_process_benchmark_gives_the_same_tables_and_shares_the_cache(tmp_path, tiny_indoor):
    floor = sorted(p for p in Path(tiny_indoor).iterdir() if (p / "database").is_dir())[0]
    common = ["-m", "jaxvpr.benchmark", "--dataset", str(floor), "--thresholds", "1:5,10,25",
              "--model", "label=r18 model=cosplace_resnet18_512 random_init=true resize=64,64"]
    single = tmp_path / "single"
    subprocess.run([sys.executable, *common, "--out", str(single)], env=_env(), cwd=REPO, check=True,
                   timeout=600, capture_output=True)
    multi = tmp_path / "multi"
    assert "1 pairs described, 0 from the cache" in _two_processes([*common, "--out", str(multi)], "benchmark.md")
    a = json.loads((single / "benchmark.json").read_text())["results"]["r18"][floor.name]
    b = json.loads((multi / "benchmark.json").read_text())["results"]["r18"][floor.name]
    for ra, rb in zip(a["results"], b["results"], strict=True):
        assert ra["upper_bound"] == rb["upper_bound"]
        assert ra["recall"] == pytest.approx(rb["recall"], abs=1e-9)
    again = _two_processes([*common, "--out", str(multi)], "benchmark.md")
    assert "0 pairs described, 1 from the cache" in again  # both processes agree on the cache


DEATH_SCRIPT = """
import os, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jaxvpr import parallel
parallel.initialize()
print("ready", jax.process_index(), flush=True)
for i in range(100000):
    multihost_utils.process_allgather(np.array([i]))  # a collective each step, like a training loop
    time.sleep(0.05)
"""


@pytest.mark.slow
def test_a_dead_process_makes_the_others_exit_with_an_error(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(DEATH_SCRIPT)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=REPO,
                              env=_env(JAXVPR_COORDINATOR=f"127.0.0.1:{port}", JAXVPR_NUM_PROCESSES="2",
                                       JAXVPR_PROCESS_ID=str(i), JAXVPR_HEARTBEAT_TIMEOUT="10"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    # Wait until both processes are in the loop, then kill process 1 (not the coordinator).
    assert procs[1].stdout.readline().startswith("ready"), procs[1].stderr.read()[-2000:]
    time.sleep(1.0)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    start = time.time()
    try:
        _, err = procs[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("process 0 still runs 120 s after process 1 was killed")
    elapsed = time.time() - start
    assert procs[0].returncode != 0
    assert elapsed < 120
    # The error names the cause (a lost peer / failed collective), not just a crash.
    assert any(s in err for s in ("heartbeat", "unavailable", "UNAVAILABLE", "Connection", "connection",
                                  "peer", "closed", "DEADLINE", "task")), err[-3000:]


def test_local_multiprocess_dry_run():
    r = subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh"), "3", "--devices-per-process", "2",
                        "--port", "12345", "--dry-run", "--config", "configs/demo.py", "--workdir", "/tmp/w",
                        "--config.train.epochs=1"], env=_env(), cwd=REPO, capture_output=True, text=True,
                       check=True)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        argv = shlex.split(line)
        assert argv[0] == "env"
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in argv
        assert "JAXVPR_COORDINATOR=127.0.0.1:12345" in argv
        assert "JAXVPR_NUM_PROCESSES=3" in argv and f"JAXVPR_PROCESS_ID={i}" in argv
        assert argv[argv.index("-m") + 1] == "jaxvpr.main"
        assert argv[-5:] == ["--config", "configs/demo.py", "--workdir", "/tmp/w", "--config.train.epochs=1"]


def test_local_multiprocess_usage_error():
    r = subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh"), "--config", "x"], env=_env(), cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "NUM_PROCESSES" in r.stdout + r.stderr


def test_local_multiprocess_reports_a_failed_process(tmp_path):
    """A process that fails (here: an unknown config field) makes the launcher exit non-zero."""
    r = subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh"), "2", "--port", str(_free_port()),
                        "--config", "configs/demo.py", "--workdir", str(tmp_path),
                        "--config.train.no_such_field=1"], env=_env(), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert "no_such_field" in r.stderr


def test_tpu_pod_dry_run():
    r = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "--dry-run", "--config", "configs/grl_tokyo.py",
                        "--workdir", "/mnt/runs/grl tokyo"], cwd=REPO, capture_output=True, text=True, check=True,
                       env=_env(TPU_NAME="vpr-pod", ZONE="us-central2-b", ACCELERATOR="v4-32",
                                REPO="https://github.com/example/jaxvpr.git", REF="abc123", DATA="/mnt/data"))
    lines = [shlex.split(l) for l in r.stdout.strip().splitlines()]
    assert len(lines) == 3
    create, setup, run = lines
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and "vpr-pod" in create
    assert create[create.index("--accelerator-type") + 1] == "v4-32"
    assert create[create.index("--zone") + 1] == "us-central2-b"
    for cmd in (setup, run):
        assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in cmd
    setup_cmd = setup[setup.index("--command") + 1]
    assert "git clone -q https://github.com/example/jaxvpr.git jaxvpr" in setup_cmd
    assert "checkout -q abc123" in setup_cmd and "jaxvpr[tpu]" in setup_cmd
    run_cmd = run[run.index("--command") + 1]
    assert "export JAXVPR_DATA=/mnt/data" in run_cmd
    # The remote shell sees the arguments intact (the workdir with a space stays one argument).
    remote = shlex.split(run_cmd.split("&&", 1)[1])
    assert remote[:3] == ["~/jaxvpr-venv/bin/python", "-m", "jaxvpr.main"]
    assert remote[3:] == ["--config", "configs/grl_tokyo.py", "--workdir", "/mnt/runs/grl tokyo"]


def test_tpu_pod_needs_its_environment():
    env = _env()
    env.pop("TPU_NAME", None)
    r = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "--dry-run"], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "TPU_NAME" in r.stderr


@pytest.mark.parametrize("per, tasks, bind", [("gpu", "8", True), ("node", "1", False)])
def test_slurm_dry_run(per, tasks, bind):
    r = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--config", "configs/grl_tokyo.py",
                        "--workdir", "/shared/run"], cwd=REPO, capture_output=True, text=True, check=True,
                       env=_env(DRY_RUN="1", PER=per, SLURM_NNODES="2", SLURM_GPUS_PER_NODE="8", VENV="/opt/venv"))
    argv = shlex.split(r.stdout.strip())
    assert argv[0] == "srun" and "--nodes=2" in argv and f"--ntasks-per-node={tasks}" in argv
    assert ("--gpus-per-task=1" in argv) == bind
    assert "--kill-on-bad-exit=1" in argv
    assert argv[argv.index("-m") - 1] == "/opt/venv/bin/python" and argv[argv.index("-m") + 1] == "jaxvpr.main"
    assert argv[-4:] == ["--config", "configs/grl_tokyo.py", "--workdir", "/shared/run"]
