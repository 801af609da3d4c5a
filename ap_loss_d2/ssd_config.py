"""Config keys of the SSD detector (``MODEL.SSD.*``; :class:`ap_loss_d2.modeling.APLossSSD`,
its VGG-16 backbone and its prior generator). Defaults are SSD512 on PASCAL VOC."""
from detectron2.config import CfgNode as CN

__all__ = ["add_ssd_config"]


def add_ssd_config(cfg):
    """Add ``MODEL.SSD.*`` to a Detectron2 config (in place, idempotent; returns ``cfg``)."""
    if "SSD" in cfg.MODEL:
        return cfg
    s = cfg.MODEL.SSD = CN()
    # Foreground classes (PASCAL VOC: 20); the head predicts K logits per prior.
    s.NUM_CLASSES = 20
    # Backbone outputs the head predicts from (build_vgg16_ssd_backbone builds the layers up to
    # the last one): conv4_3, conv7, conv8_2 .. conv12_2 = 64, 32, 16, 8, 4, 2, 1 cells at 512.
    s.IN_FEATURES = ["conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2", "conv12_2"]
    # Width multiplier of every VGG / extra layer (1.0 = VGG-16; e.g. 0.25 for a CPU variant).
    s.VGG_WIDTH = 1.0
    # Norm after each VGG convolution: "" (VGG-16, needed for the ImageNet weights) or "BN"
    # (a narrow variant trained from scratch).
    s.VGG_NORM = ""
    # Initial per-channel scale of the L2 normalisation of conv4_3 (SSD: 20).
    s.L2NORM_SCALE = 20.0
    # Priors per level (ap_loss_d2.modeling.priors, MODEL.ANCHOR_GENERATOR.NAME:
    # SSDPriorGenerator): min size, max size (extra square sqrt(min * max)), step (centres at
    # (i + 0.5) * step), aspect ratios a >= 1 (each adds a and 1/a). SSD512 VOC values.
    s.PRIOR_MIN_SIZES = [35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8]
    s.PRIOR_MAX_SIZES = [76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6]
    s.PRIOR_STEPS = [8, 16, 32, 64, 128, 256, 512]
    s.PRIOR_ASPECT_RATIOS = [[2.0], [2.0, 3.0], [2.0, 3.0], [2.0, 3.0], [2.0, 3.0], [2.0], [2.0]]
    # Clip the priors to the AP_LOSS_INPUT.FIXED_SIZE square (Caffe SSD512: no).
    s.PRIOR_CLIP = False
    # Matching: each ground truth's best prior, then every prior with IoU >= this, is positive;
    # the rest is background (no ignore band).
    s.IOU_THRESHOLD = 0.5
    # Box deltas divided by the variances (0.1, 0.1, 0.2, 0.2), i.e. Box2BoxTransform weights.
    s.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    # Smooth-L1 beta of the box loss (SSD: 1), summed over positives and coordinates / positives.
    s.SMOOTH_L1_BETA = 1.0
    # Initial foreground probability of the class convolutions' bias (as RetinaNet's head; the
    # same for every loss); 0 = zero bias.
    s.CLS_PRIOR_PROB = 0.01
    # Inference: per-prior class scores (the loss module's `scores`) above this are candidates.
    s.SCORE_THRESH_TEST = 0.01
    # Inference: best candidates kept per level before NMS.
    s.TOPK_CANDIDATES_TEST = 1000
    # Inference: IoU of the per-class NMS (the paper's 0.5, as its RetinaNet; SSD's own is 0.45).
    # Detections kept per image: TEST.DETECTIONS_PER_IMAGE (SSD: 200).
    s.NMS_THRESH_TEST = 0.5
    # Inference: resize every image to this square inside the model (the paper tests SSD at
    # 512x512); 0 = as the test mapper gives it. Set INPUT.MIN_SIZE_TEST 0 so that the mapper
    # passes the original image.
    s.TEST_FIXED_SIZE = 512
    return cfg
