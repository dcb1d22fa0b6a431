"""AdAGeo phase 2 (jaxvpr/models/adageo.py, jaxvpr/train/adageo.py): the CAM attention against a
hand computation, the attention's cancellation inside NetVLAD (recipes_facts §A.2.2), the noBN
block, the 3-domain GRL sampling, the discriminator of the real step learning three domains of the
tiny city, the margin-violation filter against brute force, and a short run of both phases on the
tiny city."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvpr.data import pipeline
from jaxvpr.models import build_model, feature_dim, init_variables, model_config
from jaxvpr.models.adageo import CamNetVLAD, cam_attention, fit_scene_classifier
from jaxvpr.models.netvlad import NetVLAD
from jaxvpr.models.resnet import ResNet
from jaxvpr.train import mining
from jaxvpr.train.triplet import triplet_loss_of_descriptors


def test_cam_attention_is_a_softmax_over_positions_of_the_top_class_activation():
    rng = np.random.default_rng(0)
    feat = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    kernel = rng.normal(size=(5, 7)).astype(np.float32)
    logits = rng.normal(size=(2, 7)).astype(np.float32)
    a = np.asarray(cam_attention(jnp.asarray(feat), jnp.asarray(kernel), jnp.asarray(logits)))
    assert a.shape == (2, 3, 4)
    np.testing.assert_allclose(a.sum(axis=(1, 2)), 1.0, rtol=1e-6)  # per image, over h * w
    for b in range(2):  # by hand: the top class's weights dotted with each position, softmax over positions
        cam = feat[b] @ kernel[:, np.argmax(logits[b])]
        expected = np.exp(cam - cam.max()) / np.exp(cam - cam.max()).sum()
        np.testing.assert_allclose(a[b], expected, rtol=1e-5, atol=1e-7)


def test_attention_cancels_inside_netvlad_except_where_a_feature_vanishes():
    """NetVLAD normalises each local feature first, so a positive weight per position changes nothing:
    the attended head gives NetVLAD(feat_nbn) to float precision (the analysis of §A.2.2, measured)."""
    rng = np.random.default_rng(1)
    feat_bn = jnp.asarray(np.abs(rng.normal(size=(2, 4, 4, 8))).astype(np.float32))
    feat_nbn = jnp.asarray(rng.normal(size=(2, 4, 4, 8)).astype(np.float32))
    head = CamNetVLAD(num_clusters=4, num_classes=3)
    variables = head.init(jax.random.key(0), (feat_bn, feat_nbn))
    attended = head.apply(variables, (feat_bn, feat_nbn))
    plain = NetVLAD(num_clusters=4).apply({"params": variables["params"]["netvlad"]}, feat_nbn)
    np.testing.assert_allclose(np.asarray(attended), np.asarray(plain), atol=2e-6)
    # A position whose attention underflows (a_i ||f_i|| < 1e-12) drops out: then they differ.
    big = feat_bn.at[:, 0, 0].set(1e4)
    assert float(jnp.abs(head.apply(variables, (big, feat_nbn)) - plain).max()) > 1e-3


def test_no_bn_block_returns_conv2_plus_shortcut_before_the_last_batchnorm():
    """With the last bn2 an identity (scale 1, bias 0, mean 0, var 1 - eps), feat_bn = ReLU(feat_nbn)."""
    x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
    net = ResNet(depth=18, pre_bn_output=True)
    variables = net.init(jax.random.key(1), x)
    params, stats = variables["params"], variables["batch_stats"]
    params["layer4_1"]["bn2"] = {"scale": jnp.ones(512), "bias": jnp.zeros(512)}
    stats["layer4_1"]["bn2"] = {**stats["layer4_1"]["bn2"], "mean": jnp.zeros(512), "var": jnp.full(512, 1 - 1e-5)}
    feat_bn, feat_nbn = net.apply({"params": params, "batch_stats": stats}, x)
    np.testing.assert_allclose(np.asarray(feat_bn), np.maximum(np.asarray(feat_nbn), 0), atol=1e-5)
    plain = ResNet(depth=18).apply({"params": params, "batch_stats": stats}, x)  # same parameters
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(feat_bn))
    assert float(np.mean(np.asarray(feat_nbn) < 0)) > 0.1  # pre-ReLU: negative values survive


def test_adageo_models_descriptors_and_pooled_features():
    cfg = model_config("adageo_resnet18_netvlad_64", num_classes=6)
    variables = init_variables(cfg, jax.random.key(0), (64, 96))
    model = build_model(cfg)
    x = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
    desc, pooled = model.apply(variables, x, return_features=True)
    assert desc.shape == (2, 64 * 512) and pooled.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(desc), axis=1), 1.0, rtol=1e-5)
    assert variables["params"]["head"]["fc"]["kernel"].shape == (512, 6)
    with pytest.raises(ValueError, match="BasicBlock ResNet"):
        model_config({"backbone": "resnet50", "head": "cam_netvlad"})


def test_scene_classifier_separates_separable_classes():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5 + 20  # positive offsets, like pooled post-ReLU features
    labels = rng.integers(0, 4, size=200)
    features = centres[labels] + rng.normal(size=(200, 16))
    fc = fit_scene_classifier(features, labels, 4, steps=200)
    assert fc["kernel"].shape == (16, 4)
    assert np.mean(np.argmax(features @ fc["kernel"] + fc["bias"], 1) == labels) > 0.95


def test_domain_sampler_draws_domains_uniformly_and_images_within_them():
    sampler = pipeline.DomainSampler([50, 50, 5])
    draws = [next(sampler.candidates(7, i)) for i in range(3000)]
    index, domain = np.array(draws).T
    counts = np.bincount(domain, minlength=3) / len(domain)
    np.testing.assert_allclose(counts, 1 / 3, atol=0.03)  # uniform over domains, not over images
    offsets = np.array([0, 50, 100])
    sizes = np.array([50, 50, 5])
    assert ((index >= offsets[domain]) & (index < offsets[domain] + sizes[domain])).all()
    assert len(set(index[domain == 2])) == 5  # the 5 target images recur
    assert draws[:10] == [next(sampler.candidates(7, i)) for i in range(10)]  # a function of (seed, position)
    with pytest.raises(ValueError, match="every domain"):
        pipeline.DomainSampler([3, 0])


def _adageo_state(cfg, tx, disc, disc_tx, image_size):
    from jaxvpr.train import adageo

    variables = init_variables(cfg, jax.random.key(0), image_size)
    disc_params = disc.init(jax.random.key(1), jnp.zeros((1, feature_dim(cfg))))["params"]
    return adageo.AdAGeoState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                              batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]),
                              disc_params=disc_params, disc_opt_state=disc_tx.init(disc_params))


@pytest.mark.slow
def test_three_domain_discriminator_learns_in_the_real_step_at_coefficient_zero(tiny_city):
    """AdAGeo's jitted step with its 3-domain GRL batch (DomainSampler + AdAGeo's GRL jitter) on the tiny
    city: at GRL coefficient 0 (nothing fools it yet) the discriminator learns to tell daylight queries,
    fog and night apart (fog stands in for the pseudo-targets) far above chance (33%), while the
    triplet loss of the same step falls. Without AdAGeo's colour jitter (0.7, which the demo keeps):
    with it, a randomly initialised ResNet's features need more than 60 steps (45% at 60 steps, 64 px;
    the demo's discriminator, from CosPlace weights, reaches 63-72% in 100 steps). 48 px images."""
    import functools

    import optax

    from jaxvpr.data import format as fmt
    from jaxvpr.data.augment import grl_augment
    from jaxvpr.data.images import load_image, normalize, resize
    from jaxvpr.models.discriminator import DomainDiscriminator
    from jaxvpr.train import adageo

    config = tiny_adageo_config(tiny_city)
    config.train.batch_size = 1
    config.adageo.grl_lr = 1e-3
    cfg = model_config(config.model.name, num_classes=4)
    model, disc = build_model(cfg), DomainDiscriminator(n_domains=3)
    tx, disc_tx = optax.adam(1e-4), optax.adam(float(config.adageo.grl_lr))
    state = _adageo_state(cfg, tx, disc, disc_tx, (48, 48))
    step = jax.jit(adageo.make_train_step(model, disc, tx, disc_tx, config, frozen=None, grl_on=True))

    domains = [fmt.read_image_folder(tiny_city / f).abs_paths()
               for f in ("images/train/queries", "images/target/fog", "images/target/night")]
    augment = functools.partial(grl_augment, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, size=(48, 48))
    grl = pipeline.train_batches([p for d in domains for p in d], pipeline.DomainSampler([len(d) for d in domains]),
                                 8, augment, seed=0, num_workers=0)
    day = domains[0]  # one fixed triplet tuple (query, positive, 10 negatives) of daylight images
    triplet = np.stack([normalize(resize(load_image(p), 48)) for p in day[:12]])
    accuracy, loss = [], []
    for _ in range(40):
        g = next(grl)
        batch = {"image": triplet, "neg_mask": np.ones((1, 10), bool), "grl_image": g["image"],
                 "grl_domain": g["label"]}
        state, metrics = step(state, batch, jnp.float32(0.0))
        accuracy.append(float(metrics["disc_accuracy"]))
        loss.append(float(metrics["triplet_loss"]))
    last = float(np.mean(accuracy[-20:]))  # 160 images: chance would give 0.33 +- 0.04 (measured: 0.70)
    assert last >= 0.55, f"discriminator accuracy over steps 21-40 is {last:.2f} (per step: {accuracy})"
    assert np.mean(accuracy[:5]) < last
    assert np.mean(loss[-5:]) < 0.7 * np.mean(loss[:5]), loss


