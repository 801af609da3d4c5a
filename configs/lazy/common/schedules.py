"""LR multipliers of the paper's schedules (Sec. 4.1.2), in iterations at 16 images / iteration.

VOC07+12 trainval: 16,551 images. 160 epochs = 165,510 iters; /10 at 110 epochs (113,788)
and 140 epochs (144,821).
COCO trainval35k: ~117,266 images. 100 epochs = 732,913 iters; /10 at 60 epochs (439,748) and
80 epochs (586,330).
Warm-up as in the authors' code (lib/config.py, train.py): linear from LR / 3 to LR over the
first 500 iterations.
"""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler


def _epochs(num_images, epochs, drops, ims_per_batch=16, warmup_iters=500, warmup_factor=1 / 3):
    def to_iters(e):
        return int(round(e * num_images / ims_per_batch + 1e-9))

    total = to_iters(epochs)
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[0.1 ** k for k in range(len(drops) + 1)],
            milestones=[to_iters(e) for e in drops] + [total],
        ),
        warmup_length=warmup_iters / total,
        warmup_method="linear",
        warmup_factor=warmup_factor,
    )


VOC0712_IMAGES, COCO_IMAGES = 16551, 117266
lr_multiplier_voc0712_160e = _epochs(VOC0712_IMAGES, 160, (110, 140))
lr_multiplier_coco_100e = _epochs(COCO_IMAGES, 100, (60, 80))
VOC0712_160E_ITERS = lr_multiplier_voc0712_160e.scheduler.milestones[-1]
COCO_100E_ITERS = lr_multiplier_coco_100e.scheduler.milestones[-1]
