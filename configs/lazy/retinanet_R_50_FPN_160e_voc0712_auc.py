"""Paper Table 2, RetinaNet + PASCAL VOC, AUC-loss baseline: same as the AP-loss config.
LazyConfig twin of configs/VOC-Detection/retinanet_R_50_FPN_160e_voc0712_auc.yaml."""
from detectron2.config import LazyCall as L

from ap_loss_d2.losses.cls_losses import AUCLoss

from .retinanet_R_50_FPN_160e_voc0712_ap import dataloader, lr_multiplier, model, optimizer, train

model.cls_loss = L(AUCLoss)(delta=1.0, step="linear", images_per_ranking_set=8)