def test_alexnet_variant_trains_in_the_adageo_step_without_batchnorm():
    """AdAGeo's step on the AlexNet variant (no BatchNorm statistics): finite losses, the frozen convs
    (conv1-3) untouched, conv4/conv5, the CAM's fc, NetVLAD and the discriminator updated."""
    import optax

    from jaxvpr.models.discriminator import DomainDiscriminator
    from jaxvpr.train import adageo
    from jaxvpr.train.config import adageo_config
    from jaxvpr.train.loop import frozen_params_mask

    config = adageo_config()
    config.train.batch_size = 1
    cfg = model_config("adageo_alexnet_netvlad_64", num_classes=4)
    model, disc = build_model(cfg), DomainDiscriminator(n_domains=3)
    tx, disc_tx = optax.adam(1e-3), optax.adam(1e-3)
    state = start = _adageo_state(cfg, tx, disc, disc_tx, (64, 64))
    step = jax.jit(adageo.make_train_step(model, disc, tx, disc_tx, config, frozen_params_mask(cfg), grl_on=True))
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = {"image": rng.normal(size=(12, 64, 64, 3)).astype(np.float32), "neg_mask": np.ones((1, 10), bool),
                 "grl_image": rng.normal(size=(8, 64, 64, 3)).astype(np.float32),
                 "grl_domain": np.arange(8, dtype=np.int32) % 3}
        state, metrics = step(state, batch, jnp.float32(1.0))
        assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["domain_ce"]))
    assert state.batch_stats == {}

    def changed(a, b):
        return jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))), a, b)

    moved = changed(start.params, state.params)
    assert not any(jax.tree.leaves([moved["backbone"][f"features_{i}"] for i in (0, 3, 6)]))
    assert all(jax.tree.leaves([moved["backbone"][f"features_{i}"] for i in (8, 10)]))
    assert all(jax.tree.leaves(moved["head"]["netvlad"]))
    assert all(jax.tree.leaves(changed(start.disc_params, state.disc_params)))


