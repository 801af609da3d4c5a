"""APLossSSD: every SSD config builds and trains a step with each loss (yaml and LazyConfig), the
yaml and LazyConfig twins build the same model, ``ce_ohem`` equals an independent computation of
SSD's multibox loss, the AP-loss update under 2-process DDP equals the single-process one, and
the README's SSD command runs."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

import detectron2.data.transforms as T  # noqa: E402
import torch.distributed as dist  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.data import DatasetMapper  # noqa: E402
from detectron2.engine import SimpleTrainer, create_ddp_model  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes  # noqa: E402

from ap_loss_d2.engine import get_ap_loss_cfg  # noqa: E402
from ap_loss_d2.losses.registry import cls_loss_names  # noqa: E402
from ap_loss_d2.modeling import APLossSSD  # noqa: E402

from .gloo import run_gloo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOSSES = ("ap", "focal", "auc", "ce_ohem")
PAPER = [f"ssd512_vgg16_160e_voc0712_{loss}" for loss in LOSSES]
CPU_CONFIG = "configs/SSD/ssd192_vgg16n_240it_synth.yaml"
NARROW = 1 / 16  # the paper configs' VGG-16 at 1/16 width for the training steps on CPU
SET_OF_2 = ["MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "2"]  # the 2-image batches of the steps

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(path, opts=()):
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(REPO / path))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts])
    return cfg


def _narrow_lazy(model, width):
    """A LazyConfig SSD512 model at ``width`` (backbone and the head's input channels)."""
    model.backbone.width = width
    model.head.input_shape = [ShapeSpec(channels=max(1, round(s.channels * width))) for s in model.head.input_shape]
    return model


def _batch(sizes=((200, 250), (200, 250)), seed=0, boxes=3):
    """Random images of ``sizes`` (H, W) with ``boxes`` random boxes each, as a Detectron2 mapper
    gives them."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for h, w in sizes:
        xy = torch.rand(boxes, 2, generator=g) * torch.tensor([w, h]) * 0.6
        wh = torch.tensor([w, h]) * (0.08 + torch.rand(boxes, 2, generator=g) * 0.3)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 3, (boxes,), generator=g)
        batch.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": inst})
    return batch


def _train_step(model, batch=None):
    """One step as Detectron2's DefaultTrainer runs it (``SimpleTrainer.run_step``:
    ``loss_dict = model(data)``, sum, backward, step; it raises on a non-finite loss) on ``batch``
    (default: two 200 x 250 images); every head parameter gets a finite gradient, and the head moves. Then
    inference on images of other sizes gives Detectron2 Instances in each input's coordinates:
    the image's size, or its ``height`` x ``width``."""
    torch.manual_seed(0)
    before = [p.detach().clone() for p in model.head.parameters()]
    trainer = SimpleTrainer(model, [batch or _batch()], torch.optim.SGD(model.parameters(), lr=1e-3))
    trainer.train(0, 1)
    assert {"loss_cls", "loss_box_reg"} <= set(trainer.storage.histories())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.head.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.head.parameters()))
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 200, 250) * 255}, {"image": torch.rand(3, 90, 300) * 255, "height": 180, "width": 600}])
    assert [o["instances"].image_size for o in out] == [(200, 250), (180, 600)]
    for o in out:
        inst = o["instances"]
        assert {"pred_boxes", "scores", "pred_classes"} <= set(inst.get_fields())
        h, w = inst.image_size
        boxes = inst.pred_boxes.tensor
        assert boxes.min() >= 0 and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()


@pytest.mark.parametrize("stem", PAPER)
def test_paper_yaml_config_trains_a_step(stem):
    cfg = _cfg(f"configs/SSD/{stem}.yaml", ["MODEL.SSD.VGG_WIDTH", str(NARROW), *SET_OF_2])
    assert cfg.MODEL.CLS_LOSS.NAME == stem.rsplit("voc0712_", 1)[1]
    model = build_model(cfg)
    assert isinstance(model, APLossSSD) and model.cls_loss.name == cfg.MODEL.CLS_LOSS.NAME
    _train_step(model)


@pytest.mark.parametrize("stem", PAPER)
def test_paper_lazy_config_trains_a_step(stem):
    lazy = LazyConfig.load(str(REPO / "configs" / "lazy" / f"{stem}.py"))
    if "images_per_ranking_set" in lazy.model.cls_loss:
        lazy.model.cls_loss.images_per_ranking_set = 2
    model = instantiate(_narrow_lazy(lazy.model, NARROW))
    assert model.cls_loss.name == stem.rsplit("voc0712_", 1)[1]
    _train_step(model)


