"""APLossRetinaNet on tiny synthetic batches (CPU): every loss trains, "focal" is exactly stock
RetinaNet, empty images are handled; the evaluator selection."""
import copy
import json
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog  # noqa: E402
from detectron2.data import build_detection_test_loader  # noqa: E402
from detectron2.evaluation import (  # noqa: E402
    COCOEvaluator,
    PascalVOCDetectionEvaluator,
    inference_on_dataset,
)
from detectron2.modeling import RetinaNet, build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from ap_loss_d2.losses.registry import cls_loss_names  # noqa: E402
from ap_loss_d2.engine import get_ap_loss_cfg  # noqa: E402
from ap_loss_d2.evaluation import SUPPORTED_EVALUATOR_TYPES, build_evaluator  # noqa: E402
from ap_loss_d2.modeling import APLossRetinaNet  # noqa: E402

from .params import slow_except  # noqa: E402

RETINANET_LOSSES = cls_loss_names("retinanet")
REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "tests" / "configs" / "tiny_synth_retinanet.yaml"
SIZE = 64


def tiny_cfg(loss="ap", arch="APLossRetinaNet"):
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(TINY_YAML))
    cfg.MODEL.META_ARCHITECTURE = arch
    cfg.MODEL.CLS_LOSS.NAME = loss
    return cfg


