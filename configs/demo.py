"""The embedded demo: CosPlace + GRL on the synthetic `small` city, adapting to night-time queries.

    python -m jaxvpr.main --config configs/demo.py --workdir workdir/demo

Generates the synthetic city on first use (cached in $JAXVPR_CACHE or ~/.cache/jaxvpr), trains a
ResNet-18 + GeM (512-d) from random weights with CosFace on the daylight street-view database while
a gradient reversal layer pushes its features to be indistinguishable from the unlabeled night
pool (images/target/night), and prints day (test/queries) and night (test/queries_night) R@1/R@5
before training, after each epoch and at the end. `configs/demo_nogrl.py` is the same run without
GRL. Differences from the thesis' setting, to fit 10 minutes on 2 CPU cores: 96x96 training crops of
the 128x128 images (evaluation at native size), random init (so the model learns from scratch, with a
10x larger backbone learning rate), 4 short epochs, and CosPlace groups of N=2, L=1 (4 groups, each
trained once) so that the small city's classes are all used. (Below ~80 px, ResNet's layer4 works on
2x2 maps, where XLA's CPU convolution is pathologically slow: keep crops >= 96 on CPU.)
"""

from jaxvpr.train.config import cosplace_config


def get_config():
    c = cosplace_config()
    c.data.synthetic_preset = "small"
    c.data.image_size = 96
    c.data.num_workers = 0
    c.data.target_folder = "images/target/night"
    c.data.test_queries = "queries,queries_night"
    c.data.monitor = ("images/test:queries", "images/test:queries_night")

    c.model.name = "cosplace_resnet18_512"

    c.train.epochs = 4
    c.train.iterations_per_epoch = 50
    c.train.batch_size = 32
    c.train.lr = 1e-4
    c.train.N = 2
    c.train.L = 1
    c.train.groups_num = 4
    c.train.min_images_per_class = 4
    c.train.checkpoint_every = 1000
    c.train.log_every = 10
    c.train.eval_before_training = True

    c.grl.enabled = True
    c.grl.lr = 1e-2          # mu, thesis' best on Tokyo
    c.grl.weight = 1.0       # lambda
    c.grl.gamma = 10.0
    c.grl.target_batch_size = 8
    c.grl.source_to_discriminator = 8
    c.grl.attach = "features"

    c.eval.batch_size = 64
    return c
