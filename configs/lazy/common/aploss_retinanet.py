"""RetinaNet with AP-loss, paper settings (Sec. 4.1.1), as a LazyConfig ``model``.

Detectron2's model-zoo RetinaNet (``common/models/retinanet.py``: ResNet-50-FPN, frozen BN,
P3-P7) with the meta-architecture swapped to ``APLossRetinaNet``; the classification loss is a
module, ``model.cls_loss = L(APLoss)(...)`` (swap it for ``L(FocalLoss)()``, ``L(AUCLoss)()``...).
"""
from detectron2.config import LazyCall as L

from ap_loss_d2 import model_zoo  # not detectron2.model_zoo: it needs pkg_resources
from ap_loss_d2.losses.cls_losses import APLoss
from ap_loss_d2.modeling import APLossRetinaNet

model = model_zoo.get_config("common/models/retinanet.py").model
model._target_ = APLossRetinaNet

# 2 sub-octave scales 2^(k/2), k <= 1, x 3 aspect ratios per FPN level: 6 anchors per location.
model.anchor_generator.sizes = [[x, x * 2 ** 0.5] for x in [32, 64, 128, 256, 512]]
model.anchor_generator.aspect_ratios = [0.5, 1.0, 2.0]
model.head.num_anchors = 6
model.backbone.bottom_up.freeze_at = 2  # stem + res2 frozen; all BN layers frozen (FrozenBN)
model.test_nms_thresh = 0.5  # per-class NMS with IoU 0.5

# The authors' released code (github cccorn/AP-loss), where the paper is silent; shared by every
# loss (the paper gives RetinaNet's baselines no settings of their own). Same values as
# configs/Base-APLoss-RetinaNet.yaml.
model.anchor_generator.offset = 0.5  # anchor centres at (i + 0.5) x stride (lib/model/anchors.py)
model.test_score_thresh = 0.01  # lib/model/model.py (Detectron2: 0.05)
model.test_topk_candidates = 1000
model.max_detections_per_image = 100
# Smooth L1 (beta 1) on deltas divided by (0.1, 0.1, 0.2, 0.2), averaged over the positive
# anchors of the batch and the 4 coordinates (lib/model/aploss.py).
model.box2box_transform.weights = [10.0, 10.0, 5.0, 5.0]
model.box_reg_loss_type = "smooth_l1"
model.smooth_l1_beta = 1.0
model.box_reg_normalizer = "batch_mean"

# Classification loss (Sec. 3): interpolated AP-loss with the linear step of width delta = 1
# (Eq. 21), 8 images ranked together (Sec. 3.4.1, Table 1) on any GPU count (README, Multi-GPU).
model.cls_loss = L(APLoss)(delta=1.0, interpolate=True, step="linear", images_per_ranking_set=8)
