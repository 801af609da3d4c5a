"""Paper Table 2, SSD + PASCAL VOC (07+12 -> 07 test), AP-loss: SSD512 with VGG-16, SSD
augmentation at 512x512, tested at 512x512, 160 epochs at LR 0.001 (batch 16).
LazyConfig twin of configs/SSD/ssd512_vgg16_160e_voc0712_ap.yaml."""
from .common.aploss_ssd import model
from .common.data import voc0712 as dataloader

# "Other details are similar to that for RetinaNet": its VOC optimizer, schedule and training loop
from .retinanet_R_50_FPN_160e_voc0712_ap import lr_multiplier, optimizer, train

# RGB input, the SSD augmentation filling with the RGB mean; at test the image goes to the model
# as loaded (APLossSSD resizes it to 512x512).
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.augmentations.image_format = "RGB"
dataloader.train.mapper.augmentations.pixel_mean = model.pixel_mean
dataloader.test.mapper.augmentations = []

# torchvision's ImageNet VGG-16 converted by tools/convert_vgg16_to_d2.py
train.init_checkpoint = "vgg16_ssd_d2.pth"
