"""Thesis §5.3: the 54 published configurations of nine VPR methods on the five NAVER LABS indoor
datasets, at the six thresholds of Tables 5.2-5.8, ranked by mean R@1 over datasets and thresholds.

    python -m jaxvpr.benchmark --config configs/benchmark_indoor.py --out results/benchmark_indoor

Needs (README, "Benchmark"):

- the datasets converted to the community layout (``python -m jaxvpr.data.kapture``) under
  ``$JAXVPR_DATA`` (default ``data/``): gangnam_b1, gangnam_b2, hyundai_b1, hyundai_1f, hyundai_4f, each
  with database/ (kapture ``mapping``) and queries/ (``validation``: the split with public poses);
- each model's published weights converted once with
  ``python -m jaxvpr.convert from-torch --model NAME --weights FILE --out $JAXVPR_WEIGHTS/NAME``
  (``$JAXVPR_WEIGHTS`` default ``weights/``); NAME is the registry name in the table below. Sources:
  landscape_facts §2.2 (CosPlace, EigenPlaces, MixVPR, Conv-AP releases; OpenIBL for SFRS; dirtorch
  for AP-GeM with its whitening exported once; the AnyLoc indoor vocabulary with DINOv2 ViT-G/14).

The configurations (thesis: "all the available configurations for each of the state-of-the-art
methods", 54): CosPlace R18 (32-512), R50/R101/R152 (32-2048) and VGG16 (64-512), 30; EigenPlaces
R18 256/512, R50/R101 128/256/512/2048, VGG16 512, 11; MixVPR R50 128/512/4096 and Conv-AP R50
512/2048/4096/8192 at 320 x 320 (their published input); NetVLAD VGG16 32768 and 4096 (PCA); SFRS VGG16
4096; AP-GeM R101 2048; AnyLoc DINOv2 ViT-G/14 (indoor vocabulary, 49152); SALAD DINOv2 ViT-B/14 at
322 x 322. Other images go in at native size (VPR-methods-evaluation's default); DINOv2 inputs of
AnyLoc are rounded to multiples of 14 (``/14``).
"""

import os

import ml_collections

from jaxvpr.benchmark import THESIS_THRESHOLDS

DATASETS = ("gangnam_b1", "gangnam_b2", "hyundai_b1", "hyundai_1f", "hyundai_4f")

# (method label, registry name, resize, batch size)
CONFIGURATIONS = (
    *[("cosplace", f"cosplace_resnet18_{d}", "", 32) for d in (32, 64, 128, 256, 512)],
    *[("cosplace", f"cosplace_resnet{n}_{d}", "", 16) for n in (50, 101, 152)
      for d in (32, 64, 128, 256, 512, 1024, 2048)],
    *[("cosplace", f"cosplace_vgg16_{d}", "", 16) for d in (64, 128, 256, 512)],
    *[("eigenplaces", f"eigenplaces_resnet18_{d}", "", 32) for d in (256, 512)],
    *[("eigenplaces", f"eigenplaces_resnet{n}_{d}", "", 16) for n in (50, 101) for d in (128, 256, 512, 2048)],
    ("eigenplaces", "eigenplaces_vgg16_512", "", 16),
    *[("mixvpr", f"mixvpr_resnet50_{d}", "320,320", 32) for d in (128, 512, 4096)],
    *[("convap", f"convap_resnet50_{d}", "320,320", 32) for d in (512, 2048, 4096, 8192)],
    ("netvlad", "netvlad_vgg16_32768", "", 16),
    ("netvlad", "netvlad_vgg16_4096", "", 16),
    ("sfrs", "sfrs_vgg16_4096", "", 16),
    ("apgem", "apgem_resnet101_2048", "", 16),
    ("anyloc", "anyloc_dinov2_vitg14_indoor", "/14", 4),
    ("salad", "salad_dinov2_vitb14", "322,322", 16),
)


def get_config():
    weights = os.environ.get("JAXVPR_WEIGHTS", "weights")
    data = os.environ.get("JAXVPR_DATA", "data")
    c = ml_collections.ConfigDict()
    c.models = [dict(label=name, method=method, model=name, checkpoint=os.path.join(weights, name), resize=resize,
                     batch_size=batch) for method, name, resize, batch in CONFIGURATIONS]
    c.datasets = [os.path.join(data, d) for d in DATASETS]
    c.thresholds = THESIS_THRESHOLDS
    c.out = "results/benchmark_indoor"
    c.num_workers = 4
    c.save_predictions = 0
    return c
