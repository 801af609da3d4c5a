"""Paper Table 2, SSD + PASCAL VOC (07+12 -> 07 test), AP-loss: SSD512 with VGG-16, SSD
augmentation at 512x512, tested at 512x512, 160 epochs at LR 0.001 (batch 16).
LazyConfig twin of configs/SSD/ssd512_vgg16_160e_voc0712_ap.yaml."""
from ap_loss_d2 import model_zoo  # not detectron2.model_zoo: it needs pkg_resources

from .common.aploss_ssd import model
from .common.data import voc0712 as dataloader
from .common.schedules import VOC0712_160E_ITERS
from .common.schedules import lr_multiplier_voc0712_160e as lr_multiplier

# RGB input, the SSD augmentation filling with the RGB mean; at test the image goes to the model
# as loaded (APLossSSD resizes it to 512x512).
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.augmentations.image_format = "RGB"
dataloader.train.mapper.augmentations.pixel_mean = model.pixel_mean
dataloader.test.mapper.augmentations = []

optimizer = model_zoo.get_config("common/optim.py").SGD
optimizer.lr = 0.001
optimizer.momentum = 0.9
optimizer.weight_decay = 1e-4

train = model_zoo.get_config("common/train.py").train
# torchvision's ImageNet VGG-16 converted by tools/convert_vgg16_to_d2.py
train.init_checkpoint = "vgg16_ssd_d2.pth"
train.max_iter = VOC0712_160E_ITERS
train.checkpointer.period = 10000
train.eval_period = 0  # evaluate once, after training
