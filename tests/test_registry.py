"""The registry of classification losses: one registration adds a loss to both models, to config
validation (yaml and LazyConfig) and to the README; the names are listed in one place."""
import ast
from pathlib import Path

import pytest
import torch

from ap_loss_d2.losses import CLS_LOSSES, cls_loss_names, get_cls_loss, register_cls_loss
from ap_loss_d2.losses.registry import ranking_targets

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # launches a process
def test_registry_is_detectron2_free():
    """The registry sits in the loss package, importable without Detectron2."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['detectron2'] = None\n"
        "from ap_loss_d2.losses import cls_loss_names; print(' '.join(cls_loss_names()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == list(CLS_LOSSES)


def test_heads_and_unknown_names():
    assert cls_loss_names("retinanet") == ("ap", "auc", "ap_ohem", "ap_random", "focal", "ce_ohem", "ap_approx", "ap_hinge", "ghm", "dr")
    assert cls_loss_names("roi_heads") == ("ap", "auc", "ce")
    with pytest.raises(ValueError, match=r"cls_loss='focal' is not a classification loss for the roi_heads head; valid names: ap, auc, ce"):
        get_cls_loss("focal", "roi_heads")
    with pytest.raises(ValueError, match="already registered"):
        register_cls_loss("ap", heads=("retinanet",))(lambda *a, **k: None)
    with pytest.raises(ValueError, match="heads must be"):
        register_cls_loss("x", heads=("fcos",))


def test_loss_names_listed_in_one_place():
    """No module of the package spells out the list of loss names of a head (a tuple/list/set
    literal of exactly those names, as the former RETINANET_LOSSES / ROI_HEAD_LOSSES); the
    registry registers them one by one. (A study may choose a subset as its default.)"""
    lists = [set(cls_loss_names(h)) for h in ("retinanet", "roi_heads")] + [set(CLS_LOSSES)]
    found = []
    for path in (REPO / "ap_loss_d2").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 3:
                values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if len(values) == len(node.elts) and values in lists:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == [], found


def test_readme_lists_the_registry():
    """The README's table of losses is the registry's (``python -m ap_loss_d2.losses``)."""
    from ap_loss_d2.losses.registry import registry_table

    assert registry_table() in (REPO / "README.md").read_text()


# ------------------------------------------------------------------------------------------------
# A toy loss: one registration, then both models train with it and validation accepts it.
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def toy_loss():
    calls = []

    @register_cls_loss("toy_brier", heads=("retinanet", "roi_heads"), options=("delta",))
    def toy_brier(logits, gt_labels, num_classes, *, stats, delta):
        """Brier score of per-class sigmoids against the ranking targets, times ``delta``."""
        targets = ranking_targets(gt_labels, num_classes).to(logits.dtype)
        keep = targets >= 0
        stats["num_pos"] = int((targets == 1).sum())
        calls.append(tuple(logits.shape))
        return delta * ((logits.sigmoid() - targets)[keep] ** 2).sum() / max(int(keep.sum()), 1)

    yield calls
    CLS_LOSSES.pop("toy_brier")


def test_toy_loss_trains_retinanet_and_roi_heads(toy_loss):
    pytest.importorskip("detectron2")
    from detectron2.modeling import build_model

    from ap_loss_d2.engine import validate_cfg

    from . import test_faster_rcnn as frcnn
    from . import test_retinanet as retina

    cfg = retina.tiny_cfg("toy_brier")
    cfg.MODEL.CLS_LOSS.DELTA = 2.0
    validate_cfg(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    losses, storage = retina.train_step(model, retina.make_batch())
    assert len(toy_loss) == 1 and len(toy_loss[0]) == 3  # (N, R, K)
    assert losses["loss_cls"] > 0 and storage.latest()["cls_loss/num_pos"][0] > 0
    grad = model.head.cls_score.weight.grad
    assert grad is not None and grad.abs().sum() > 0

    model = frcnn.tiny_model("toy_brier")  # validate_cfg runs inside
    assert model.roi_heads.box_predictor.cls_score.out_features == frcnn.NUM_CLASSES  # K logits
    losses, scalars, grads = frcnn.train_step(model, frcnn.make_batch())
    assert len(toy_loss[1]) == 2  # (sum R_i, K)
    assert losses["loss_cls"] > 0 and scalars["cls_loss/num_pos"] > 0
    assert grads["roi_heads.box_predictor.cls_score.weight"].abs().sum() > 0


def test_toy_loss_in_lazy_config(toy_loss):
    pytest.importorskip("detectron2")
    from detectron2.config import LazyConfig

    from ap_loss_d2.engine import validate_lazy_cfg

    cfg = LazyConfig.load(str(REPO / "configs" / "lazy" / "retinanet_R_50_FPN_160e_voc0712_ap.py"))
    cfg.model.cls_loss = "toy_brier"
    validate_lazy_cfg(cfg)
    cfg.model.cls_loss = "toy_brierr"
    with pytest.raises(ValueError, match="model.cls_loss='toy_brierr'.*valid names: .*toy_brier"):
        validate_lazy_cfg(cfg)
