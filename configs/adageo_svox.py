"""AdAGeo on SVOX -> RobotCar with the paper's settings (Berton et al., WACV 2021, §5.2; code defaults).

    python -m jaxvpr.main --config configs/adageo_svox.py --workdir workdir/adageo_svox_night \
        --config.data.root=/data/svox --config.adageo.backbone_checkpoint=/weights/resnet18_places365.pth.tar

(or configs/adageo_svox_<domain>.py for snow, rain, sun, night, overcast). The dataset folder is
AdAGeo's layout (paper Table 1, recipes_facts §A.2.11): ``images/train/{gallery,queries,queries_<domain>}``,
``images/val/{gallery,queries}``, ``images/test/{gallery,queries_<domain>}``, 512x384 images named
``@utm_east@utm_north@...``. The 5 target images are drawn from ``train/queries_<domain>`` with the run's
seed (AdAGeo shipped its draw as ``train/queries_n5_d<x>``; point data.target_folder there and set
adageo.n_target=-1 to use it). The starting weights are CSAIL's Places365 ResNet-18 (torchvision layout
with its 365-way fc, the CAM's classifier). Phase 1 is BiOST's defaults (80 + 80 epochs of |source|
steps, 286 -> 256 crops, 64 channels), phase 2 AdAGeo's (Adam 1e-5, 4 x 12 images per step, 3-domain
GRL weight 0.1, up to 100 epochs with early stopping on the pseudo-target validation queries). Table 2
and 3 and Fig. 5b: ``python -m jaxvpr.experiments adageo-table2 --config configs/adageo_svox.py
--domains snow,rain,sun,night,overcast --set data.root=/data/svox --set adageo.backbone_checkpoint=...``.
Not run here: neither SVOX, RobotCar nor the Places365 weights can be downloaded on this machine.
"""

from jaxvpr import presets


def get_config():
    return presets.adageo_svox()
