"""Training step time over process and (simulated) device counts, with the same global batch.

    python bench/scaling.py                    # 1/2/4 devices x 1 process, 2 processes x 1/2 devices
    python bench/scaling.py --iterations 20 --image-size 128

Each row runs the demo recipe (CosPlace + GRL on the `tiny` synthetic city, ResNet-18 + GeM 512-d,
global batch 16 + 8 target images) for one epoch of ``--iterations`` steps with
``python -m jaxvpr.main`` -- several processes through ``launch/local_multiprocess.sh`` (127.0.0.1,
gloo collectives) -- and reads the per-step log of process 0 (``metrics.jsonl``). The step time is
the median wall time between consecutive logged steps after the first two (compilation and warm-up
excluded), input pipeline included. All processes share this machine's cores, so per-step time is
not expected to fall with more devices here: the table shows that every topology runs the same
program, and what the extra processes and collectives cost.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import load_line, machine_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def overrides(iterations: int, size: int) -> list[str]:
    return ["--config", "configs/demo.py", "--config.data.synthetic_preset=tiny",
            f"--config.data.image_size={size}", "--config.train.epochs=1",
            f"--config.train.iterations_per_epoch={iterations}", "--config.train.batch_size=16",
            "--config.train.groups_num=1", "--config.train.log_every=1", "--config.model.init_checkpoint=",
            "--config.model.train_all_layers=True", "--config.train.min_images_per_class=1",
            "--config.train.eval_before_training=False", "--config.data.test_queries=queries"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, devices: int, iterations: int, size: int, workdir: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)
    args = overrides(iterations, size) + ["--workdir", str(workdir)]
    start = time.time()
    if processes == 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        cmd = [sys.executable, "-m", "jaxvpr.main", *args]
    else:
        cmd = ["bash", str(REPO / "launch/local_multiprocess.sh"), str(processes), "--devices-per-process",
               str(devices), "--port", str(free_port()), *args]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{r.stderr[-3000:]}")
    wall = time.time() - start
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if r["kind"] == "train"]
    gaps = [b - a for a, b in zip(times[2:], times[3:])]
    return {"step_s": statistics.median(gaps), "min": min(gaps), "max": max(gaps), "wall_s": wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--topologies", nargs="+", default=["1x1", "1x2", "1x4", "2x1", "2x2"],
                    help="PROCESSESxDEVICES_PER_PROCESS")
    args = ap.parse_args()
    print(machine_line())
    print(f"CosPlace + GRL step, ResNet-18 + GeM 512-d, {args.image_size} px, global batch 16 + 8 target, "
          f"median of steps 4..{args.iterations}\n")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for topo in args.topologies:
            p, d = (int(x) for x in topo.split("x"))
            print(f"... {p} process(es) x {d} device(s)", file=sys.stderr, flush=True)
            results.append((p, d, run(p, d, args.iterations, args.image_size, Path(tmp) / topo)))
    base = results[0][2]["step_s"]
    print("| processes | devices per process | global devices | step s (min-max) | vs first row | run wall s |")
    print("|---|---|---|---|---|---|")
    for p, d, r in results:
        print(f"| {p} | {d} | {p * d} | {r['step_s']:.3f} ({r['min']:.3f}-{r['max']:.3f}) | "
              f"{r['step_s'] / base:.2f}x | {r['wall_s']:.0f} |")
    print()
    print(load_line())


if __name__ == "__main__":
    main()
