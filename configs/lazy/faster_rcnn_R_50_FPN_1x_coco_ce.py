"""Faster R-CNN R50-FPN on COCO (train2017 -> val2017) with stock softmax cross entropy in the
second stage: the baseline of the paper's supplementary A4.3 (Table 14, Fig. 13).

LazyConfig twin of ``configs/FasterRCNN/faster_rcnn_R_50_FPN_1x_coco_ce.yaml``: Detectron2's
model-zoo Mask R-CNN FPN model without the mask branch, ``APLossROIHeads`` with an
``APLossFastRCNNOutputLayers`` predictor (``SoftmaxCELoss``: identical to stock Faster R-CNN),
flip + shorter side sampled from 480..800 (step 32) for training, 800 for testing, 1x schedule.

    python train_net.py --config-file configs/lazy/faster_rcnn_R_50_FPN_1x_coco_ce.py
"""
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from ap_loss_d2.evaluation import get_evaluator
from ap_loss_d2.model_zoo import get_config  # not detectron2.model_zoo: it needs pkg_resources
from ap_loss_d2.losses.cls_losses import SoftmaxCELoss
from ap_loss_d2.modeling import APLossFastRCNNOutputLayers, APLossROIHeads

model = get_config("common/models/mask_rcnn_fpn.py").model
model.roi_heads._target_ = APLossROIHeads
model.roi_heads.num_classes = 80
# Faster R-CNN: no mask branch.
model.roi_heads.mask_in_features = None
model.roi_heads.mask_pooler = None
model.roi_heads.mask_head = None
model.roi_heads.box_predictor._target_ = APLossFastRCNNOutputLayers
model.roi_heads.box_predictor.cls_loss = L(SoftmaxCELoss)()

dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = False
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(
        short_edge_length=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
        sample_style="choice",
        max_size=1333,
    ),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333),
]
# Detectron2's evaluator for the dataset's evaluator_type (COCO here), usable without
# Detectron2's compiled ops.
dataloader.evaluator = L(get_evaluator)(dataset_name="${..test.dataset.names}")

optimizer = get_config("common/optim.py").SGD
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x

train = get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 90000