def test_violation_mask_against_brute_force():
    rng = np.random.default_rng(0)
    q_desc, db_desc = rng.normal(size=(6, 8)), rng.normal(size=(30, 8))
    plan = mining.MiningPlan(np.arange(6), np.arange(30), np.zeros(0, np.int64))
    triplets = np.concatenate([np.arange(6)[:, None], rng.integers(0, 30, size=(6, 1 + 4))], axis=1)
    mask = mining.violation_mask(triplets, plan, q_desc, db_desc, margin=0.5)
    for i, row in enumerate(triplets):
        d = np.linalg.norm(db_desc[row[1:]] - q_desc[i], axis=1)
        np.testing.assert_array_equal(mask[i], d[1:] < d[0] + 0.5)
    assert mask.any() and not mask.all()


def test_masked_triplet_loss_averages_over_the_counted_negatives_only():
    # one query, positive at distance 1, negatives at distances 0.5 and 3 (margin 1): hinges 1.5 and 0
    q, p = np.zeros(2), np.array([1.0, 0.0])
    n = np.array([[0.0, 0.5], [0.0, 3.0]])
    desc = jnp.asarray(np.concatenate([q[None], p[None], n]), jnp.float32)
    full = float(triplet_loss_of_descriptors(desc, 1, 1.0, False))
    assert full == pytest.approx((1.5 + 0.0) / 2, abs=1e-5)
    only_first = float(triplet_loss_of_descriptors(desc, 1, 1.0, False, jnp.array([[True, False]])))
    assert only_first == pytest.approx(1.5, abs=1e-5)
    assert float(triplet_loss_of_descriptors(desc, 1, 1.0, False, jnp.array([[False, False]]))) == 0.0


