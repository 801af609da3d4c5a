"""Paper Table 2, SSD + PASCAL VOC, CE-loss + OHEM (softmax, 3:1 hard negatives); otherwise the AP-loss config.
LazyConfig twin of configs/SSD/ssd512_vgg16_160e_voc0712_ce_ohem.yaml."""
from detectron2.config import LazyCall as L

from ap_loss_d2.losses.cls_losses import CEOHEMLoss

from .ssd512_vgg16_160e_voc0712_ap import dataloader, lr_multiplier, model, optimizer, train

model.cls_loss = L(CEOHEMLoss)(neg_pos_ratio=3.0)