@pytest.mark.parametrize("loss", cls_loss_names("ssd"))
def test_every_loss_trains_on_mixed_sizes_with_and_without_boxes(loss):
    cfg = _cfg(CPU_CONFIG, ["MODEL.CLS_LOSS.NAME", loss, *SET_OF_2])
    batch = _batch([(200, 250), (90, 120)])
    batch[1]["instances"] = batch[1]["instances"][:0]  # an image without boxes
    _train_step(build_model(cfg), batch)


def test_mixed_sizes_without_resizing_are_padded():
    cfg = _cfg(CPU_CONFIG, ["MODEL.SSD.FIXED_SIZE", "0", *SET_OF_2])
    batch = _batch([(200, 250), (90, 120)])
    model = build_model(cfg)
    assert all(y is x for x, y in zip(batch, model.resize_inputs(batch)))
    _train_step(model, batch)


def test_inputs_resized_as_torchvision_ssd():
    """Images and boxes as torchvision's ``GeneralizedRCNNTransform(fixed_size=(512, 512))``
    resizes them, and the boxes equal the scaling written out; the input dicts are unchanged;
    an image already 512 x 512 passes as it is."""
    cfg = _cfg(f"configs/SSD/{PAPER[0]}.yaml", ["MODEL.SSD.VGG_WIDTH", str(NARROW)])
    model = build_model(cfg)
    batch = _batch([(200, 250), (333, 97), (512, 512)], seed=2)
    boxes_before = [x["instances"].gt_boxes.tensor.clone() for x in batch]
    resized = model.resize_inputs(batch)
    tv = GeneralizedRCNNTransform(512, 512, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, fixed_size=(512, 512)).eval()
    for x, y, before in zip(batch, resized, boxes_before):
        h, w = x["image"].shape[-2:]
        assert torch.equal(x["instances"].gt_boxes.tensor, before) and x["instances"].image_size == (h, w)
        images, targets = tv([x["image"]], [{"boxes": before.clone(), "labels": x["instances"].gt_classes}])
        assert y["instances"].image_size == (512, 512) and y["image"].shape == (3, 512, 512)
        assert (y.get("height", h), y.get("width", w)) == (h, w)
        torch.testing.assert_close(y["instances"].gt_boxes.tensor, targets[0]["boxes"])
        expected = [[b[0] * 512 / w, b[1] * 512 / h, b[2] * 512 / w, b[3] * 512 / h] for b in before.double().tolist()]
        torch.testing.assert_close(y["instances"].gt_boxes.tensor.double(), torch.tensor(expected, dtype=torch.float64))
        assert torch.equal(y["instances"].gt_classes, x["instances"].gt_classes)
        torch.testing.assert_close(model.preprocess_image([y]).tensor[0], images.tensors[0], rtol=0, atol=1e-4)
    assert resized[2] is batch[2]


def test_detections_come_back_in_the_input_coordinates():
    cfg = _cfg(f"configs/SSD/{PAPER[0]}.yaml", ["MODEL.SSD.VGG_WIDTH", str(NARROW)])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = _batch([(200, 250)], seed=4)[0]["image"]
    with torch.no_grad():
        out = model([{"image": image}])[0]["instances"]
        at_512 = model([{"image": model.resize_inputs([{"image": image}])[0]["image"]}])[0]["instances"]
    assert out.image_size == (200, 250) and at_512.image_size == (512, 512) and len(out) == len(at_512) > 0
    expected = resize_boxes(at_512.pred_boxes.tensor, (512, 512), (200, 250))
    expected[:, 0::2] = expected[:, 0::2].clamp(0, 250)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, 200)
    torch.testing.assert_close(out.pred_boxes.tensor, expected)
    assert torch.equal(out.scores, at_512.scores) and torch.equal(out.pred_classes, at_512.pred_classes)


def test_sizes_that_cannot_work_name_the_key():
    paper = f"configs/SSD/{PAPER[0]}.yaml"
    # no fixed size: the batch the network sees is checked (the 7 levels of SSD512 need 268 px)
    model = build_model(_cfg(paper, ["MODEL.SSD.VGG_WIDTH", str(NARROW), "MODEL.SSD.FIXED_SIZE", "0", *SET_OF_2]))
    with pytest.raises(ValueError, match=r"batch of 200 px .* at least 268 px to reach conv12_2: set MODEL\.SSD\.FIXED_SIZE to 268 or more"):
        with EventStorage(0):
            model(_batch())
    # a fixed size too small for the backbone: refused when the model is built
    with pytest.raises(ValueError, match=r"MODEL\.SSD\.FIXED_SIZE\)=256: a 256x256 input is too small"):
        build_model(_cfg(paper, ["MODEL.SSD.VGG_WIDTH", str(NARROW), "MODEL.SSD.FIXED_SIZE", "256", *SET_OF_2]))


