"""The CosPlace + GRL trainer: 1 vs 8 devices, exact resume after SIGKILL, NaN stop, configs and CLI.

Wiring tests: a small network (ResNet-18 cropped after layer3 + GeM, 64-d), 48x48 images from a
small random dataset in the community layout, a few steps.
"""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import final_params

REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update({"JAX_PLATFORMS": "cpu", **extra})
    return env


# ----------------------------------------------------------------------------- 1 vs 8 devices
def _run_steps(out, devices, fsdp=False):
    env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, str(REPO / "tests/scripts/train_steps.py"), str(out)] + (["--fsdp"] if fsdp else [])
    subprocess.run(cmd, check=True, env=env, cwd=REPO, timeout=600)
    return np.load(out)


@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path):
    one = _run_steps(tmp_path / "one.npz", 1)
    eight = _run_steps(tmp_path / "eight.npz", 8, fsdp=True)
    assert int(one["__devices__"]) == 1 and int(eight["__devices__"]) == 8
    np.testing.assert_allclose(one["__loss__"], eight["__loss__"], rtol=1e-5)
    for key in one.files:
        if key.startswith("__"):
            continue
        a, b = one[key], eight[key]
        # Adam moves near-zero-gradient coordinates by ~lr whatever the gradient's rounding, so
        # compare against the leaf's scale; BatchNorm running statistics must agree tightly.
        tol = 1e-5 if "batch_stats" in key else 1e-3
        assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(a)) + 1e-7, key


# ----------------------------------------------------------------------------- a tiny dataset
def _write_images(folder, n, rng, spread, size=48):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        e, nn, h = 500000 + rng.uniform(0, spread), 4000000 + rng.uniform(0, spread), rng.uniform(0, 360)
        img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"@{e:.2f}@{nn:.2f}@10@S@@@p{i}@@{h:.1f}@@@@@@.jpg")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinydata")
    rng = np.random.default_rng(0)
    _write_images(root / "images/train/database", 300, rng, spread=100)
    for split in ("val", "test"):
        _write_images(root / f"images/{split}/database", 24, rng, spread=60)
        _write_images(root / f"images/{split}/queries", 8, rng, spread=60)
    _write_images(root / "images/target/night", 16, rng, spread=60)
    return root


CONFIG_TEMPLATE = """
from jaxvpr.train.config import cosplace_config

def get_config():
    c = cosplace_config()
    c.data.root = {root!r}
    c.data.image_size = 48
    c.data.num_workers = 0
    c.data.target_folder = "images/target/night"
    c.model.backbone = "resnet18conv4"
    c.model.head = "gem"
    c.model.fc_output_dim = 64
    c.model.train_all_layers = True
    c.train.epochs = 2
    c.train.iterations_per_epoch = 4
    c.train.batch_size = 4
    c.train.lr = 1e-3
    c.train.groups_num = 2
    c.train.min_images_per_class = 1
    c.train.checkpoint_every = 2
    c.train.log_every = 1
    c.grl.enabled = True
    c.grl.target_batch_size = 4
    c.grl.source_to_discriminator = 4
    c.eval.batch_size = 8
    return c
"""


def _config_file(tmp_path, root):
    path = tmp_path / "tiny_config.py"
    path.write_text(CONFIG_TEMPLATE.format(root=str(root)))
    return path