def _torch_attentive_netvlad(torch, feat_bn, feat_nbn, fc, netvlad_params):
    """AdAGeo's head (``src/network.py`` + ``src/netvlad.py``) in PyTorch: CAM of the top class on
    ``feat_bn``, softmax over positions, times ``feat_nbn``, NetVLAD-64 (our k-means parameters)."""
    F = torch.nn.functional
    centroids = torch.from_numpy(np.array(netvlad_params["centroids"]))
    conv_w = torch.from_numpy(np.transpose(np.asarray(netvlad_params["conv"]["kernel"]), (3, 2, 0, 1)).copy())
    logits = fc(torch.flatten(F.adaptive_avg_pool2d(feat_bn, 1), 1))
    cls = logits.sort(1, True)[1][:, 0]
    b, c, h, w = feat_bn.shape
    cam = torch.bmm(fc.weight[cls].unsqueeze(1), feat_bn.reshape(b, c, h * w))
    attention = F.softmax(cam.squeeze(1), dim=1).view(b, 1, h, w)
    feat = F.normalize(feat_nbn * attention, p=2, dim=1)
    assign = F.softmax(F.conv2d(feat, conv_w).view(b, 64, -1), dim=1)
    flat = feat.reshape(b, c, -1)
    vlad = torch.stack([((flat - centroids[k][None, :, None]) * assign[:, k:k + 1]).sum(-1) for k in range(64)], 1)
    vlad = F.normalize(vlad, p=2, dim=2).view(b, -1)
    return F.normalize(vlad, p=2, dim=1).numpy()