def _arguments(model):
    """What a built SSD keeps of its constructor arguments (plain values)."""
    loss = model.cls_loss
    return {
        "cls_loss": (type(loss).__name__, repr(loss), getattr(loss, "alpha", None), getattr(loss, "gamma", None),
                     getattr(loss, "neg_pos_ratio", None)),
        "priors": [c.tolist() for c in model.anchor_generator.cell_anchors],
        "steps": model.anchor_generator.strides,
        "prior_offset_clip": (model.anchor_generator.offset, model.anchor_generator.clip_size),
        "box2box_weights": tuple(model.box2box_transform.weights),
        "head_in_features": list(model.head_in_features),
        "l2norm": model.backbone.conv4_3_norm.weight.tolist(),
        "parameter_shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()},
        **{k: getattr(model, k) for k in (
            "num_classes", "iou_threshold", "smooth_l1_beta", "box_reg_weight", "test_score_thresh",
            "test_topk_candidates", "test_nms_thresh", "max_detections_per_image", "fixed_size", "input_format")},
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
    }


@pytest.mark.parametrize("stem", PAPER)
def test_yaml_and_lazy_twins_build_the_same_model(stem):
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(REPO / "configs" / "SSD" / f"{stem}.yaml"))  # build_model loads no weights
    cfg.MODEL.DEVICE = "cpu"
    lazy = LazyConfig.load(str(REPO / "configs" / "lazy" / f"{stem}.py"))
    a, b = _arguments(build_model(cfg)), _arguments(instantiate(lazy.model))
    assert a == b, {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert sum(len(p) for p in a["priors"]) == 36  # 4 + 6 + 6 + 6 + 6 + 4 + 4 priors per cell
    assert lazy.train.init_checkpoint == cfg.MODEL.WEIGHTS
    assert lazy.optimizer.lr == cfg.SOLVER.BASE_LR and lazy.train.max_iter == cfg.SOLVER.MAX_ITER
    # test input: both routes hand the image to the model as loaded (it resizes to 512x512)
    image = np.zeros((300, 500, 3), dtype=np.uint8)
    for augs in (DatasetMapper(cfg, is_train=False).augmentations, instantiate(lazy.dataloader.test.mapper).augmentations):
        assert augs(T.AugInput(image)).apply_image(image).shape == image.shape
    train_augs = instantiate(lazy.dataloader.train.mapper.augmentations)
    assert tuple(train_augs[-2].shape) == (cfg.AP_LOSS_INPUT.FIXED_SIZE,) * 2


# ----------------------------------------------------------------------------------------------
# ce_ohem: SSD's multibox loss, computed independently in plain Python


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _multibox(priors, logits, deltas, gts, num_classes):
    """SSD's loss: match (each ground truth's best prior, then IoU >= 0.5), softmax CE over
    [background logit 0, K logits] on positives + the 3 x positives hardest negatives of each
    image (none in an image without positives), smooth-L1 of the variance-encoded offsets on
    positives; both / positives."""
    total_pos, cls_sum, box_sum = 0, 0.0, 0.0
    for lg, dl, (boxes, classes) in zip(logits, deltas, gts):
        match = []
        for p in priors:
            ious = [_iou(g, p) for g in boxes]
            best = max(range(len(boxes)), key=lambda g: ious[g], default=-1)
            match.append(best if best >= 0 and ious[best] >= 0.5 else -1)
        for g, box in enumerate(boxes):
            match[max(range(len(priors)), key=lambda r: _iou(box, priors[r]))] = g
        ce = []
        for r, row in enumerate(lg):
            lse = math.log(1.0 + sum(math.exp(v) for v in row))
            ce.append(lse - (row[classes[match[r]]] if match[r] >= 0 else 0.0))
        pos = [r for r in range(len(priors)) if match[r] >= 0]
        neg = sorted((r for r in range(len(priors)) if match[r] < 0), key=lambda r: -ce[r])[: 3 * len(pos)]
        cls_sum += sum(ce[r] for r in pos + neg)
        for r in pos:
            p, g = priors[r], boxes[match[r]]
            pw, ph, gw, gh = p[2] - p[0], p[3] - p[1], g[2] - g[0], g[3] - g[1]
            t = [
                ((g[0] + g[2]) / 2 - (p[0] + p[2]) / 2) / pw / 0.1,
                ((g[1] + g[3]) / 2 - (p[1] + p[3]) / 2) / ph / 0.1,
                math.log(gw / pw) / 0.2,
                math.log(gh / ph) / 0.2,
            ]
            box_sum += sum(_smooth_l1(d - e) for d, e in zip(dl[r], t))
        total_pos += len(pos)
    return cls_sum / total_pos, box_sum / total_pos


def test_ce_ohem_equals_independent_multibox_loss():
    cfg = _cfg(CPU_CONFIG, ["MODEL.CLS_LOSS.NAME", "ce_ohem", "MODEL.SSD.VGG_WIDTH", "0.0625"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    size = cfg.AP_LOSS_INPUT.FIXED_SIZE
    gts = [
        # the tall thin box has no prior with IoU >= 0.5: only its best prior is positive
        ([[20.0, 20, 50, 50], [100, 40, 160, 70], [60, 100, 72, 180]], [0, 1, 2]),
        ([[5.0, 5, 30, 40], [120, 120, 185, 185]], [2, 0]),
        ([], []),  # no ground truth: no positives, and SSD mines no negatives in it
    ]
    batch = []
    for boxes, classes in gts:
        inst = Instances((size, size))
        inst.gt_boxes, inst.gt_classes = Boxes(torch.tensor(boxes).view(-1, 4)), torch.tensor(classes, dtype=torch.int64)
        batch.append({"image": torch.zeros(3, size, size), "instances": inst})
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    logits, deltas = model.head(features)
    g = torch.Generator().manual_seed(1)  # spread-out predictions, so that the mining matters
    logits = [torch.randn(x.shape, generator=g, dtype=torch.float64) * 2 for x in logits]
    deltas = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in deltas]
    with EventStorage(0):
        losses = model.forward_training(images, features, (logits, deltas), [b["instances"] for b in batch])

    def flat(xs, k):  # (N, A * k, H, W) per level -> per image, priors in cell-major order, (R, k)
        per_level = [x.view(x.shape[0], -1, k, *x.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(x.shape[0], -1, k) for x in xs]
        return torch.cat(per_level, dim=1).tolist()

    priors = torch.cat([b.tensor for b in model.anchor_generator(features)]).double().tolist()
    expected_cls, expected_box = _multibox(priors, flat(logits, 3), flat(deltas, 4), gts, 3)
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-6)
    assert losses["loss_box_reg"].item() == pytest.approx(expected_box, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# 2-process DDP (Gloo, CPU): the AP-loss update equals one process ranking both images

DDP_OPTS = [
    "MODEL.SSD.VGG_NORM", "",  # BN statistics would depend on the per-process batch
    "MODEL.SSD.VGG_WIDTH", "0.0625",
    "MODEL.SSD.BOX_REG_WEIGHT", "0.0",  # normalised per process; only the ranking moves here
    "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "0",
    "MODEL.CLS_LOSS.RANK_ACROSS_PROCESSES", "True",
]
DDP_PARAMS = ("head.cls_convs.0.weight", "head.cls_convs.1.bias", "backbone.features.0.weight", "backbone.conv4_3_norm.weight")


def _gradients(images, ddp=False):
    cfg = _cfg(CPU_CONFIG, DDP_OPTS)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    if ddp:
        model = create_ddp_model(model, broadcast_buffers=False, device_ids=None)
    batch = _batch([(cfg.MODEL.SSD.FIXED_SIZE,) * 2] * 2, seed=3)
    with EventStorage(0):
        losses = model([batch[i] for i in images])
        sum(losses.values()).backward()
    params = dict((model.module if ddp else model).named_parameters())
    return {n: params[n].grad.detach().clone() for n in DDP_PARAMS}, losses["loss_cls"].item()


def _ddp_gradients(rank):
    return _gradients([rank], ddp=True)


@pytest.mark.slow  # launches processes
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_process_ddp_ap_loss_update_equals_one_process():
    results = run_gloo(_ddp_gradients, 2)
    ref, ref_loss = _gradients([0, 1])
    for rank in range(2):
        grads, loss = results[rank]
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for name, r in ref.items():
            assert r.norm() > 0, f"{name}: no gradient in the reference"
            rel = ((grads[name] - r).norm() / r.norm()).item()
            assert rel < 1e-4, f"{name}: DDP / single-process relative difference {rel:.2e}"


# ----------------------------------------------------------------------------------------------
# The README's command at its smallest setting


@pytest.mark.slow  # trains and evaluates in a subprocess
@pytest.mark.parametrize("loss", LOSSES)
def test_readme_ssd_command_trains_and_evaluates(loss, synth_dataset_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", CPU_CONFIG, "MODEL.CLS_LOSS.NAME", loss,
         "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "2",
         "OUTPUT_DIR", str(tmp_path)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert (tmp_path / "model_final.pth").is_file()
    assert "copypaste: Task: bbox" in proc.stdout
