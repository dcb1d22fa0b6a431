"""The CosPlace + GRL trainer: 1 vs 8 devices, FSDP over groups of different sizes, NaN stop, configs and CLI.

Exact resume after SIGKILLs, a full disk and a second run on the workdir: tests/test_faults.py.

Wiring tests: a small network (ResNet-18 cropped after layer3 + GeM, 64-d), 48x48 images from a
small random dataset in the community layout, a few steps.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_same_training, final_params, tiny_cosplace_config

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


def _fsdp_groups(tiny_root, workdir, devices):
    out = workdir.with_suffix(".json")
    env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    r = subprocess.run([sys.executable, str(REPO / "tests/scripts/fsdp_groups.py"), str(tiny_root), str(workdir),
                        str(out)], env=env, cwd=REPO, timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_fsdp_trains_groups_of_different_class_counts_with_one_compilation(tmp_path, tiny_root):
    """CosPlace under FSDP (``mesh.shard_params``) over two groups whose class counts differ and do not
    divide by the 8 devices: every group's classifier is padded to one shape, split over the devices
    the same way, the step compiles once, and training matches one device."""
    eight = _fsdp_groups(tiny_root, tmp_path / "eight", 8)
    assert eight["devices"] == 8
    groups = eight["groups"]
    assert len(set(groups)) == 2 and all(n % 8 for n in groups), groups  # the case under test
    assert eight["rows"] == 8 * -(-max(groups) // 8)
    assert eight["traces"] == 1
    assert len(eight["classifier_specs"]) >= 3 and len(set(eight["classifier_specs"])) == 1
    assert "fsdp" in eight["classifier_specs"][0], eight["classifier_specs"]  # split, not replicated
    one = _fsdp_groups(tiny_root, tmp_path / "one", 1)
    assert one["traces"] == 1 and one["groups"] == groups
    step_a, a = final_params(tmp_path / "one")
    step_b, b = final_params(tmp_path / "eight")
    assert step_a == step_b == 4
    assert_same_training(a, b, steps=4, lr=1e-4, min_close=0.9)
    losses = lambda w: [r["loss"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
                        if r["kind"] == "train"]
    np.testing.assert_allclose(losses(tmp_path / "one"), losses(tmp_path / "eight"), rtol=1e-4)


# ----------------------------------------------------------------------------- the tiny run (tiny_root: conftest)
def _load_config(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message_and_keeps_checkpoints(tmp_path, tiny_root):
    from jaxvpr.train.cosplace import NonFiniteLossError, train

    config = tiny_cosplace_config(tiny_root)
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


def test_config_files_are_short_presets_of_the_package(monkeypatch, tmp_path):
    """No config loads a sibling file by path; each preset's config file gives exactly the preset."""
    from jaxvpr import presets
    from jaxvpr.train import baseline

    for path in sorted((REPO / "configs").glob("*.py")):
        text = path.read_text()
        assert "importlib" not in text and "load_config_file" not in text, path.name
    for name in presets.PRESETS:
        assert _load_config(REPO / f"configs/{name}.py").to_dict() == presets.get(name).to_dict(), name
    night, snow = presets.get("adageo_svox_night"), presets.get("adageo_svox", domain="snow")
    assert (night.adageo.domain, snow.adageo.domain, snow.adageo.kmeans_pool) == ("night", "snow", "paper")
    assert presets.demo_nogrl().grl.enabled is False and presets.demo().grl.enabled is True
    # An installed package has no configs/ beside it: "config:demo_baseline" still resolves.
    monkeypatch.setattr(baseline, "configs_dir", lambda: tmp_path)
    assert baseline.load_config_file("demo_baseline").to_dict() == presets.demo_baseline().to_dict()
    with pytest.raises(FileNotFoundError, match="demo_baseline"):
        baseline.load_config_file("no_such_config")
    with pytest.raises(ValueError, match="AdAGeo"):
        presets.adageo_svox("fog")


def test_unknown_config_field_is_an_error(tmp_path):
    r = _main(["--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.train.no_such_field=1"])
    assert r.returncode != 0 and "no_such_field" in r.stderr


# ----------------------------------------------------------------------------- guards (issue: frozen random stages, init, topology)
def test_frozen_random_stages_are_an_error_naming_them_and_the_fix(tmp_path, tiny_root):
    from jaxvpr.train.cosplace import train

    config = tiny_cosplace_config(tiny_root)
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