@pytest.mark.torch
def test_places365_resnet_and_the_attentive_netvlad_match_a_pytorch_reference(tmp_path):
    """A torchvision ResNet-18 with a 365-way fc (the Places365 layout) loads as the backbone and the
    CAM's classifier; the descriptor equals AdAGeo's AttenNetVLAD forward written in PyTorch."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from jaxvpr.train.adageo import load_places365

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=365).eval()
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18_places365.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)

    cfg = model_config("adageo_resnet18_netvlad_64")
    variables = load_places365(init_variables(cfg, jax.random.key(0), (64, 64)), str(path), cfg)
    x = np.random.default_rng(0).normal(size=(2, 96, 128, 3)).astype(np.float32)
    desc = build_model(cfg).apply(variables, jnp.asarray(x))

    captured = {}
    block = net.layer4[1]
    block.conv2.register_forward_hook(lambda m, i, o: captured.__setitem__("conv2", o))
    block.register_forward_hook(lambda m, i, o: captured.__setitem__("input", i[0]))
    with torch.no_grad():  # in eval mode
        feat_bn = torch.nn.Sequential(*list(net.children())[:-2])(torch.from_numpy(x).permute(0, 3, 1, 2))
        feat_nbn = captured["conv2"] + captured["input"]
        expected = _torch_attentive_netvlad(torch, feat_bn, feat_nbn, net.fc, variables["params"]["head"]["netvlad"])
    np.testing.assert_allclose(np.asarray(desc), expected, atol=2e-5)


@pytest.mark.torch
def test_alexnet_variant_loads_its_layout_and_matches_a_pytorch_reference(tmp_path):
    """AdAGeo's AlexNet (paper Table 2; ``src/alexnet.py``): torchvision's ``features`` up to conv5 before
    its ReLU, one map for the CAM and the attended features, a GAP + Linear(256, 365) classifier. A file
    of that layout loads (``features.<i>``, ``fc``) and the descriptor equals the forward in PyTorch;
    the authors' trained ``AttenNetVLAD`` layout (``backbone.features.<i>``) converts too."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from jaxvpr.convert.cnn import cnn_rules
    from jaxvpr.convert.rules import apply_rules
    from jaxvpr.train.adageo import load_places365

    torch.manual_seed(0)
    trunk = torch.nn.Sequential(*list(torchvision.models.alexnet().features.children())[:-2]).eval()
    fc = torch.nn.Linear(256, 365)
    state = {**{f"features.{k}": v for k, v in trunk.state_dict().items()},
             **{f"fc.{k}": v for k, v in fc.state_dict().items()}}
    torch.save(state, tmp_path / "alexnet_places365.pth")

    cfg = model_config("adageo_alexnet_netvlad_64")
    assert cfg.trainable_stages == 2  # conv4 + conv5 ("the last two convolutional blocks")
    variables = init_variables(cfg, jax.random.key(0), (96, 128))
    assert "batch_stats" not in variables or not variables["batch_stats"]
    variables = load_places365(variables, str(tmp_path / "alexnet_places365.pth"), cfg)
    x = np.random.default_rng(0).normal(size=(2, 96, 128, 3)).astype(np.float32)
    desc, pooled = build_model(cfg).apply(variables, jnp.asarray(x), return_features=True)
    assert desc.shape == (2, 64 * 256) and pooled.shape == (2, 256)
    with torch.no_grad():
        conv5 = trunk(torch.from_numpy(x).permute(0, 3, 1, 2))  # before its ReLU: negative values kept
        assert float((conv5 < 0).float().mean()) > 0.1
        expected = _torch_attentive_netvlad(torch, conv5, conv5, fc, variables["params"]["head"]["netvlad"])
    np.testing.assert_allclose(np.asarray(desc), expected, atol=2e-5)

    authors = {f"backbone.{k}": v.numpy() for k, v in state.items()}
    authors.update({"netvlad_layer.centroids": np.asarray(variables["params"]["head"]["netvlad"]["centroids"]),
                    "netvlad_layer.conv.weight": np.transpose(
                        np.asarray(variables["params"]["head"]["netvlad"]["conv"]["kernel"]), (3, 2, 0, 1))})
    converted = apply_rules(authors, cnn_rules(cfg))
    again = build_model(cfg).apply({"params": converted["params"]}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(again), np.asarray(desc), atol=1e-6)


def tiny_adageo_config(root, **adageo):
    from jaxvpr.train.config import adageo_config

    c = adageo_config()
    c.data.root = str(root)
    c.data.target_folder = "images/target/{domain}"
    c.data.num_workers = 0
    c.model.num_classes = 4
    c.model.train_all_layers = True  # random weights: every stage trains
    c.adageo.scene_classes = 4
    c.adageo.scene_images = 100
    c.adageo.kmeans_images = 30
    c.adageo.kmeans_per_image = 16
    for key, value in adageo.items():
        c.adageo[key] = value
    c.train.epochs = 1
    c.train.queries_per_epoch = "8"
    c.train.cache_refresh_rate = 8
    c.train.mining = "partial"         # (AdAGeo's "full" describes the whole gallery: slower here)
    c.train.neg_samples_num = 100
    c.train.log_every = 1
    c.eval.batch_size = 50
    d = c.ddda
    d.model.ngf = 8
    d.data.resize, d.data.crop, d.data.rotation_deg = 36, 32, 7.0
    d.train.phase1_epochs = d.train.phase2_epochs = d.train.decay_epochs = 1
    d.train.iterations_per_epoch = 2
    return c


