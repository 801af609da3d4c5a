"""The registry of classification losses: a loss is one ``ClsLoss`` class with one registration,
and both heads train with it from yaml and from LazyConfig; the names are listed in one place;
``from ap_loss_d2 import ap_loss`` stays free of Detectron2."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import LazyCall as L  # noqa: E402
from detectron2.config import LazyConfig, configurable, instantiate  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from ap_loss_d2.losses.base import loss_arguments  # noqa: E402
from ap_loss_d2.losses.ranking_sets import ranking_targets  # noqa: E402
from ap_loss_d2.losses.registry import (  # noqa: E402
    CLS_LOSS_REGISTRY,
    ClsLoss,
    build_cls_loss,
    check_number,
    cls_loss_label,
    cls_loss_names,
    registry_table,
)

REPO = Path(__file__).resolve().parents[1]


class ToyBrier(ClsLoss):
    """Brier score of per-class sigmoids against the ranking targets, times ``scale``"""

    name, label = "toy_brier", "Toy Brier"
    heads = ("retinanet", "roi_heads")
    calls = []

    @configurable
    def __init__(self, *, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = check_number("scale", scale)

    @classmethod
    def from_config(cls, cfg):
        return {**super().from_config(cfg), "scale": cfg.MODEL.CLS_LOSS.DELTA}

    def loss(self, logits, gt_labels, stats, normalizer, entries_per_image):
        targets = ranking_targets(gt_labels, logits.shape[-1]).to(logits.dtype)
        keep = targets >= 0
        stats["num_pos"] = int((targets == 1).sum())
        ToyBrier.calls.append((tuple(logits.shape), self.scale))
        return self.scale * ((logits.sigmoid() - targets)[keep] ** 2).sum() / keep.sum().clamp(min=1)


@pytest.fixture
def toy_loss():
    CLS_LOSS_REGISTRY.register(ToyBrier)  # the one registration
    ToyBrier.calls.clear()
    yield ToyBrier.calls
    del CLS_LOSS_REGISTRY._obj_map["ToyBrier"]  # fvcore's Registry has no public unregister


def test_names_heads_and_labels():
    assert cls_loss_names("retinanet") == ("ap", "auc", "ap_ohem", "ap_random", "focal", "ce_ohem", "ap_approx", "ap_hinge", "ghm", "dr")
    assert cls_loss_names("roi_heads") == ("ap", "auc", "ce")
    assert cls_loss_names("ssd") == ("ap", "auc", "ap_ohem", "ap_random", "focal", "ce_ohem")
    assert cls_loss_label("ap") == "AP-loss" and cls_loss_label("focal") == "Focal loss"
    for name in cls_loss_names():
        assert cls_loss_label(name)


def test_unknown_name_lists_the_valid_ones():
    from . import test_faster_rcnn as frcnn

    cfg = frcnn.tiny_cfg("ce")
    cfg.MODEL.CLS_LOSS.NAME = "focal"
    with pytest.raises(ValueError, match=r"MODEL.CLS_LOSS.NAME='focal' is not a classification loss for the roi_heads head; valid names: ap, auc, ce"):
        build_cls_loss(cfg, "roi_heads")


def test_loss_names_listed_in_one_place():
    """No module of the package spells out the list of loss names of a head (a tuple/list/set
    literal of exactly those names); each class registers itself. (A study may choose a
    subset as its default.)"""
    lists = [set(cls_loss_names(h)) for h in ("retinanet", "roi_heads", "ssd")] + [set(cls_loss_names())]
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
    assert registry_table() in (REPO / "README.md").read_text()


@pytest.mark.slow  # starts a Python process
def test_loss_function_import_leaves_detectron2_out():
    code = "import sys\nfrom ap_loss_d2 import ap_loss\nfrom ap_loss_d2.losses import auc_loss\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'detectron2'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout
    assert "FutureWarning" not in out.stderr, out.stderr


def test_toy_loss_trains_both_heads_from_yaml(toy_loss):
    from . import test_faster_rcnn as frcnn
    from . import test_retinanet as retina

    cfg = retina.tiny_cfg("toy_brier")
    cfg.MODEL.CLS_LOSS.DELTA = 2.0
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.cls_loss, ToyBrier) and model.cls_loss.scale == 2.0
    losses, storage = retina.train_step(model, retina.make_batch())
    assert toy_loss[-1][0][0] == 2 and len(toy_loss[-1][0]) == 3  # (N, R, K)
    assert losses["loss_cls"] > 0 and storage.latest()["cls_loss/num_pos"][0] > 0
    assert model.head.cls_score.weight.grad.abs().sum() > 0

    model = frcnn.tiny_model("toy_brier")
    assert model.roi_heads.box_predictor.cls_score.out_features == frcnn.NUM_CLASSES  # K logits
    losses, scalars, grads = frcnn.train_step(model, frcnn.make_batch())
    assert len(toy_loss[-1][0]) == 2  # (sum R_i, K)
    assert losses["loss_cls"] > 0 and scalars["cls_loss/num_pos"] > 0
    assert grads["roi_heads.box_predictor.cls_score.weight"].abs().sum() > 0


def test_toy_loss_trains_both_heads_from_lazy_config(toy_loss):
    from . import test_faster_rcnn as frcnn
    from . import test_retinanet as retina

    cfg = LazyConfig.load(str(REPO / "tests" / "configs" / "tiny_synth_retinanet_lazy.py"))
    cfg.model.cls_loss = L(ToyBrier)(scale=3.0)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    losses, _ = retina.train_step(model, retina.make_batch())
    assert toy_loss[-1][1] == 3.0 and losses["loss_cls"] > 0
    assert model.head.cls_score.weight.grad.abs().sum() > 0

    cfg = LazyConfig.load(str(REPO / "configs" / "lazy" / "faster_rcnn_R_50_FPN_18k_voc0712_ap.py"))
    cfg.model.roi_heads.num_classes = frcnn.NUM_CLASSES
    cfg.model.roi_heads.box_predictor.cls_loss = L(ToyBrier)(scale=0.5)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    losses, _, grads = frcnn.train_step(model, frcnn.make_batch())
    assert toy_loss[-1][1] == 0.5 and len(toy_loss[-1][0]) == 2
    # an untrained ResNet-50 saturates the sigmoids: the gradient is tiny but reaches the classifier
    assert "roi_heads.box_predictor.cls_score.weight" in grads and torch.isfinite(losses["loss_cls"])

    cfg.model.roi_heads.box_predictor.cls_loss = L(ToyBrier)(scale=-1.0)
    with pytest.raises(ValueError, match=r"scale=-1.0 must be a finite number > 0"):
        instantiate(cfg.model)


def test_valid_arguments_cover_what_yaml_passes():
    """The arguments an unknown-argument error lists are those the constructors take: every key
    that ``from_config`` of a built-in loss passes is among them, and each is accepted alone."""
    from . import test_retinanet as retina

    cfg = retina.tiny_cfg("ap")
    for name in cls_loss_names():
        cls = CLS_LOSS_REGISTRY.classes()[name]
        passed = cls.from_config(cfg)
        assert set(passed) <= set(loss_arguments(cls)), name
        with pytest.raises(TypeError, match=rf"{cls.__name__} \('{name}'\) got unknown argument\(s\) 'nope'; valid arguments: {', '.join(loss_arguments(cls))}$"):
            cls(**passed, nope=1)
