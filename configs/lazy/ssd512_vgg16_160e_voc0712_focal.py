"""Paper Table 2, SSD + PASCAL VOC, Focal loss with the paper's SSD setting gamma 1, alpha 0.25; otherwise the AP-loss config.
LazyConfig twin of configs/SSD/ssd512_vgg16_160e_voc0712_focal.yaml."""
from detectron2.config import LazyCall as L

from ap_loss_d2.losses.cls_losses import FocalLoss

from .ssd512_vgg16_160e_voc0712_ap import dataloader, lr_multiplier, model, optimizer, train

model.cls_loss = L(FocalLoss)(alpha=0.25, gamma=1.0)
