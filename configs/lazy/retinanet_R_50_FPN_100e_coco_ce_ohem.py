"""Paper Table 2, RetinaNet + COCO, CE-loss + OHEM (3:1) baseline: same as the AP-loss config.
LazyConfig twin of configs/COCO-Detection/retinanet_R_50_FPN_100e_coco_ce_ohem.yaml."""
from detectron2.config import LazyCall as L

from ap_loss_d2.losses.cls_losses import CEOHEMLoss

from .retinanet_R_50_FPN_100e_coco_ap import dataloader, lr_multiplier, model, optimizer, train

model.cls_loss = L(CEOHEMLoss)(neg_pos_ratio=3.0)
