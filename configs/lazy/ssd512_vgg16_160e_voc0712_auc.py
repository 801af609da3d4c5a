"""Paper Table 2, SSD + PASCAL VOC, AUC-loss; otherwise the AP-loss config.
LazyConfig twin of configs/SSD/ssd512_vgg16_160e_voc0712_auc.yaml."""
from detectron2.config import LazyCall as L

from ap_loss_d2.losses.cls_losses import AUCLoss

from .ssd512_vgg16_160e_voc0712_ap import dataloader, lr_multiplier, model, optimizer, train

model.cls_loss = L(AUCLoss)(delta=1.0, step="linear", images_per_ranking_set=8)
