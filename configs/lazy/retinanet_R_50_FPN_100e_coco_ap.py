"""Paper Table 2, RetinaNet + COCO (trainval35k -> minival), AP-loss: ResNet-50-FPN, 512x512
SSD-augmented training, test shorter side 600, 100 epochs at LR 0.001 (batch 16).
LazyConfig twin of configs/COCO-Detection/retinanet_R_50_FPN_100e_coco_ap.yaml."""
from .common.data import coco as dataloader
from .common.schedules import COCO_100E_ITERS
from .common.schedules import lr_multiplier_coco_100e as lr_multiplier
from .retinanet_R_50_FPN_160e_voc0712_ap import model, optimizer, train

model.num_classes = 80
train.max_iter = COCO_100E_ITERS
train.checkpointer.period = 20000
