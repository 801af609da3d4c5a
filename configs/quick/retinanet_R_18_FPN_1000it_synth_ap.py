"""The main job as a LazyConfig: RetinaNet + AP-loss trained from scratch on the embedded
synthetic shapes dataset, on CPU (nothing is downloaded). Twin of
configs/quick/retinanet_R_18_FPN_1000it_synth_ap.yaml: the same model, solver and data
(ResNet-18 with BN, FPN P3-P5 with 64 channels, a 2-conv head, 128px images shown at 192px,
batch 8 ranked together, 1000 iterations at LR 0.02)."""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.resnet import BasicBlock
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

from ap_loss_d2 import model_zoo  # not detectron2.model_zoo: it needs pkg_resources
from ap_loss_d2.evaluation import get_evaluator
from ap_loss_d2.losses.cls_losses import APLoss
from ap_loss_d2.modeling import APLossRetinaNet

# ResNet-18 stages res2..res5: (in, out) channels after a 32-channel stem; res2 keeps the stride.
_STAGES = [(32, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]

model = L(APLossRetinaNet)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=32, norm="BN"),
            stages=[
                L(ResNet.make_stage)(block_class=BasicBlock, num_blocks=2, in_channels=i, out_channels=o,
                                     stride_per_block=[s, 1], norm="BN")
                for i, o, s in _STAGES
            ],
            out_features=["res3", "res4", "res5"],
            freeze_at=0,
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=64,
        top_block=L(LastLevelMaxPool)(),
    ),
    head=L(RetinaNetHead)(
        input_shape=[ShapeSpec(channels=64)] * 3, num_classes="${..num_classes}", conv_dims=[64, 64],
        prior_prob=0.01, num_anchors=6,
    ),
    head_in_features=["p3", "p4", "p5"],
    anchor_generator=L(DefaultAnchorGenerator)(
        sizes=[[12, 17], [24, 34], [48, 68]], aspect_ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32], offset=0.0
    ),
    box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
    anchor_matcher=L(Matcher)(thresholds=[0.4, 0.5], labels=[0, -1, 1], allow_low_quality_matches=True),
    num_classes=3,
    smooth_l1_beta=0.0,
    test_nms_thresh=0.5,
    pixel_mean=[103.53, 116.28, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
    input_format="BGR",
    # interpolated AP-loss, linear step of width delta = 1; the 8 images of the batch ranked together
    cls_loss=L(APLoss)(delta=1.0, interpolate=True, step="linear"),
)

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="synth_shapes_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=[192], max_size=192, sample_style="choice"),
            L(T.RandomFlip)(),
        ],
        image_format="BGR",
    ),
    total_batch_size=8,
    num_workers=1,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="synth_shapes_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=192, max_size=192, sample_style="choice")],
        image_format="BGR",
    ),
    num_workers=1,
)
dataloader.evaluator = L(get_evaluator)(dataset_name="${..test.dataset.names}")

optimizer = model_zoo.get_config("common/optim.py").SGD
optimizer.lr = 0.02
optimizer.momentum = 0.9
optimizer.weight_decay = 1e-4

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[750, 920], num_updates=1000),
    warmup_length=100 / 1000,
    warmup_factor=0.001,
)

train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = ""  # trained from scratch
train.device = "cpu"
train.max_iter = 1000
train.checkpointer.period = 250
train.eval_period = 0  # evaluate once, after training
train.output_dir = "./output/main_job_lazy"
