"""The thesis' triplet fine-tuning experiments (§5.4, Tables 5.13-5.21), one config for the whole grid.

    python -m jaxvpr.main --config configs/triplet_thesis.py:MODEL,SPLIT,THR,MODE --workdir workdir/NAME \
        --config.data.root=/data/indoor --config.model.init_checkpoint=/weights/eigenplaces_r50_2048

    MODEL  eigenplaces (EigenPlaces ResNet-50, 2048-d; batches 1-2) | salad (DINOv2-B + SALAD; batch 3)
    SPLIT  GB1 | HB1 | GB1-HB1 (batch 1) | GB1-BAI | HB1-BAI | GB1-HB1-BAI (batch 2)   (thesis Table 5.9)
    THR    10_25 | 5_10 | 2_5   (hard, soft) positive thresholds in metres
    MODE   separated | aggregated   (several training datasets; one dataset: the same run)

Every cell of Tables 5.13-5.21 is one command (``python -m jaxvpr.main --config
configs/triplet_thesis.py --help`` lists nothing extra: the four words are the whole grid):

    Tables 5.13/5.14  eigenplaces,{GB1,HB1,GB1-HB1},{10_25,5_10,2_5},separated
    Table 5.15        eigenplaces,GB1-HB1,{10_25,5_10,2_5},aggregated
    Tables 5.16/5.17  eigenplaces,{GB1-BAI,HB1-BAI,GB1-HB1-BAI},{10_25,5_10,2_5},separated
    Tables 5.18/5.19  eigenplaces,{GB1-BAI,HB1-BAI,GB1-HB1-BAI},{10_25,5_10,2_5},aggregated
    Tables 5.20/5.21  salad,{GB1,HB1,GB1-HB1},{10_25,5_10,2_5},separated

The datasets are the converted NAVER LABS and Baidu releases under data.root (README, "Indoor
datasets"): gangnam_b1, gangnam_b2, hyundai_b1, hyundai_1f, hyundai_4f, baidu_mall, each with
database/ (kapture ``mapping``; Baidu training images) and queries/ (``validation``; Baidu queries).
The starting weights are the converted hub models (``python -m jaxvpr.convert from-torch``); without
``model.init_checkpoint`` the run refuses to train from random weights.

Settings, as the seed and the fork give them (recipes_facts.md §B.11): triplet margin 0.1 on L2
distances, batch 4 queries x (1 + 1 + 10), Adam 1e-5, partial mining over min(1000, database)
sampled images, one cache refresh per epoch of Q queries where Q is the smallest of the training
datasets' values in the fork's table (HB1 1000, H1F 500, H4F 500, GB1 1000, GB2 500, BAI 500; the
fork's launchers pass one Q for all epochs in both modes), training images shorter side 360 then a
random 360 x 360 crop, evaluation at shorter side 360, test R@1 at 1, 5, 10, 25 m, model selection
and early stopping (patience 3) on R@5 at 1 m of the validation queries (the fork's default:
recalls[0][1] at its first test threshold). EigenPlaces trains layer3 + layer4, GeM p and the FC
(its constructor freezes conv1..layer2); SALAD the last 4 DINOv2 blocks and the head (dropout 0.3
active in training). SALAD's images are reduced (thesis batch 3, size not given): 322 here, inputs
rounded to multiples of 14 as the fork's wrapper does.
"""

from ml_collections import ConfigDict

from jaxvpr.train.config import triplet_config

DATASETS = {"GB1": "gangnam_b1", "GB2": "gangnam_b2", "HB1": "hyundai_b1", "H1F": "hyundai_1f",
            "H4F": "hyundai_4f", "BAI": "baidu_mall"}
QUERIES_PER_EPOCH = {"HB1": 1000, "H1F": 500, "H4F": 500, "GB1": 1000, "GB2": 500, "BAI": 500}
# Table 5.9 (and batch 2: Baidu added to training): train -> (validation, tests)
SPLITS = {
    "GB1": ("HB1", ("GB2", "H1F", "H4F", "BAI")),
    "HB1": ("GB1", ("GB2", "H1F", "H4F", "BAI")),
    "GB1-HB1": ("H4F", ("GB2", "H1F", "BAI")),
    "GB1-BAI": ("HB1", ("GB2", "H1F", "H4F")),
    "HB1-BAI": ("GB1", ("GB2", "H1F", "H4F")),
    "GB1-HB1-BAI": ("H4F", ("GB2", "H1F")),
}
THRESHOLDS = {"10_25": (10.0, 25.0), "5_10": (5.0, 10.0), "2_5": (2.0, 5.0)}
MODELS = {"eigenplaces": ("eigenplaces_resnet50_2048", 360), "salad": ("salad_dinov2_vitb14", 322)}


def get_config(arg: str = "eigenplaces,GB1,10_25,separated") -> ConfigDict:
    words = [w.strip() for w in arg.split(",")]
    if len(words) != 4:
        raise ValueError(f"configs/triplet_thesis.py:{arg}: expected MODEL,SPLIT,THR,MODE, e.g. "
                         "eigenplaces,GB1,10_25,separated")
    model, split, thr, mode = words
    for value, table, what in ((model, MODELS, "MODEL"), (split, SPLITS, "SPLIT"), (thr, THRESHOLDS, "THR")):
        if value not in table:
            raise ValueError(f"configs/triplet_thesis.py: {what} {value!r} is not one of {sorted(table)}.")
    if mode not in ("separated", "aggregated"):
        raise ValueError(f"configs/triplet_thesis.py: MODE {mode!r} is not 'separated' or 'aggregated'.")
    train_codes = split.split("-")
    val, tests = SPLITS[split]

    c = triplet_config()
    c.data.train_splits = ",".join(DATASETS[k] for k in train_codes)
    c.data.val_split = DATASETS[val]
    c.data.test_splits = ",".join(DATASETS[k] for k in tests)
    c.model.name, size = MODELS[model]
    if model == "salad":
        c.model.dropout = 0.3  # SALAD's class default, left active by its training script and the fork
    c.data.train_resize = size
    c.data.train_crop = size
    c.data.eval_resize = str(size)
    c.data.image_size = size
    c.data.truncated_images = "pil"  # a truncated image decodes as PIL with LOAD_TRUNCATED_IMAGES (the anchors)
    c.train.multi_dataset = mode
    c.train.queries_per_epoch = str(min(QUERIES_PER_EPOCH[k] for k in train_codes))
    c.train.cache_refresh_rate = 0  # one refresh per epoch (the fork's launchers: --cache_refresh_rate Q)
    c.train.train_positives_dist_threshold, c.train.val_positive_dist_threshold = THRESHOLDS[thr]
    c.eval.batch_size = 16
    return c
