"""Test-only: configs/lazy/retinanet_R_50_FPN_160e_voc0712_ap.py shrunk to run in seconds on
CPU on the embedded synthetic dataset (ResNet-18, 128px images shown at 64px, 3 classes). Not a recipe."""
from detectron2.layers import ShapeSpec

from ...configs.lazy.retinanet_R_50_FPN_160e_voc0712_ap import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.num_classes = 3
model.backbone.bottom_up.stages.depth = 18
del model.backbone.bottom_up.stages.stride_in_1x1  # bottleneck-only argument
model.backbone.bottom_up.freeze_at = 0
model.backbone.out_channels = 16
model.backbone.top_block.in_channels = 512  # res5 of ResNet-18
model.head.input_shape = [ShapeSpec(channels=16)] * 5
model.head.conv_dims = [16]
model.cls_loss.images_per_ranking_set = 2  # the whole (tiny) batch: the paper's 8 cannot fit 2 images
model.anchor_generator.sizes = [[x, x * 2 ** 0.5] for x in [8, 16, 32, 64, 128]]

dataloader.train.dataset.names = "synth_shapes_train"
dataloader.train.mapper.augmentations.cfg_or_size = 64
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "synth_shapes_val"
dataloader.test.mapper.augmentations[0].short_edge_length = 64
dataloader.test.mapper.augmentations[0].max_size = 64
dataloader.test.num_workers = 0

optimizer.lr = 0.01
train.init_checkpoint = ""
train.device = "cpu"
train.max_iter = 2
train.log_period = 1
train.checkpointer.period = 1000
train.output_dir = "./output/tiny_synth_lazy"