def test_adageo_end_to_end_on_the_tiny_city_ddda_then_attentive_netvlad_with_a_3_domain_grl(tiny_city, tmp_path):
    """Phase 1 (a few DDDA steps, pseudo-targets) -> phase 2 (CAM + NetVLAD, 3-domain GRL) -> results.json."""
    from jaxvpr.data import format as fmt
    from jaxvpr.train.adageo import AdAGeoTrainer

    trainer = AdAGeoTrainer(tiny_adageo_config(tiny_city), tmp_path / "run")
    names = [name for name, _ in trainer.grl_domains]
    assert names == ["source queries", "pseudo-target queries", "target images"]
    sizes = [len(paths) for _, paths in trainer.grl_domains]
    assert sizes == [50, 50, 5]  # the tiny city's 50 training queries, their pseudo-targets, 5 shots
    pseudo = fmt.read_image_folder(trainer.phase1["pseudo_targets"]["images/train/queries"])
    source = fmt.read_image_folder(tiny_city / "images/train/queries")
    assert pseudo.paths == source.paths and np.array_equal(pseudo.utm, source.utm)  # labels carried over
    assert trainer.sets[0].positives.num_queries == 100  # source + pseudo-target queries
    val_split, _ = trainer.validation_split()  # selection on the pseudo-target validation queries
    assert str(val_split.queries.root).endswith("ddda/pseudo_targets/images/val/queries")

    results = trainer.fit()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(saved["test"]) == {"queries_night"} and saved["best_epoch"] == 0
    assert 0 <= saved["test"]["queries_night"]["results"][0]["recall"]["1"] <= 100
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2 and all(np.isfinite(r["loss"]) and 0 <= r["disc_accuracy"] <= 1 for r in train)
    assert results["test"]["queries_night"]["num_queries"] == 50

    # the GRL batch: 8 images, domains 0/1/2 drawn uniformly (the refresh's triplets are cached)
    batch, (coeff,) = next(trainer.batches(0, 0, None))
    assert batch["grl_image"].shape == (8, 128, 128, 3) and float(coeff) == 1.0
    assert set(batch["grl_domain"].tolist()) <= {0, 1, 2}
    assert batch["image"].shape == (4 * 12, 128, 128, 3) and batch["neg_mask"].shape == (4, 10)


def test_packed_folders_give_the_same_grl_domains_and_batches(tiny_city, tmp_path):
    """A packed city (``jaxvpr.data.pack``: the source split and the target pool in shards) gives phase 2
    the same few-shot target draw and the same GRL batches as its image files (DDDA on packed folders:
    ``tests/test_ddda_train.py``)."""
    from jaxvpr.data import pack
    from jaxvpr.train.adageo import AdAGeoTrainer

    packed = tmp_path / "packed"
    for rel in ("images/train/database", "images/train/queries", "images/val/database", "images/val/queries",
                "images/target/night"):
        pack.pack(tiny_city / rel, packed / rel, shards=2, workers=1, progress=False)
    files, shards = (AdAGeoTrainer(tiny_adageo_config(root, ddda=False), tmp_path / name)
                     for name, root in (("files", tiny_city), ("packed", packed)))
    assert [(n, len(d)) for n, d in shards.grl_domains] == [("source queries", 50), ("target images", 5)]
    assert list(shards.phase1["target_images"]) == [p.replace(str(tiny_city), str(packed))
                                                    for p in files.phase1["target_images"]]
    a, b = next(files.grl_batches(0, 0)), next(shards.grl_batches(0, 0))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert set(b["label"].tolist()) == {0, 1}


def test_svox_configs_hold_the_papers_settings_and_fail_clearly_without_weights_or_data(tmp_path):
    from jaxvpr.data.format import DatasetError
    from jaxvpr.train.adageo import AdAGeoTrainer
    from jaxvpr.train.baseline import load_config_file
    from jaxvpr.train.config import ConfigError

    for domain in ("snow", "rain", "sun", "night", "overcast"):
        c = load_config_file(f"adageo_svox_{domain}")
        assert c.recipe == "adageo" and c.adageo.domain == domain
    c = load_config_file("adageo_svox_snow")
    assert (c.train.lr, c.train.batch_size, c.train.negs_num_per_query, c.train.margin) == (1e-5, 4, 10, 0.1 ** 0.5)
    assert (c.train.train_positives_dist_threshold, c.train.val_positive_dist_threshold) == (10.0, 25.0)
    assert (c.adageo.grl_weight, c.adageo.grl_batch_size, c.adageo.n_target, c.eval.thresholds) == (0.1, 8, 5, "25")
    assert (c.ddda.train.lr, c.ddda.train.phase1_epochs, c.ddda.data.resize, c.ddda.data.crop) == (2e-4, 80, 286, 256)
    assert model_config(c.model.name).num_clusters == 64 and c.data.database_folder == "gallery"
    c.data.root = str(tmp_path)
    with pytest.raises(ConfigError, match="frozen"):  # no Places365 weights given: refused before any work
        AdAGeoTrainer(c, tmp_path / "w")
    c.adageo.backbone_checkpoint = str(tmp_path / "resnet18_places365.pth.tar")
    with pytest.raises(DatasetError, match="images/train"):  # then the missing dataset, named
        AdAGeoTrainer(c, tmp_path / "w")


