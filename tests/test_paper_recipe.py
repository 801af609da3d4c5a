"""The RetinaNet paper configs (every loss, yaml and LazyConfig) reproduce the authors' recipe.

Expected values are written here from the paper (Sec. 4.1) and the authors' released code
(github cccorn/AP-loss: lib/config.py, lib/model/anchors.py, lib/model/aploss.py,
lib/model/model.py, lib/dataloader/dataloader.py, train.py), re-derived independently in this
file, never read from the configs under test.
"""
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts  # noqa: E402
from detectron2.data.datasets import register_pascal_voc  # noqa: E402
from detectron2.evaluation import PascalVOCDetectionEvaluator  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.solver import build_lr_scheduler  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from ap_loss_d2.data import register_voc_nodifficult  # noqa: E402
from ap_loss_d2.engine import get_ap_loss_cfg  # noqa: E402
from ap_loss_d2.evaluation import get_evaluator  # noqa: E402
from .params import slow_except  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
YAML = sorted(
    p.relative_to(REPO).as_posix()
    for folder in ("VOC-Detection", "COCO-Detection")
    for p in (REPO / "configs" / folder).glob("retinanet_R_*.yaml")
)
LAZY = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs" / "lazy").glob("retinanet_R_*.py"))
ALL = YAML + LAZY
# the VOC AP-loss twins run in make test-fast, every paper config in make test
FAST = ("configs/VOC-Detection/retinanet_R_50_FPN_160e_voc0712_ap.yaml", "configs/lazy/retinanet_R_50_FPN_160e_voc0712_ap.py")

# --- the authors' settings (lib/config.py, lib/model/*.py) -----------------------------------
AUTHORS_LEVELS = (3, 4, 5, 6, 7)
AUTHORS_RATIOS = (0.5, 1.0, 2.0)
AUTHORS_SCALES = (1.0, 2 ** 0.5)  # x 4 x stride
AUTHORS_BOX_STD = (0.1, 0.1, 0.2, 0.2)
AUTHORS_SCORE_THRESH = 0.01
AUTHORS_TOPK, AUTHORS_MAX_DETS, AUTHORS_NMS = 1000, 100, 0.5
AUTHORS_WARMUP_STEPS, AUTHORS_WARMUP_FACTOR = 500, 1.0 / 3.0
ANCHORS_AT_512 = 32736  # issue 11 / (64^2 + 32^2 + 16^2 + 8^2 + 4^2) x 6


def test_configs_found():
    assert len(YAML) == 14 and len(LAZY) >= 6  # 12 of Table 2/3/4 + GHM-C and DR-loss (Table 13)
    assert (4096 + 1024 + 256 + 64 + 16) * 6 == ANCHORS_AT_512


@pytest.fixture(autouse=True)
def _few_threads(one_thread):
    """Every test of this module runs torch on one thread (tests/conftest.py)."""


_MODELS = {}


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _MODELS.clear()


def load(path):
    """(model, kind, cfg) of a paper config, randomly initialised, on CPU (cached)."""
    if path not in _MODELS:
        torch.manual_seed(0)
        if path.endswith(".yaml"):
            cfg = get_ap_loss_cfg()
            cfg.merge_from_file(str(REPO / path))
            # the hand-built batches here hold 3 images: rank them as one set
            cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
                                 "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", 0])
            _MODELS[path] = (build_model(cfg), "yaml", cfg)
        else:
            cfg = LazyConfig.load(str(REPO / path))
            if "images_per_ranking_set" in cfg.model.cls_loss:
                cfg.model.cls_loss.images_per_ranking_set = 0
            _MODELS[path] = (instantiate(cfg.model), "lazy", cfg)
        if len(_MODELS) > len(ALL):  # every paper model built once per module (~4 GB at most)
            _MODELS.pop(next(iter(_MODELS)))
    return _MODELS[path]


# ---------------------------------------------------------------------------------------------
# Anchors
# ---------------------------------------------------------------------------------------------
def authors_anchors(image_size=512):
    """The authors' anchors, per level, as (H*W, 6, 4) in their inclusive pixel convention
    (x2 = x1 + w - 1), re-derived from lib/model/anchors.py: a base window [0, 0, s-1, s-1]
    (s = stride), widths sqrt(s^2 / r) and heights r * that (not rounded), both scaled by
    4 * {1, 2^0.5}, centred at the window's centre (s - 1) / 2, shifted by i * s; feature maps
    of ceil(size / s) cells."""
    levels = []
    for p in AUTHORS_LEVELS:
        s = 2 ** p
        n = (image_size + s - 1) // s
        c = (s - 1) / 2.0
        wh = []
        for r in AUTHORS_RATIOS:
            w0 = math.sqrt(s * s / r)
            h0 = w0 * r
            for k in AUTHORS_SCALES:
                wh.append((w0 * 4 * k, h0 * 4 * k))
        wh = np.array(wh)  # (6, 2)
        ys, xs = np.meshgrid(np.arange(n) * s + c, np.arange(n) * s + c, indexing="ij")
        cx, cy = xs.reshape(-1, 1), ys.reshape(-1, 1)  # row-major: y outer, x inner
        w, h = wh[None, :, 0], wh[None, :, 1]
        boxes = np.stack([cx - 0.5 * (w - 1), cy - 0.5 * (h - 1), cx + 0.5 * (w - 1), cy + 0.5 * (h - 1)], -1)
        levels.append(boxes)
    return levels


