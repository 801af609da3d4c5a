"""Paper Table 13, RetinaNet + PASCAL VOC, DR-loss baseline: same as the AP-loss config.
LazyConfig twin of configs/VOC-Detection/retinanet_R_50_FPN_160e_voc0712_dr.yaml."""
from detectron2.config import LazyCall as L

from ap_loss_d2.losses.cls_losses import DRLoss

from .retinanet_R_50_FPN_160e_voc0712_ap import dataloader, lr_multiplier, model, optimizer, train

model.cls_loss = L(DRLoss)()
# DR-loss's own setting (the authors' configs: PRIOR_PROB 0.5), as the yaml twin.
model.head.prior_prob = 0.5
