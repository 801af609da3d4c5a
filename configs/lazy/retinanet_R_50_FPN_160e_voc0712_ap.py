"""Paper Table 2, RetinaNet + PASCAL VOC (07+12 -> 07 test), AP-loss: ResNet-50-FPN, 512x512
SSD-augmented training, test shorter side 600, 160 epochs at LR 0.001 (batch 16).
LazyConfig twin of configs/VOC-Detection/retinanet_R_50_FPN_160e_voc0712_ap.yaml."""
from ap_loss_d2 import model_zoo  # not detectron2.model_zoo: it needs pkg_resources

from .common.aploss_retinanet import model
from .common.data import voc0712 as dataloader
from .common.schedules import VOC0712_160E_ITERS
from .common.schedules import lr_multiplier_voc0712_160e as lr_multiplier

model.num_classes = 20

optimizer = model_zoo.get_config("common/optim.py").SGD
optimizer.lr = 0.001
optimizer.momentum = 0.9
optimizer.weight_decay = 1e-4

train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = VOC0712_160E_ITERS
train.checkpointer.period = 10000
train.eval_period = 0  # evaluate once, after training