@pytest.mark.torch
def test_authors_attennetvlad_state_dict_converts_and_round_trips(tmp_path):
    """AdAGeo's ``AttenNetVLAD`` layout (``backbone.*`` with fc, ``netvlad_layer.*``, plus ``weight_softmax``
    and ``grl_discriminator.*``) -> jaxvpr checkpoint -> the same tensors back."""
    torch = pytest.importorskip("torch")
    from jaxvpr.checkpoint import load_model
    from jaxvpr.convert.__main__ import main as convert
    from jaxvpr.convert.rules import export_rules, torch_rules

    cfg = model_config("adageo_resnet18_netvlad_64")
    variables = init_variables(cfg, jax.random.key(3), (64, 64))
    state = export_rules(jax.device_get(variables), torch_rules(cfg))
    assert "netvlad_layer.centroids" in state and state["backbone.fc.weight"].shape == (365, 512)
    full = {**state, "weight_softmax": state["backbone.fc.weight"],
            "grl_discriminator.1.weight": np.zeros((50, 512), np.float32)}
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in full.items()}, tmp_path / "adageo.pth")
    assert convert(["from-torch", "--model", cfg.name, "--weights", str(tmp_path / "adageo.pth"),
                    "--out", str(tmp_path / "ckpt")]) == 0
    _, loaded = load_model(tmp_path / "ckpt")
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(jax.device_get(variables))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_experiment_commands_list_the_papers_runs_and_print_its_table_layout(capsys):
    from jaxvpr import experiments
    from jaxvpr.train.baseline import load_config_file

    assert len(experiments.ABLATION) == 8 and len({(m.ddda, m.attention, m.grl) for m in experiments.ABLATION}) == 8
    assert [m.n_target for m in experiments.SHOTS] == [0, 1, 5, 50, -1]
    base = load_config_file("adageo_demo")
    netvlad, grl_all, adageo = (experiments.run_config(base, m, "snow", 2, ["train.epochs=7"])
                                for m in experiments.TABLE2)
    assert netvlad.model.name == "adageo_resnet18_netvlad_64_noatt" and not netvlad.adageo.ddda
    assert not netvlad.adageo.grl and grl_all.adageo.grl and grl_all.adageo.n_target == -1
    assert adageo.model.name == "adageo_resnet18_netvlad_64" and adageo.adageo.ddda and adageo.adageo.n_target == 5
    assert adageo.seed == 2 and adageo.adageo.domain == "snow" and adageo.data.synthetic_domains == "snow"
    assert adageo.train.epochs == 7 and adageo.adageo.compare == ""
    with pytest.raises(SystemExit, match="no field"):
        experiments.run_config(base, adageo_method := experiments.TABLE2[2], "snow", 0, ["train.no_such=1"])
    assert adageo_method.slug == "adageo__5_shots"

    assert experiments.main(["adageo-ablation", "--dry-run", "--seeds", "0,1", "--domains", "night,snow",
                             "--workdir", "/nonexistent"]) == 0
    assert capsys.readouterr().out.count("== ") == 8 * 2 * 2
    cells = {("NetVLAD", "night"): [10.0, 12.0], ("NetVLAD", "snow"): [20.0, 22.0]}
    table = experiments.format_table("t", experiments.TABLE2, ["night", "snow"], cells)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[4:]}
    assert rows["NetVLAD"] == ["11.0 ±  1.0", "21.0 ±  1.0", "16.0"]  # mean ± std over seeds, average of domains
    assert rows["AdAGeo (5 shots)"] == ["-", "-", "-"]
    assert table.count("\n") == 6  # title, blank, header, rule, 3 methods (the last without a newline)