def make_batch(num_objects=(3, 2), seed=0):
    """Images of SIZE x SIZE with random boxes (classes 0..2); 0 objects gives an empty image."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for n in num_objects:
        xy = torch.rand(n, 2, generator=g) * (SIZE - 20)
        wh = 6 + torch.rand(n, 2, generator=g) * 14
        inst = Instances((SIZE, SIZE))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 3, (n,), generator=g)
        image = torch.randint(0, 256, (3, SIZE, SIZE), generator=g).float()
        batch.append({"image": image, "instances": inst, "height": SIZE, "width": SIZE})
    return batch


@pytest.fixture(autouse=True)
def _few_threads(one_thread):
    """Every test of this module runs torch on one thread (tests/conftest.py)."""


def train_step(model, batch):
    model.train()
    model.zero_grad()
    with EventStorage() as storage:
        losses = model(batch)
        sum(losses.values()).backward()
    return losses, storage


@pytest.mark.parametrize("loss", RETINANET_LOSSES)
def test_forward_backward(loss):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(loss))
    assert isinstance(model, APLossRetinaNet) and model.cls_loss.name == loss
    losses, storage = train_step(model, make_batch())
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    for name, value in losses.items():
        assert torch.isfinite(value).all(), (name, value)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    cls_grad = model.head.cls_score.weight.grad
    assert cls_grad.abs().sum() > 0, "the classification loss reaches the classifier"
    history = storage.histories()
    assert "cls_loss/time" not in history  # opt-in: MODEL.CLS_LOSS.DIAGNOSTICS
    if loss in ("ap", "auc"):
        assert history["cls_loss/num_pos"].latest() > 0
        assert "cls_loss/num_neg_nontrivial" in history


@pytest.mark.parametrize("loss", slow_except(RETINANET_LOSSES, {"ap", "focal", "ce_ohem"}))
def test_batch_without_objects(loss):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(loss))
    losses, _ = train_step(model, make_batch(num_objects=(0, 0)))
    for name, value in losses.items():
        assert torch.isfinite(value).all(), (name, value)
    for p in model.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
    # one empty image next to one with objects
    losses, _ = train_step(model, make_batch(num_objects=(0, 2), seed=1))
    assert all(torch.isfinite(v).all() for v in losses.values())


def test_focal_is_stock_retinanet():
    from fvcore.nn import sigmoid_focal_loss_jit

    for _ in range(3):  # TorchScript profiles its first calls: compare both models after that
        x = torch.zeros(2, 3, requires_grad=True)
        sigmoid_focal_loss_jit(x, torch.ones(2, 3), alpha=0.25, gamma=2.0, reduction="sum").backward()
    cfg_ours = tiny_cfg("focal")
    # Detectron2's box-loss normaliser (the default of MODEL.CLS_LOSS); the tiny config inherits
    # the paper configs' "batch_mean" (tested in test_focal_weight_and_batch_mean_box_loss).
    cfg_ours.MODEL.AP_LOSS_RETINANET.BOX_REG_NORMALIZER = "ema"
    cfg_stock = tiny_cfg("focal", arch="RetinaNet")
    torch.manual_seed(0)
    ours = build_model(cfg_ours)
    stock = build_model(cfg_stock)
    assert type(stock) is RetinaNet
    stock.load_state_dict(ours.state_dict())
    for seed in (0, 1):  # two steps: the loss normalizer EMA advances identically
        batch = make_batch(seed=seed)
        a, _ = train_step(ours, copy.deepcopy(batch))
        b, _ = train_step(stock, copy.deepcopy(batch))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (k, a[k], b[k])
        for (name, p), q in zip(ours.named_parameters(), stock.parameters()):
            assert torch.equal(p.grad, q.grad), name
    ours.eval()
    stock.eval()
    with torch.no_grad():
        batch = make_batch(seed=2)
        out_a, out_b = ours(batch), stock(batch)
    for x, y in zip(out_a, out_b):
        assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)
        assert torch.equal(x["instances"].scores, y["instances"].scores)


def _train_losses(cfg, seed=0):
    torch.manual_seed(0)
    model = build_model(cfg)
    losses, _ = train_step(model, make_batch(seed=seed))
    return model, losses


def test_focal_weight_and_batch_mean_box_loss():
    """MODEL.CLS_LOSS.WEIGHT scales focal's loss_cls too (0 turns it off); with "batch_mean" the
    focal twin's box loss is the same function of the head output as the other losses'."""
    cfg = tiny_cfg("focal")
    cfg.MODEL.AP_LOSS_RETINANET.BOX_REG_NORMALIZER = "ema"
    _, ref = _train_losses(cfg)
    assert ref["loss_cls"] > 0
    for w in (0.0, 2.5):
        cfg.MODEL.CLS_LOSS.WEIGHT = w
        _, out = _train_losses(cfg)
        torch.testing.assert_close(out["loss_cls"], ref["loss_cls"] * w)
        torch.testing.assert_close(out["loss_box_reg"], ref["loss_box_reg"])
    boxes = {}
    for loss in ("focal", "ap", "ce_ohem"):
        cfg = tiny_cfg(loss)
        assert cfg.MODEL.AP_LOSS_RETINANET.BOX_REG_NORMALIZER == "batch_mean"
        _, out = _train_losses(cfg)
        boxes[loss] = out["loss_box_reg"]
    torch.testing.assert_close(boxes["focal"], boxes["ap"])
    torch.testing.assert_close(boxes["ce_ohem"], boxes["ap"])


def test_ce_ohem_inference_scores_with_softmax():
    """CE+OHEM trains a softmax over K+1 classes (background logit 0): inference scores with it."""
    from ap_loss_d2.losses.ohem import ce_ohem_scores

    cfg = tiny_cfg("ce_ohem")
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.head.cls_score.bias.normal_(0.0, 2.0)  # spread the scores
        batch = make_batch(seed=3)
        images = model.preprocess_image(batch)
        features = [model.backbone(images.tensor)[f] for f in model.head_in_features]
        logits = model.head(features)[0]
        out = model(batch)
    # the top score of the image equals the largest softmax probability over all anchors
    def per_anchor(x):  # (N, A*K, H, W) -> (N, H*W*A, K), Detectron2's anchor order
        n, _, h, w = x.shape
        return x.view(n, -1, 3, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 3)

    probs = torch.cat([ce_ohem_scores(per_anchor(x)) for x in logits], dim=1)
    top = out[0]["instances"].scores.max()
    torch.testing.assert_close(top, probs[0].max())
    sigmoid_top = torch.cat([per_anchor(x).sigmoid() for x in logits], dim=1)[0].max()
    assert not torch.allclose(top, sigmoid_top)  # not Detectron2's per-class sigmoid
    # the softmax itself: rows of [0, s] normalised, background dropped
    s = torch.tensor([[0.0, 1.0, -2.0], [30.0, 29.0, -50.0]], dtype=torch.float64)
    full = torch.softmax(torch.cat([torch.zeros(2, 1, dtype=s.dtype), s], 1), 1)[:, 1:]
    torch.testing.assert_close(ce_ohem_scores(s), full)
    assert ce_ohem_scores(torch.zeros(0, 3)).shape == (0, 3)


def test_ap_approx_uses_its_own_sigmoid_k(monkeypatch):
    import ap_loss_d2.losses.cls_losses as rn

    seen = []
    real = rn.ap_loss_approx_gradient

    def spy(logits, targets, sigmoid_k):
        seen.append(sigmoid_k)
        return real(logits, targets, sigmoid_k=sigmoid_k)

    monkeypatch.setattr(rn, "ap_loss_approx_gradient", spy)
    cfg = tiny_cfg("ap_approx")
    assert cfg.MODEL.CLS_LOSS.APPROX_SIGMOID_K == 1.0  # paper Eq. 32-33: S(x) = e^x / (1 + e^x)
    assert cfg.MODEL.CLS_LOSS.SIGMOID_K == 0.5  # the sigmoid step's k is a different parameter
    _train_losses(cfg)
    cfg.MODEL.CLS_LOSS.APPROX_SIGMOID_K = 0.25
    _train_losses(cfg)
    assert seen == [1.0, 0.25]


# ---------------------------------------------------------------------------------------------
# Evaluators
# ---------------------------------------------------------------------------------------------


def test_voc_evaluator_on_synthetic_voc_val(synth_dataset_dir, tmp_path):
    name = "synth_shapes_voc_val"
    cfg = tiny_cfg("ap")
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 50
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    evaluator = build_evaluator(cfg, name)
    assert isinstance(evaluator, PascalVOCDetectionEvaluator)
    torch.manual_seed(0)
    model = build_model(cfg)
    dicts = DatasetCatalog.get(name)[:4]
    loader = build_detection_test_loader(dicts, mapper=DatasetMapper(cfg, is_train=False))
    results = inference_on_dataset(model, loader, evaluator)
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75"}
    assert 0.0 <= results["bbox"]["AP50"] <= 100.0

    # Ground truth as predictions, on every image of the split: perfect AP50.
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32))
        inst.scores = torch.ones(len(d["annotations"]))
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    assert evaluator.evaluate()["bbox"]["AP50"] == pytest.approx(100.0)


def test_coco_evaluator_on_synthetic_val(synth_dataset_dir, tmp_path):
    cfg = tiny_cfg("ap")
    evaluator = build_evaluator(cfg, "synth_shapes_val", output_folder=str(tmp_path))
    assert isinstance(evaluator, COCOEvaluator)


def test_builtin_registrations_unchanged(tmp_path, monkeypatch):
    """Detectron2's built-in COCO / VOC names (relative to $DETECTRON2_DATASETS, "datasets" here)."""
    meta = MetadataCatalog.get("coco_2017_val")
    json_file = Path(meta.json_file)
    if json_file.is_absolute():
        pytest.skip("$DETECTRON2_DATASETS is set: the built-in names point at real data")
    monkeypatch.chdir(tmp_path)
    json_file.parent.mkdir(parents=True)
    json_file.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4],
                         "area": 16, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "person"}],
    }))
    cfg = tiny_cfg("ap")
    assert isinstance(build_evaluator(cfg, "coco_2017_val", str(tmp_path / "out")), COCOEvaluator)
    assert isinstance(build_evaluator(cfg, "voc_2007_test"), PascalVOCDetectionEvaluator)


def test_evaluator_errors():
    cfg = tiny_cfg("ap")
    with pytest.raises(KeyError, match="no_such_dataset"):
        build_evaluator(cfg, "no_such_dataset")
    name = "ap_loss_d2_test_unsupported"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(evaluator_type="lvis")
    with pytest.raises(NotImplementedError) as e:
        build_evaluator(cfg, name)
    assert name in str(e.value) and "lvis" in str(e.value)
    assert ", ".join(SUPPORTED_EVALUATOR_TYPES) in str(e.value)