def to_continuous(boxes):
    """Inclusive pixel boxes (x2 = x1 + w - 1) -> Detectron2's continuous boxes (x2 = x1 + w)."""
    return boxes + np.array([0.0, 0.0, 1.0, 1.0])


def model_anchors(model, image_size=512):
    """The model's anchors (list per level of (H*W*A, 4)) for an image_size x image_size input,
    on the feature maps its backbone actually produces."""
    feats = model.backbone(torch.zeros(1, 3, image_size, image_size))
    feats = [feats[f] for f in model.head_in_features]
    return [b.tensor.double().numpy() for b in model.anchor_generator(feats)]


_BACKBONE_ANCHORS = {}


@pytest.mark.parametrize("path", slow_except(ALL, FAST))
def test_anchors_equal_the_authors(path):
    model, _, _ = load(path)
    key = (type(model.backbone).__name__, sum(p.numel() for p in model.backbone.parameters()),
           tuple(model.anchor_generator.strides), float(model.anchor_generator.offset),
           tuple(tuple(c.flatten().tolist()) for c in model.anchor_generator.cell_anchors))
    if key not in _BACKBONE_ANCHORS:
        with torch.no_grad():
            _BACKBONE_ANCHORS[key] = model_anchors(model)
    ours = _BACKBONE_ANCHORS[key]
    theirs = authors_anchors()
    assert sum(len(a) for a in ours) == ANCHORS_AT_512
    assert len(ours) == len(theirs) == 5
    for level, (a, b) in enumerate(zip(ours, theirs)):
        b = to_continuous(b)  # (HW, 6, 4)
        a = a.reshape(b.shape)
        # the 6 anchors of a location: compare as sets (the two codes enumerate them in
        # different orders), sorted by (width, height)
        def by_shape(x):
            w, h = x[..., 2] - x[..., 0], x[..., 3] - x[..., 1]
            order = np.lexsort((np.round(h, 1), np.round(w, 1)), axis=-1)
            return np.take_along_axis(x, order[..., None], axis=1)

        np.testing.assert_allclose(by_shape(a), by_shape(b), rtol=0, atol=2e-3,
                                   err_msg=f"{path}: level P{level + 3}")
        stride = 2 ** (level + 3)
        centres = (a[..., :2] + a[..., 2:]) / 2
        n = int(round(math.sqrt(len(a))))
        expected = (np.arange(n) + 0.5) * stride  # (i + 0.5) x stride
        np.testing.assert_allclose(centres[:, 0, 0], np.tile(expected, n), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Box regression: same gradient w.r.t. the head output as the authors' backward
# ---------------------------------------------------------------------------------------------
def authors_iou(a, b):
    """lib/util/calc_iou.py's IoU (inclusive pixel boxes), float64."""
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def authors_box_grad(anchors, gt_per_image, pred):
    """Gradient of the authors' regression loss w.r.t. the regression output (their backward in
    lib/model/aploss.py): positives are anchors with IoU >= 0.5 plus each ground truth's best
    anchors; targets (dx, dy, dw, dh) from centres/sizes with the +1 convention, divided by
    (0.1, 0.1, 0.2, 0.2); gradient of smooth L1 (beta 1) divided by 4 x the positives of the
    whole batch. anchors (R, 4) and gt boxes inclusive-pixel, pred (N, R, 4) float64."""
    grad = np.zeros_like(pred)
    p_num = 0
    aw = anchors[:, 2] - anchors[:, 0] + 1
    ah = anchors[:, 3] - anchors[:, 1] + 1
    ax, ay = anchors[:, 0] + 0.5 * (aw - 1), anchors[:, 1] + 0.5 * (ah - 1)
    for j, gt in enumerate(gt_per_image):
        if len(gt) == 0:
            continue
        iou = authors_iou(anchors, gt)
        best, arg = iou.max(1), iou.argmax(1)
        pos = best >= 0.5
        pos[np.nonzero(iou == iou.max(0, keepdims=True))[0]] = True
        p_num += int(pos.sum())
        g = gt[arg[pos]]
        gw, gh = g[:, 2] - g[:, 0] + 1, g[:, 3] - g[:, 1] + 1
        gx, gy = g[:, 0] + 0.5 * (gw - 1), g[:, 1] + 0.5 * (gh - 1)
        t = np.stack([(gx - ax[pos]) / aw[pos], (gy - ay[pos]) / ah[pos],
                      np.log(gw / aw[pos]), np.log(gh / ah[pos])], 1) / np.array(AUTHORS_BOX_STD)
        d = pred[j, pos] - t
        grad[j, pos] = np.where(np.abs(d) <= 1.0, d, np.sign(d))
    return grad / (4 * max(p_num, 1)), p_num


# Hand-built batch in Detectron2's continuous coordinates on a 512 x 512 input: large, medium
# and small boxes (the 20 px box matches no anchor at IoU >= 0.4: low-quality matches only),
# an image with one object, and an image without objects.
GT = [
    [(40.3, 60.1, 250.7, 300.2, 3), (300.6, 310.2, 380.4, 420.9, 7), (101.3, 57.7, 121.9, 79.1, 1)],
    [(10.5, 200.2, 505.0, 330.8, 0)],
    [],
]


@pytest.mark.parametrize("path", slow_except(ALL, FAST))
def test_box_regression_gradient_equals_the_authors(path):
    model, _, _ = load(path)
    model.train()
    levels = [torch.from_numpy(to_continuous(b).reshape(-1, 4)).float() for b in authors_anchors()]
    anchors = [Boxes(a) for a in levels]
    gt_instances = []
    for objs in GT:
        inst = Instances((512, 512))
        inst.gt_boxes = Boxes(torch.tensor([o[:4] for o in objs], dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.tensor([o[4] for o in objs], dtype=torch.int64)
        gt_instances.append(inst)
    g = torch.Generator().manual_seed(0)
    n, k = len(GT), model.num_classes
    pred_deltas = [(torch.randn(n, len(a), 4, generator=g) * 2).requires_grad_() for a in levels]
    pred_logits = [torch.randn(n, len(a), k, generator=g) - 4 for a in levels]
    with EventStorage():
        gt_labels, gt_boxes = model.label_anchors(anchors, gt_instances)
        losses = model.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes)
    losses["loss_box_reg"].backward()
    ours = torch.cat([d.grad for d in pred_deltas], dim=1).double().numpy()

    all_anchors = torch.cat(levels).double().numpy() - np.array([0.0, 0.0, 1.0, 1.0])
    gt_incl = [np.array([o[:4] for o in objs], dtype=np.float64).reshape(-1, 4)
               - np.array([0.0, 0.0, 1.0, 1.0]) for objs in GT]
    pred = torch.cat([d.detach() for d in pred_deltas], dim=1).double().numpy()
    theirs, p_num = authors_box_grad(all_anchors, gt_incl, pred)
    assert p_num > 20
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Inference and schedule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ALL)
def test_inference_settings_equal_the_authors(path):
    model, _, _ = load(path)
    assert model.test_score_thresh == AUTHORS_SCORE_THRESH
    assert model.test_topk_candidates == AUTHORS_TOPK
    assert model.max_detections_per_image == AUTHORS_MAX_DETS
    assert model.test_nms_thresh == AUTHORS_NMS


def authors_lr(base_lr, it):
    """train.py: before optimizer step number `it` (0-based) of the first 500, the LR is
    base * f + it / 500 * base * (1 - f), f = 1/3; afterwards the schedule's (base before the
    first drop)."""
    if it <= AUTHORS_WARMUP_STEPS:
        return base_lr * AUTHORS_WARMUP_FACTOR + it / AUTHORS_WARMUP_STEPS * base_lr * (1 - AUTHORS_WARMUP_FACTOR)
    return base_lr


ITERS = [0, 1, 2, 100, 250, 499, 500, 501, 2000]


@pytest.mark.parametrize("path", ALL)
def test_warmup_equals_the_authors(path):
    _, kind, cfg = load(path)
    if kind == "yaml":
        assert cfg.SOLVER.WARMUP_METHOD == "linear"
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=cfg.SOLVER.BASE_LR)
        sched = build_lr_scheduler(cfg, opt)
        lrs = []
        for it in range(max(ITERS) + 1):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        base = cfg.SOLVER.BASE_LR
        got = [lrs[it] for it in ITERS]
    else:
        sched = instantiate(cfg.lr_multiplier)
        base = cfg.optimizer.lr
        got = [base * sched(it / cfg.train.max_iter) for it in ITERS]
    assert base == 0.001
    expected = [authors_lr(base, it) for it in ITERS]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# VOC "difficult" objects: dropped for training, official protocol for evaluation
