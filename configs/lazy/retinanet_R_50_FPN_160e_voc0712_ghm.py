"""Paper Table 13, RetinaNet + PASCAL VOC, GHM-C baseline: same as the AP-loss config.
LazyConfig twin of configs/VOC-Detection/retinanet_R_50_FPN_160e_voc0712_ghm.yaml."""
from detectron2.config import LazyCall as L

from ap_loss_d2.losses.cls_losses import GHMCLoss

from .retinanet_R_50_FPN_160e_voc0712_ap import dataloader, lr_multiplier, model, optimizer, train

model.cls_loss = L(GHMCLoss)()
