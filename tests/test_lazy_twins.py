"""LazyConfig is a true twin of the yaml route: every paper yaml config has a LazyConfig twin that
builds a model with the same arguments (or is a listed exception); the NaN stop and
``verify_results`` serve both routes."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from ap_loss_d2.engine import get_ap_loss_cfg  # noqa: E402
from .params import slow_except  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAPER_YAML = sorted(
    p for d in ("VOC-Detection", "COCO-Detection", "FasterRCNN") for p in (REPO / "configs" / d).glob("*.yaml")
    if not p.name.startswith("Base-")
)
#: yaml configs without a LazyConfig twin, and why.
NO_TWIN = {
    "retinanet_R_101_FPN_160e_voc0712_ap500": "ResNet-101 variants of Table 3/4: yaml only",
    "retinanet_R_101_FPN_160e_voc0712_ap800": "ResNet-101 variants of Table 3/4: yaml only",
    "retinanet_R_101_FPN_100e_coco_ap500": "ResNet-101 variants of Table 3/4: yaml only",
    "retinanet_R_101_FPN_100e_coco_ap800": "ResNet-101 variants of Table 3/4: yaml only",
    "faster_rcnn_R_18_FPN_600it_synth_ap": "embedded-dataset study config (tools' RoI-sampling study)",
    "faster_rcnn_R_18_FPN_600it_synth_ce": "embedded-dataset study config (tools' RoI-sampling study)",
}
RETINANET_ARGS = (
    "box_reg_weight", "box_reg_normalizer", "num_classes",
    "test_score_thresh", "test_topk_candidates", "test_nms_thresh", "max_detections_per_image",
    "smooth_l1_beta", "box_reg_loss_type", "input_format",
)
PREDICTOR_ARGS = (
    "loss_weight", "num_classes", "test_score_thresh", "test_nms_thresh", "test_topk_per_image",
    "smooth_l1_beta", "box_reg_loss_type",
)


def _loss_arguments(loss):
    """The class and the plain-valued attributes of a loss module (its constructor arguments)."""
    plain = (bool, int, float, str, dict, tuple)
    out = {k: v for k, v in vars(loss).items() if not k.startswith("_") and isinstance(v, plain)}
    if hasattr(loss, "sets"):
        out["sets"] = vars(loss.sets)
    return type(loss).__name__, out


def _arguments(model):
    """The constructor arguments a model keeps (plain values), by name."""
    if hasattr(model, "roi_heads"):
        p = model.roi_heads.box_predictor
        out = {k: getattr(p, k) for k in PREDICTOR_ARGS}
        out["cls_loss"] = _loss_arguments(p.cls_loss)
        out["box2box_weights"] = tuple(p.box2box_transform.weights)
        out["roi_batch"] = model.roi_heads.batch_size_per_image
        out["roi_positive_fraction"] = model.roi_heads.positive_fraction
    else:
        out = {k: getattr(model, k) for k in RETINANET_ARGS}
        out["cls_loss"] = _loss_arguments(model.cls_loss)
        out["box2box_weights"] = tuple(model.box2box_transform.weights)
        out["cell_anchors"] = list(model.anchor_generator.cell_anchors)
    out["pixel_mean"] = model.pixel_mean.flatten().tolist()
    out["pixel_std"] = model.pixel_std.flatten().tolist()
    out["parameter_shapes"] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return out


def test_no_twin_list_is_current():
    stems = {p.stem for p in PAPER_YAML}
    assert set(NO_TWIN) <= stems, set(NO_TWIN) - stems


@pytest.mark.parametrize(
    "path",
    slow_except(
        [p for p in PAPER_YAML if p.stem not in NO_TWIN],
        {REPO / "configs" / "VOC-Detection" / "retinanet_R_50_FPN_160e_voc0712_ap.yaml",
         REPO / "configs" / "FasterRCNN" / "faster_rcnn_R_50_FPN_18k_voc0712_ap.yaml"},
        ids=lambda p: p.stem,
    ),
)
def test_yaml_config_has_lazy_twin_with_same_arguments(path):
    twin = REPO / "configs" / "lazy" / f"{path.stem}.py"
    assert twin.exists(), f"{path.relative_to(REPO)} has no LazyConfig twin {twin.relative_to(REPO)}"
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    lazy = LazyConfig.load(str(twin))
    torch.set_num_threads(1)
    a, b = _arguments(build_model(cfg)), _arguments(instantiate(lazy.model))
    for x, y in zip(a.pop("cell_anchors", []), b.pop("cell_anchors", [])):  # yaml sizes: 3 decimals
        torch.testing.assert_close(x, y, rtol=0, atol=1e-3)
    assert a == b, {k: (a[k], b[k]) for k in a if a[k] != b.get(k)}


def test_cls_loss_weight_is_one_argument_on_both_heads():
    """MODEL.CLS_LOSS.WEIGHT is the loss module's ``weight`` on both heads, yaml and lazy alike;
    Faster R-CNN's native "ce" applies it through Detectron2's ``loss_weight``."""
    stem = "faster_rcnn_R_50_FPN_18k_voc0712_ap"
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(REPO / "configs" / "FasterRCNN" / f"{stem}.yaml"))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.CLS_LOSS.WEIGHT", "0.5"])
    lazy = LazyConfig.load(str(REPO / "configs" / "lazy" / f"{stem}.py"))
    lazy.model.roi_heads.box_predictor.cls_loss.weight = 0.5
    a, b = build_model(cfg).roi_heads.box_predictor, instantiate(lazy.model).roi_heads.box_predictor
    assert a.cls_loss.weight == b.cls_loss.weight == 0.5 and a.loss_weight == b.loss_weight
    cfg.merge_from_list(["MODEL.CLS_LOSS.NAME", "ce"])
    assert build_model(cfg).roi_heads.box_predictor.loss_weight["loss_cls"] == 0.5
