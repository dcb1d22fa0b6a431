"""Evaluate a model on the synthetic city's test split, daylight and night queries (no training).

    python -m jaxvpr.main --config configs/eval_synthetic.py --workdir workdir/eval
    python -m jaxvpr.main --config configs/eval_synthetic.py --config.model.init_checkpoint=workdir/demo

With no checkpoint the model has random weights (seeded by config.seed): the numbers show the
domain gap of the synthetic city for a fixed descriptor. The fields are the training recipes' names
(``model.init_checkpoint``, ``data.test_split``, ``data.test_queries``, ``data.eval_resize``).
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.recipe = "evaluate"
    c.seed = 0
    c.data = ConfigDict(dict(root="", synthetic_preset="small", synthetic_seed=0, image_size=128, num_workers=0,
                             test_split="images/test", test_queries="queries,queries_night", eval_resize=""))
    c.model = ConfigDict(dict(name="cosplace_resnet18_512", init_checkpoint=""))
    c.eval = ConfigDict(dict(thresholds="25", angles="", batch_size=32, skip_corrupt=False, unreadable_queries="miss",
                             # search (jaxvpr/search.py): "flat" is exact; e.g. "IVF4096,PQ64" approximate
                             search_index="flat", nprobe=32, ef_search=128, faiss_gpu=False,
                             descriptors_on_disk=False))  # True: streamed to the output folder (SF-XL scale)
    return c