def _load_config(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_parameters(tmp_path, tiny_root):
    from jaxvpr.train.cosplace import train
    from jaxvpr.models.grl import grl_coefficient

    config_path = _config_file(tmp_path, tiny_root)
    config = _load_config(config_path)

    # Uninterrupted run, in this process.
    straight = tmp_path / "straight"
    results = train(config, straight)
    assert set(results["test"]) == {"queries"} and (straight / "results.json").exists()
    assert (straight / "training.png").exists() and list((straight / "tensorboard").iterdir())
    records = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["grl_coeff"] for r in epochs] == pytest.approx([0.0, grl_coefficient(1, 2, 10.0)])
    assert {"cosface_loss", "domain_loss", "disc_accuracy", "val/R@1", "images_per_s"} <= set(epochs[0])
    train_rows = [r for r in records if r["kind"] == "train"]
    assert {"lr", "classifiers_lr", "grl_lr", "grl_coeff", "images_per_s"} <= set(train_rows[0])

    # The same run in a subprocess, killed with SIGKILL at a random moment after its first checkpoint.
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "jaxvpr.main", "--config", str(config_path),
                             "--workdir", str(killed)], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoints").is_dir() and any(p.name.isdigit() for p in (killed / "checkpoints").iterdir()):
            break
        time.sleep(0.2)
    time.sleep(random.Random().uniform(0.0, 3.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_at_kill = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps_at_kill, "the killed run wrote no checkpoint"

    # Resume (default behaviour for an existing workdir) and finish.
    train(config, killed)
    step_a, a = final_params(straight)
    step_b, b = final_params(killed)
    assert step_a == step_b == 8
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message_and_keeps_checkpoints(tmp_path, tiny_root):
    from jaxvpr.train.cosplace import NonFiniteLossError, train

    config = _load_config(_config_file(tmp_path, tiny_root))
    config.train.classifiers_lr = 1e30
    config.train.lr = 1e30
    config.train.checkpoint_every = 1
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, iteration \d"):
        train(config, tmp_path / "nan")
    step, params = final_params(tmp_path / "nan")
    assert all(np.isfinite(v).all() for v in params.values()), f"checkpoint {step} holds non-finite values"


# ----------------------------------------------------------------------------- configs and CLI
def _main(args, **env):
    return subprocess.run([sys.executable, "-m", "jaxvpr.main", *args], env=_env(**env), cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name, folder", [
    ("cosplace_sfxl", "sf_xl/processed/train"),
    ("grl_sfxl", "sf_xl/processed/train"),
    ("grl_tokyo", "sf_xl/processed/train"),
])
def test_thesis_configs_load_and_fail_clearly_without_data(tmp_path, name, folder):
    # Without model.init_checkpoint (the ImageNet or hub weights) they refuse to train frozen random stages,
    # before touching any data.
    r = _main(["--config", f"configs/{name}.py", "--workdir", str(tmp_path / "w")], JAXVPR_DATA=str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "init_checkpoint" in r.stderr and "frozen" in r.stderr, r.stderr[-2000:]
    # With every stage trainable, the missing dataset is the error, with the folder named.
    r = _main(["--config", f"configs/{name}.py", "--workdir", str(tmp_path / "w"),
               "--config.model.train_all_layers=True"], JAXVPR_DATA=str(tmp_path))
    assert r.returncode != 0
    assert folder in r.stderr and "does not exist" in r.stderr, r.stderr[-2000:]


def test_thesis_config_values():
    tokyo = _load_config(REPO / "configs/grl_tokyo.py")
    assert (tokyo.grl.lr, tokyo.grl.weight, tokyo.grl.gamma, tokyo.train.epochs) == (1e-2, 10.0, 10.0, 20)
    assert (tokyo.train.M, tokyo.train.alpha, tokyo.train.N, tokyo.train.L, tokyo.train.groups_num) == (10, 30, 5, 2, 8)
    assert (tokyo.train.lr, tokyo.train.classifiers_lr, tokyo.train.batch_size) == (1e-5, 1e-2, 32)
    assert (tokyo.grl.target_batch_size, tokyo.grl.source_to_discriminator) == (8, 8)
    assert tokyo.data.target_folder.endswith("tokyo247/images/test/queries")
    assert tokyo.train.iterations_per_epoch == 10_000 and tokyo.model.name == "cosplace_resnet18_512"


def test_unknown_config_field_is_an_error(tmp_path):
    r = _main(["--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.train.no_such_field=1"])
    assert r.returncode != 0 and "no_such_field" in r.stderr


# ----------------------------------------------------------------------------- guards (issue: frozen random stages, init, topology)
def test_frozen_random_stages_are_an_error_naming_them_and_the_fix(tmp_path, tiny_root):
    from jaxvpr.train.cosplace import train

    config = _load_config(_config_file(tmp_path, tiny_root))
    config.model.train_all_layers = False  # resnet18conv4 default: only layer3 trains, the rest random
    with pytest.raises(ValueError, match=r"frozen(.|\n)*init_checkpoint(.|\n)*train_all_layers") as info:
        train(config, tmp_path / "w")
    assert "layer1" in str(info.value) and "layer2" in str(info.value)


def test_init_checkpoint_checks_architecture_not_freezing_policy(tmp_path):
    import jax

    from jaxvpr.checkpoint import CheckpointError, save_model
    from jaxvpr.models import init_variables, model_config
    from jaxvpr.train.cosplace import load_init_checkpoint

    hub = model_config("cosplace_resnet18_512")  # CosPlace default: layer3+layer4 trainable
    variables = init_variables(hub, jax.random.key(0), image_size=(64, 64))
    save_model(tmp_path / "hub", hub, variables)
    # Training all stages from the converted hub model (CosPlace's --train_all_layers) is allowed.
    run = model_config("cosplace_resnet18_512", trainable_stages=None)
    loaded = load_init_checkpoint(str(tmp_path / "hub"), run, variables)
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(loaded)[0]), np.asarray(jax.tree.leaves(variables)[0]))
    # A free composition of the same architecture under another name is allowed too.
    free = model_config({"backbone": "resnet18", "head": "gem", "fc_output_dim": 512})
    load_init_checkpoint(str(tmp_path / "hub"), free, variables)
    # Another descriptor size is not.
    other = model_config("cosplace_resnet18_512", fc_output_dim=256)
    with pytest.raises(CheckpointError, match="fc_output_dim"):
        load_init_checkpoint(str(tmp_path / "hub"), other, init_variables(other, jax.random.key(0), image_size=(64, 64)))


def test_batch_sizes_not_divisible_by_the_topology_fail_before_any_work(tmp_path):
    code = textwrap.dedent("""
        import jax
        from jaxvpr import parallel
        from jaxvpr.train.config import cosplace_config
        from jaxvpr.train.cosplace import check_topology
        c = cosplace_config()
        c.grl.enabled = True
        c.train.batch_size = 32
        c.grl.target_batch_size = 12
        try:
            check_topology(c, parallel.make_mesh())
        except ValueError as e:
            print("ERROR", e)
        c.grl.target_batch_size = 16
        check_topology(c, parallel.make_mesh())
        print("OK 16")
    """)
    r = subprocess.run([sys.executable, "-c", code], env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERROR config.grl.target_batch_size=12 is not divisible by the 8 data-parallel devices" in r.stdout
    assert "target_batch_size=16" in r.stdout and "OK 16" in r.stdout
