"""Faster R-CNN with AP-loss in the second stage (CPU, offline, fast).

Tiny models: ResNet-18-FPN (16 channels) on 64px random images, built from the repository's
configs. ``MODEL.WEIGHTS`` is empty everywhere, nothing is downloaded.
"""
import inspect
import re
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.box_regression import Box2BoxTransform  # noqa: E402
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, StandardROIHeads  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from ap_loss_d2.losses.registry import cls_loss_names  # noqa: E402
from ap_loss_d2.engine import get_ap_loss_cfg, validate_cfg  # noqa: E402
from ap_loss_d2.losses.cls_losses import APLoss  # noqa: E402
from ap_loss_d2.modeling import APLossFastRCNNOutputLayers, APLossROIHeads  # noqa: E402

ROI_HEAD_LOSSES = cls_loss_names("roi_heads")
REPO = Path(__file__).resolve().parents[1]
YAML_DIR = REPO / "configs" / "FasterRCNN"
LAZY_DIR = REPO / "configs" / "lazy"
TINY_CONFIG = YAML_DIR / "faster_rcnn_R_18_FPN_600it_synth_ce.yaml"
NUM_CLASSES = 3
SIZE = 64
PAPER_TRAIN_SIZES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)


@pytest.fixture(autouse=True)
def _one_thread():
    """The tests run on small shared CPUs: avoid oversubscribing them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg(loss, roi_heads="APLossROIHeads"):
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(TINY_CONFIG))
    # fmt: off
    cfg.merge_from_list(
        [
            "MODEL.CLS_LOSS.NAME", loss,
            "MODEL.ROI_HEADS.NAME", roi_heads,
            "MODEL.WEIGHTS", "",
            "MODEL.DEVICE", "cpu",
            "MODEL.FPN.OUT_CHANNELS", "16",
            "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
            "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        ]
    )
    # fmt: on
    validate_cfg(cfg)
    return cfg


def tiny_model(loss, seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(loss, **kwargs))


def make_batch(kind="gt", seed=0):
    """Two 64px images. kind: "gt" (objects in both), "mixed" (the second has no
    annotation), "no_gt" (no annotation at all: every sampled RoI is background)."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([[4.0, 6, 24, 30], [30.0, 28, 58, 50], [40.0, 4, 60, 20]])
    classes = torch.tensor([0, 2, 1])
    batch = []
    for i in range(2):
        inst = Instances((SIZE, SIZE))
        empty = kind == "no_gt" or (kind == "mixed" and i == 1)
        inst.gt_boxes = Boxes(torch.zeros((0, 4)) if empty else boxes + 2 * i)
        inst.gt_classes = torch.zeros(0, dtype=torch.int64) if empty else classes
        image = torch.randint(0, 256, (3, SIZE, SIZE), generator=g).float()
        batch.append({"image": image, "instances": inst, "height": SIZE, "width": SIZE})
    return batch


