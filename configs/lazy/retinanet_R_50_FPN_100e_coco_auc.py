"""Paper Table 2, RetinaNet + COCO, AUC-loss baseline: same as the AP-loss config.
LazyConfig twin of configs/COCO-Detection/retinanet_R_50_FPN_100e_coco_auc.yaml."""
from .retinanet_R_50_FPN_100e_coco_ap import dataloader, lr_multiplier, model, optimizer, train

model.cls_loss = "auc"