# ---------------------------------------------------------------------------------------------
VOC_PAPER = [p for p in ALL if "voc0712" in p]


@pytest.mark.parametrize("path", VOC_PAPER)
def test_voc_configs_train_without_difficult(path):
    _, kind, cfg = load(path)
    if kind == "yaml":
        train, test = list(cfg.DATASETS.TRAIN), list(cfg.DATASETS.TEST)
    else:
        train = list(cfg.dataloader.train.dataset.names)
        test = [cfg.dataloader.test.dataset.names]
    # the paper: VOC07+12 trainval -> VOC07 test; the authors' loader: use_diff False
    assert [MetadataCatalog.get(n).get("difficult_dropped_from", None) for n in train] == [
        "voc_2007_trainval", "voc_2012_trainval"]
    assert test == ["voc_2007_test"]
    assert MetadataCatalog.get("voc_2007_test").get("difficult_dropped_from", None) is None
    assert isinstance(get_evaluator("voc_2007_test"), PascalVOCDetectionEvaluator)


def _write_voc(root: Path):
    """A 2-image VOC folder: image a has a normal and a difficult 'shape', image b only a
    difficult one."""
    from PIL import Image

    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    objs = {"a": [((11, 11, 60, 60), 0), ((81, 21, 120, 70), 1)], "b": [((31, 31, 90, 90), 1)]}
    for fid, items in objs.items():
        Image.new("RGB", (128, 128), (90, 120, 150)).save(root / "JPEGImages" / f"{fid}.jpg")
        xml = ["<annotation><size><width>128</width><height>128</height><depth>3</depth></size>"]
        for (x1, y1, x2, y2), hard in items:
            xml.append(f"<object><name>shape</name><pose>Unspecified</pose><truncated>0</truncated>"
                       f"<difficult>{hard}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                       f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
        xml.append("</annotation>")
        (root / "Annotations" / f"{fid}.xml").write_text("".join(xml))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("a\nb\n")
    return objs


def test_nodifficult_loader_and_official_evaluation(tmp_path):
    objs = _write_voc(tmp_path)
    name = "ap_loss_d2_test_voc_difficult"
    if name not in DatasetCatalog.list():
        register_pascal_voc(name, str(tmp_path), "trainval", 2007, ["shape"])
        MetadataCatalog.get(name).evaluator_type = "pascal_voc"
    nodiff = register_voc_nodifficult(name)
    assert nodiff == name + "_nodifficult"
    assert register_voc_nodifficult(name) == nodiff  # idempotent

    stock = {r["image_id"]: r["annotations"] for r in DatasetCatalog.get(name)}
    assert {k: len(v) for k, v in stock.items()} == {"a": 2, "b": 1}  # Detectron2 keeps them
    # what build_detection_train_loader reads (images left without objects are filtered out)
    train = get_detection_dataset_dicts([nodiff], filter_empty=True)
    assert [r["image_id"] for r in train] == ["a"]
    (ann,) = train[0]["annotations"]
    assert ann["bbox"] == stock["a"][0]["bbox"] == [10.0, 10.0, 60.0, 60.0]  # Detectron2's convention
    assert len(get_detection_dataset_dicts([nodiff], filter_empty=False)) == 2

    # Evaluation on the original set: only the non-difficult object is required, and a
    # detection of a difficult object is not a false positive (official VOC protocol).
    evaluator = get_evaluator(name)
    assert isinstance(evaluator, PascalVOCDetectionEvaluator)
    evaluator.reset()

    def output(boxes, scores):
        inst = Instances((128, 128))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.tensor(scores)
        inst.pred_classes = torch.zeros(len(boxes), dtype=torch.int64)
        return {"instances": inst}

    (x1, y1, x2, y2), _ = objs["a"][0]
    (hx1, hy1, hx2, hy2), _ = objs["a"][1]
    evaluator.process([{"image_id": "a"}, {"image_id": "b"}], [
        output([[x1 - 1, y1 - 1, x2, y2], [hx1 - 1, hy1 - 1, hx2, hy2]], [0.5, 0.9]),
        output([[30, 30, 90, 90]], [0.95]),
    ])
    res = evaluator.evaluate()["bbox"]
    assert res["AP50"] == pytest.approx(100.0)


DR_AUTHORS_PRIOR = 0.5  # idstcv/DR_loss configs/dr_retina/*.yaml: RETINANET.PRIOR_PROB 0.5
RETINANET_PRIOR = 0.01  # Lin et al. (focal loss), and cccorn/AP-loss's head initialisation


@pytest.mark.parametrize("path", ALL)
def test_classifier_prior(path):
    """The classifier bias starts at -log((1 - pi) / pi): pi = 0.5 for DR-loss (its authors'
    setting), 0.01 for every other loss."""
    model, _, _ = load(path)
    prior = DR_AUTHORS_PRIOR if path.endswith(("_dr.yaml", "_dr.py")) else RETINANET_PRIOR
    bias = model.head.cls_score.bias.detach()
    assert torch.allclose(bias, torch.full_like(bias, -math.log((1 - prior) / prior)), atol=1e-6)