def train_step(model, batch, seed=0):
    """Losses, scalars put into the event storage, and parameter gradients of one step."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the RPN / RoI samplers draw from the global RNG
    with EventStorage() as storage:
        losses = model(batch)
        sum(losses.values()).backward()
        scalars = {k: v for k, (v, _) in storage.latest().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, scalars, grads


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


def _loss_of(path):
    return re.search(r"_(ap|auc|ce)\.(yaml|py)$", path.name).group(1)


YAMLS = sorted(YAML_DIR.glob("faster_rcnn_*.yaml"))
LAZIES = sorted(LAZY_DIR.glob("faster_rcnn_*.py"))


def test_config_files_exist():
    names = {p.stem for p in YAMLS}
    for dataset in ("voc0712", "coco"):
        for loss in ("ap", "ce"):
            pattern = rf"faster_rcnn_R_50_FPN_\w+_{dataset}_{loss}"
            assert any(re.fullmatch(pattern, n) for n in names), (dataset, loss)
    assert {p.stem for p in LAZIES} == names - {n for n in names if "_R_18_" in n}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_config_loads_and_builds(path):
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    validate_cfg(cfg)  # the engine's start-up check of MODEL.CLS_LOSS.NAME
    loss = _loss_of(path)
    assert cfg.MODEL.CLS_LOSS.NAME == loss
    assert cfg.MODEL.ROI_HEADS.NAME == "APLossROIHeads"
    assert cfg.INPUT.RANDOM_FLIP == "horizontal"
    if "_R_50_" in path.name:  # the paper's A4.3 setting
        assert cfg.MODEL.RESNETS.DEPTH == 50
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == PAPER_TRAIN_SIZES
        assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice"
        assert cfg.INPUT.MIN_SIZE_TEST == 800
        if "voc0712" in path.name:
            assert tuple(cfg.DATASETS.TRAIN) == ("voc_2007_trainval", "voc_2012_trainval")
            assert tuple(cfg.DATASETS.TEST) == ("voc_2007_test",)
        else:
            assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train",)
    model = build_model(cfg)
    assert isinstance(model.roi_heads, APLossROIHeads)
    predictor = model.roi_heads.box_predictor
    assert isinstance(predictor, APLossFastRCNNOutputLayers) and predictor.cls_loss.name == loss
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    assert predictor.cls_score.out_features == (k + 1 if loss == "ce" else k)


@pytest.mark.parametrize("path", LAZIES, ids=lambda p: p.name)
def test_lazy_config_loads_and_builds(path):
    cfg = LazyConfig.load(str(path))
    loss = _loss_of(path)
    assert cfg.model.roi_heads.box_predictor.cls_loss._target_.name == loss
    train_aug, flip = cfg.dataloader.train.mapper.augmentations
    assert tuple(train_aug.short_edge_length) == PAPER_TRAIN_SIZES
    assert train_aug.sample_style == "choice" and flip.horizontal
    assert cfg.dataloader.test.mapper.augmentations[0].short_edge_length == 800
    assert cfg.train.init_checkpoint.endswith("R-50.pkl")  # not loaded here
    model = instantiate(cfg.model)
    assert isinstance(model.roi_heads, APLossROIHeads) and not model.roi_heads.mask_on
    predictor = model.roi_heads.box_predictor
    assert isinstance(predictor, APLossFastRCNNOutputLayers) and predictor.cls_loss.name == loss
    k = 20 if "voc" in path.name else 80
    assert predictor.cls_score.out_features == (k + 1 if loss == "ce" else k)


def test_lazy_twin_matches_yaml():
    """The LazyConfig and yaml VOC AP-loss configs describe the same model."""
    lazy = LazyConfig.load(str(LAZY_DIR / "faster_rcnn_R_50_FPN_18k_voc0712_ap.py"))
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(YAML_DIR / "faster_rcnn_R_50_FPN_18k_voc0712_ap.yaml"))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    a, b = instantiate(lazy.model), build_model(cfg)
    pa, pb = a.roi_heads.box_predictor, b.roi_heads.box_predictor
    assert pa.cls_loss.name == pb.cls_loss.name == "ap" and pa.cls_loss.options == pb.cls_loss.options
    assert vars(pa.cls_loss.sets) == vars(pb.cls_loss.sets)
    assert pa.loss_weight == pb.loss_weight
    shapes_a = {k: v.shape for k, v in a.state_dict().items()}
    assert shapes_a == {k: v.shape for k, v in b.state_dict().items()}
    assert lazy.train.max_iter == cfg.SOLVER.MAX_ITER
    assert list(lazy.lr_multiplier.scheduler.milestones) == list(cfg.SOLVER.STEPS)


def test_invalid_loss_name():
    cfg = tiny_cfg("ce")
    cfg.MODEL.CLS_LOSS.NAME = "focal"  # RetinaNet only
    with pytest.raises(ValueError, match="'focal' is not a classification loss for the roi_heads head; valid names: ap, auc, ce"):
        build_model(cfg)


@pytest.mark.skipif(
    "use_sigmoid_ce" not in inspect.signature(FastRCNNOutputLayers.__init__).parameters,
    reason="Detectron2 without FastRCNNOutputLayers(use_sigmoid_ce=...) (v0.6)",
)
def test_ranking_loss_rejects_sigmoid_ce_option():
    with pytest.raises(ValueError, match="use_sigmoid_ce"):
        APLossFastRCNNOutputLayers(
            ShapeSpec(channels=8),
            box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
            num_classes=NUM_CLASSES,
            cls_loss=APLoss(),
            use_sigmoid_ce=True,
        )


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gt", "mixed", "no_gt"])
@pytest.mark.parametrize("loss", ROI_HEAD_LOSSES)
def test_forward_backward_finite(loss, kind):
    model = tiny_model(loss)
    predictor = model.roi_heads.box_predictor
    expected_logits = NUM_CLASSES + 1 if loss == "ce" else NUM_CLASSES
    assert predictor.cls_score.out_features == expected_logits
    losses, scalars, grads = train_step(model, make_batch(kind))
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), (name, value)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert "cls_loss/time" not in scalars  # opt-in: MODEL.CLS_LOSS.DIAGNOSTICS
    cls_grad = grads["roi_heads.box_predictor.cls_score.weight"]
    if loss != "ce":
        num_pos = scalars["cls_loss/num_pos"]
        if kind == "no_gt":
            # every sampled RoI is background: no positive, zero loss and zero gradient
            assert num_pos == 0
            assert losses["loss_cls"].item() == 0.0 and not cls_grad.any()
            assert losses["loss_box_reg"].item() == 0.0
        else:
            # every gt box is appended to the proposals, so each is a positive
            assert num_pos >= (6 if kind == "gt" else 3)
            assert 0.0 < losses["loss_cls"].item() <= 1.0
            assert cls_grad.abs().sum() > 0
            assert scalars["cls_loss/num_neg_nontrivial"] > 0
    else:
        assert cls_grad.abs().sum() > 0


def test_ranking_loss_ranks_all_rois_and_classes_together():
    """The loss sees (R, K) logits of the whole batch with the Fig. 3 labels."""
    model = tiny_model("ap")
    predictor = model.roi_heads.box_predictor
    seen = {}
    original = APLossFastRCNNOutputLayers.losses

    def spy(self, predictions, proposals):
        seen["scores"] = predictions[0].detach()
        seen["gt_classes"] = torch.cat([p.gt_classes for p in proposals])
        return original(self, predictions, proposals)

    predictor.losses = spy.__get__(predictor)
    _, scalars, _ = train_step(model, make_batch("gt"))
    scores, gt = seen["scores"], seen["gt_classes"]
    assert scores.shape == (gt.numel(), NUM_CLASSES)
    assert gt.numel() == 2 * 64  # both images' sampled RoIs, in one ranking
    fg = gt < NUM_CLASSES
    assert scalars["cls_loss/num_pos"] == fg.sum().item()  # one positive entry per fg RoI
    # every other (RoI, class) entry is a negative; the non-trivial ones are a subset
    assert scalars["cls_loss/num_neg_nontrivial"] <= gt.numel() * NUM_CLASSES - fg.sum().item()


@pytest.mark.parametrize("kind", ["gt", "no_gt"])
def test_ce_equals_stock_faster_rcnn(kind):
    stock = tiny_model("ce", roi_heads="StandardROIHeads")
    ours = tiny_model("ce", seed=1)
    assert type(stock.roi_heads) is StandardROIHeads
    assert type(stock.roi_heads.box_predictor) is FastRCNNOutputLayers
    assert type(ours.roi_heads.box_predictor) is APLossFastRCNNOutputLayers
    ours.load_state_dict(stock.state_dict())  # strict: same parameters and buffers
    batch = make_batch(kind)
    stock_losses, stock_scalars, stock_grads = train_step(stock, batch, seed=7)
    our_losses, our_scalars, our_grads = train_step(ours, batch, seed=7)
    assert stock_losses.keys() == our_losses.keys()
    for k in stock_losses:
        assert torch.equal(stock_losses[k], our_losses[k]), k
    assert stock_grads.keys() == our_grads.keys()
    for k in stock_grads:
        assert torch.equal(stock_grads[k], our_grads[k]), k
    for k, v in stock_scalars.items():  # sampling statistics, accuracies
        assert our_scalars[k] == v, k
    stock.eval()
    ours.eval()
    with torch.no_grad():
        a = stock(make_batch("gt", seed=5))
        b = ours(make_batch("gt", seed=5))
    for x, y in zip(a, b):
        x, y = x["instances"], y["instances"]
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
        assert torch.equal(x.scores, y.scores) and torch.equal(x.pred_classes, y.pred_classes)


# ------------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ROI_HEAD_LOSSES)
def test_inference_returns_instances(loss):
    model = tiny_model(loss)
    model.eval()
    with torch.no_grad():
        outputs = model(make_batch("gt", seed=3))
    assert len(outputs) == 2
    for out in outputs:
        inst = out["instances"]
        assert isinstance(inst, Instances) and inst.image_size == (SIZE, SIZE)
        assert len(inst) > 0
        assert inst.pred_boxes.tensor.shape == (len(inst), 4)
        assert inst.pred_classes.min() >= 0 and inst.pred_classes.max() < NUM_CLASSES
        assert inst.scores.min() >= 0 and inst.scores.max() <= 1


def _proposals(n_per_image=(30, 20), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in n_per_image:
        xy = torch.rand(n, 2, generator=g) * 40
        wh = 4 + torch.rand(n, 2, generator=g) * 20
        inst = Instances((SIZE, SIZE))
        inst.proposal_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        out.append(inst)
    return out


@pytest.mark.parametrize("loss", ["ap", "auc"])
def test_ranking_inference_uses_per_class_sigmoid(loss):
    model = tiny_model(loss)
    predictor = model.roi_heads.box_predictor.eval()
    predictor.test_score_thresh = 0.0
    proposals = _proposals()
    features = torch.randn(sum(len(p) for p in proposals), predictor.cls_score.in_features) * 30
    with torch.no_grad():
        logits, deltas = predictor(features)
        probs = predictor.predict_probs((logits, deltas), proposals)
        instances, kept = predictor.inference((logits, deltas), proposals)
    assert logits.shape[1] == NUM_CLASSES
    # (Ri, K + 1), per-class sigmoid, background column 0 (what fast_rcnn_inference expects)
    assert [p.shape for p in probs] == [(len(p), NUM_CLASSES + 1) for p in proposals]
    expected = torch.cat([logits.sigmoid(), torch.zeros(len(logits), 1)], dim=1)
    assert torch.equal(torch.cat(probs), expected)
    # each detection's score is the sigmoid of its RoI's logit for its class
    per_image = logits.split([len(p) for p in proposals])
    for inst, idx, logit, prob in zip(instances, kept, per_image, probs):
        assert len(inst) > 0 and inst.has("pred_boxes")
        assert torch.equal(inst.scores, prob[idx, inst.pred_classes])
        expected = logit[idx, inst.pred_classes].sigmoid()
        torch.testing.assert_close(inst.scores, expected, rtol=0, atol=1e-6)
        assert inst.scores.min() >= 0 and inst.scores.max() <= 1


def test_ce_inference_is_stock_softmax():
    model = tiny_model("ce")
    predictor = model.roi_heads.box_predictor.eval()
    proposals = _proposals()
    features = torch.randn(sum(len(p) for p in proposals), predictor.cls_score.in_features)
    with torch.no_grad():
        predictions = predictor(features)
        ours = predictor.predict_probs(predictions, proposals)
        stock = FastRCNNOutputLayers.predict_probs(predictor, predictions, proposals)
    for a, b in zip(ours, stock):
        assert torch.equal(a, b)
    assert torch.allclose(torch.cat(ours).sum(1), torch.ones(len(features)))
