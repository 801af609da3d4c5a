"""Robustness to local perturbations (the paper's Sec. 4.2.2 "Robustness", Table 3): the image
perturbations, the white-box attacks (Advs-Patch, DeepFool) and the study.

Details: docs/studies.md#studiesrobustness. A perturbation is ``f(image, boxes, rng, stats=None)
-> image`` (HxWxC uint8, (B, 4) XYXY boxes, a numpy Generator, a dict of counts or None)."""
import contextlib
import math
import zlib
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators, inference_on_dataset
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm

from ap_loss_d2.data.mapper import BoxAwareDatasetMapper, annotation_boxes
from ap_loss_d2.evaluation import build_evaluator
from ap_loss_d2.losses.registry import ClsLoss
from .common import (
    RUN_SPEC, build_model_for_run, dataset_subset, fmt_num, markdown_table, number, prepare_runs,
    progress, pyplot, save_figure, study_argument_parser, subplots, timestamp, write_study_outputs
)

NOISE_VARIANCE = 0.01


def _round(v: float) -> int:
    return int(np.floor(v + 0.5))  # half up, unlike Python's round()


def center_patch_region(box, height: int, width: int):
    """Pixel region (x0, y0, x1, y1), end exclusive, of the half-size centre patch of ``box``; None if outside."""
    bx0, by0, bx1, by1 = (float(v) for v in box)
    pw = max(1, _round((bx1 - bx0) / 2))
    ph = max(1, _round((by1 - by0) / 2))
    x0 = _round((bx0 + bx1) / 2 - pw / 2)
    y0 = _round((by0 + by1) / 2 - ph / 2)
    x0c, y0c = max(x0, 0), max(y0, 0)
    x1c, y1c = min(x0 + pw, width), min(y0 + ph, height)
    if x1c <= x0c or y1c <= y0c:
        return None
    return x0c, y0c, x1c, y1c


def check_image_boxes(image, boxes):
    """``(image, boxes)`` as HxWxC uint8 and (B, 4) float64 XYXY; ValueError naming a wrong dtype/shape."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected an HxWxC uint8 image, got {image.dtype} {image.shape}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return image, boxes


def count(stats, key, n=1):
    """``stats[key] += n`` (from 0) when ``stats`` is a dict; nothing when it is None."""
    if stats is not None:
        stats[key] = stats.get(key, 0) + n


def _regions(boxes, height, width):
    regions = (center_patch_region(b, height, width) for b in np.asarray(boxes).reshape(-1, 4))
    return [r for r in regions if r is not None]


def replace_patches(image, boxes, stats, content):
    """``image`` with the centre patch of every box replaced by ``content(image, x0, y0, x1, y1)``."""
    image, boxes = check_image_boxes(image, boxes)
    out = image.copy()
    for x0, y0, x1, y1 in _regions(boxes, *image.shape[:2]):
        out[y0:y1, x0:x1] = content(image, x0, y0, x1, y1)
        count(stats, "patches")
    return out


def black_patch(image, boxes, rng=None, stats=None):
    """Zero the centre patch (half width, half height) of every box."""
    return replace_patches(image, boxes, stats, lambda im, x0, y0, x1, y1: 0)


FLIP_MODES = ("left_right", "top_bottom", "both")


def flip_patch(image, boxes, rng, stats=None):
    """Flip the centre patch of every box (random mode per box, counted in ``stats["flip_<mode>"]``)."""
    def flipped(im, x0, y0, x1, y1):
        mode = FLIP_MODES[int(rng.integers(len(FLIP_MODES)))]
        count(stats, f"flip_{mode}")
        return im[y0:y1, x0:x1][::1 if mode == "left_right" else -1, ::1 if mode == "top_bottom" else -1]

    return replace_patches(image, boxes, stats, flipped)


def box_mask(boxes, height: int, width: int) -> np.ndarray:
    """Boolean HxW mask of the pixels any box touches (columns ``floor(x0) .. ceil(x1) - 1``)."""
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c1, r1 = min(int(np.ceil(x1)), width), min(int(np.ceil(y1)), height)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def _window_sums(mask: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """Sum of ``mask`` over every ph x pw window; entry (y, x) is the window at top-left (y, x)."""
    s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    s[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    return s[ph:, pw:] - s[:-ph, pw:] - s[ph:, :-pw] + s[:-ph, :-pw]


def random_patch(image, boxes, rng, stats=None):
    """Replace each box's centre patch by a random same-size box-free region (see docs/studies.md)."""
    mask = box_mask(boxes, *np.asarray(image).shape[:2])

    def elsewhere(im, x0, y0, x1, y1):
        sums = _window_sums(mask, y1 - y0, x1 - x0)
        ys, xs = np.nonzero(sums == sums.min())
        k = int(rng.integers(len(ys)))
        if sums.min() > 0:
            count(stats, "random_patch_fallbacks")
        return im[ys[k]:ys[k] + y1 - y0, xs[k]:xs[k] + x1 - x0]

    return replace_patches(image, boxes, stats, elsewhere)


def gaussian_noise(image, boxes=None, rng=None, stats=None, variance: float = NOISE_VARIANCE):
    """Add N(0, ``variance``) noise to ``image / 255``, then back to uint8 (round, clip)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if rng is None:
        rng = np.random.default_rng()
    x = image.astype(np.float64) / 255.0 + rng.normal(0.0, np.sqrt(variance), size=image.shape)
    count(stats, "noised_images")
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def original(image, boxes=None, rng=None, stats=None):
    """No perturbation (the image itself)."""
    return np.asarray(image)


#: name -> function, in the paper's column order.
PERTURBATIONS: Dict[str, Callable] = {
    "original": original, "black_patch": black_patch, "random_patch": random_patch,
    "flip_patch": flip_patch, "gaussian_noise": gaussian_noise
}


def check_attack_model(model_or_class, attack: str):
    """Raise a ValueError unless ``model_or_class`` is a Detectron2 RetinaNet (or subclass)."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    if not issubclass(cls, RetinaNet):
        raise ValueError(f"{attack}: attacks the anchor classification scores of a RetinaNet "
                         f"(MODEL.META_ARCHITECTURE RetinaNet, APLossRetinaNet or a subclass); got "
                         f"{cls.__name__}. Faster R-CNN is not supported: leave {attack} out of "
                         "--perturbations for this run")


def check_threshold(t: float):
    if not (isinstance(t, (int, float)) and 0.0 < float(t) < 1.0):
        raise ValueError(f"score threshold {t!r}: the attacks need 0 < t < 1 (the anchors' score logit is "
                         "compared with logit(t)); set --deepfool-score-thresh or MODEL.RETINANET.SCORE_THRESH_TEST")


@contextlib.contextmanager
def frozen_params(model):
    """Parameters without ``requires_grad`` inside (gradients w.r.t. the input only)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def score_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """Logit of the test-time scores of ``(..., K)`` head logits (a loss's own ``scores``, e.g. ce_ohem)."""
    loss = getattr(model, "cls_loss", None)
    if loss is None or type(loss).scores is ClsLoss.scores:  # per-class sigmoids
        return logits
    p = loss.scores(logits).clamp(1e-12, 1 - 1e-7)
    return torch.log(p) - torch.log1p(-p)


def _batch_inputs(model, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """``model.preprocess_image`` of each image, zero-padded to one batch (differentiable)."""
    tensors = [model.preprocess_image([{"image": im}]).tensor for im in images]
    if len(tensors) == 1:
        return tensors[0]
    h = max(t.shape[-2] for t in tensors)
    w = max(t.shape[-1] for t in tensors)
    return torch.cat([F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2])) for t in tensors])


def matched_score_logits(model, images: Sequence[torch.Tensor], gt_instances: Sequence[Instances]):
    """Per image, the score logits of the anchors matched to ``gt_instances`` at their class."""
    check_attack_model(model, "attack")
    features = model.backbone(_batch_inputs(model, images))
    features = [features[f] for f in model.head_in_features]
    logits, _ = model.head(features)
    k = model.num_classes
    logits = torch.cat([permute_to_N_HWA_K(x, k) for x in logits], dim=1)  # (N, R, K)
    anchors = model.anchor_generator(features)
    gt_labels, _ = model.label_anchors(anchors, [g.to(logits.device) for g in gt_instances])
    out = []
    for i, labels in enumerate(gt_labels):
        pos = (labels >= 0) & (labels < k)
        idx = torch.nonzero(pos).squeeze(1)
        out.append(score_logits(model, logits[i, idx, labels[idx]]))
    return out


class AttackExample:
    """A record, its image and boxes, the test size and its non-crowd ``Instances`` in test coordinates."""

    def __init__(self, record, image, boxes, size, instances, test_image):
        self.record, self.image, self.boxes = record, image, boxes
        self.size, self.instances, self.test_image = size, instances, test_image
        self.image_id = record.get("image_id")


def _test_transform(cfg, image):
    augs = T.AugmentationList(utils.build_augmentation(cfg, is_train=False))
    aug_input = T.AugInput(image)
    tfm = augs(aug_input)
    for t in tfm.transforms:
        if not isinstance(t, (T.ResizeTransform, T.NoOpTransform)):
            raise ValueError(f"the attacks support test-time augmentations that only resize; got {type(t).__name__}")
    return tfm, aug_input.image


def load_examples(cfg, dataset_name: str, max_images: Optional[int] = None) -> List[AttackExample]:
    """The first ``max_images`` records of ``dataset_name`` (all when None), test-time resized."""
    out = []
    for rec in DatasetCatalog.get(dataset_name)[:max_images]:
        image = utils.read_image(rec["file_name"], format=cfg.INPUT.FORMAT)
        utils.check_image_size(rec, image)
        tfm, test_image = _test_transform(cfg, image)
        annos = [a for a in rec.get("annotations", []) if a.get("iscrowd", 0) == 0]
        gt = annotation_boxes({"annotations": annos}) if annos else np.zeros((0, 4))
        inst = Instances(test_image.shape[:2])
        inst.gt_boxes = Boxes(torch.as_tensor(tfm.apply_box(gt), dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.as_tensor([a["category_id"] for a in annos], dtype=torch.int64)
        out.append(AttackExample(rec, image, annotation_boxes(rec, include_crowd=True),
                                 test_image.shape[:2], inst, test_image))
    return out


def _hwc_to_tensor(image) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))).float()


def resize_patch(patch: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, S, S) float patch resized to (C, height, width): bilinear, antialiased."""
    if tuple(patch.shape[1:]) == (height, width):
        return patch
    return F.interpolate(patch[None], size=(height, width), mode="bilinear",
                         align_corners=False, antialias=True)[0]


def paste_patch_tensor(image: torch.Tensor, boxes, patch: torch.Tensor) -> torch.Tensor:
    """``image`` (C, H, W) with ``patch`` resized into every box's centre region; differentiable."""
    out = image.clone()
    h, w = image.shape[1:]
    for x0, y0, x1, y1 in _regions(boxes, h, w):
        out[:, y0:y1, x0:x1] = resize_patch(patch, y1 - y0, x1 - x0)
    return out


class AdversarialPatch:
    """The test-time perturbation of a trained (S, S, C) uint8 patch, pasted as in training."""

    def __init__(self, patch):
        patch = np.asarray(patch)
        if patch.dtype != np.uint8 or patch.ndim != 3:
            raise ValueError(f"patch: expected an SxSxC uint8 array, got {patch.dtype} {patch.shape}")
        self.patch = patch
        self._tensor = _hwc_to_tensor(patch)

    def __call__(self, image, boxes, rng=None, stats=None):
        return replace_patches(image, boxes, stats, lambda im, x0, y0, x1, y1: resize_patch(
            self._tensor, y1 - y0, x1 - x0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def _patch_terms(model, examples, patch):
    images = [
        resize_patch(paste_patch_tensor(_hwc_to_tensor(ex.image).to(patch.device), ex.boxes, patch),
                     *ex.size)
        for ex in examples
    ]
    return F.softplus(torch.cat(matched_score_logits(model, images, [ex.instances for ex in examples])))


def patch_objective(model, examples: Sequence[AttackExample], patch: torch.Tensor) -> torch.Tensor:
    """Mean softplus of the matched anchors' score logits with ``patch`` pasted: the patch objective."""
    terms = _patch_terms(model, examples, patch)
    if terms.numel() == 0:
        return patch.sum() * 0.0
    return terms.mean()


def _check_positive(name, value, kind=int):
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0
            or (kind is int and int(value) != value)):
        raise ValueError(f"{name}={value!r}: expected a positive {kind.__name__}")


def train_adversarial_patch(model, examples: Sequence[AttackExample], *, steps: int = 100,
                            lr: float = 0.02, batch_size: int = 8, size: int = 32, seed: int = 0,
                            log: Optional[Callable[[str], None]] = None) -> Dict:
    """One universal patch trained by Adam against ``model`` on ``examples`` (docs/studies.md)."""
    check_attack_model(model, "advs_patch")
    for name, value, kind in (("steps", steps, int), ("lr", lr, float),
                              ("batch_size", batch_size, int), ("size", size, int)):
        _check_positive(f"advs_patch {name}", value, kind)
    if not examples:
        raise ValueError("advs_patch: no training images")
    gen = torch.Generator().manual_seed(int(seed))
    param = torch.rand((examples[0].image.shape[2], size, size), generator=gen)
    param = param.to(next(model.parameters()).device).requires_grad_()
    opt = torch.optim.Adam([param], lr=lr)
    history, order, was_training = [], [], model.training
    model.eval()

    def full_objective(patch01):
        with torch.no_grad():
            terms = torch.cat([_patch_terms(model, examples[i:i + batch_size], patch01 * 255.0)
                               for i in range(0, len(examples), batch_size)])
        return float(terms.mean()) if terms.numel() else 0.0

    with frozen_params(model):
        initial = full_objective(param.detach().mul(255).round().div(255))
        for step in range(int(steps)):
            if len(order) < batch_size:
                order += torch.randperm(len(examples), generator=gen).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            loss = patch_objective(model, [examples[i] for i in idx], param * 255.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                param.clamp_(0.0, 1.0)
            history.append(float(loss.detach()))
            if log is not None and (step % max(1, steps // 10) == 0 or step == steps - 1):
                log(f"advs_patch step {step + 1}/{steps}: objective {history[-1]:.4f}")
        quantised = param.detach().mul(255).round().clamp(0, 255)
        final = full_objective(quantised / 255.0)
    model.train(was_training)
    patch = quantised.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return dict(patch=patch, objective=history, initial_objective=initial, final_objective=final,
                steps=int(steps), lr=float(lr), batch_size=int(batch_size), size=int(size),
                seed=int(seed), images=len(examples))


def patch_to_rgb_uint8(patch, image_format: str) -> np.ndarray:
    """The patch ((S, S, C) uint8 in ``image_format``) as RGB uint8, for saving as PNG."""
    return np.asarray(utils.convert_image_to_rgb(patch, image_format)).astype(np.uint8)


def deepfool_binary(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, *,
                    max_iter: int = 50, overshoot: float = 0.02, step_eps: float = 1e-4) -> Dict:
    """Binary DeepFool driving the scalar ``f`` below 0 from ``x0``; fields: docs/studies.md."""
    _check_positive("deepfool max_iter", max_iter, int)
    if not (isinstance(overshoot, (int, float)) and overshoot >= 0):
        raise ValueError(f"deepfool overshoot={overshoot!r}: expected a number >= 0")
    if not (isinstance(step_eps, (int, float)) and step_eps >= 0):
        raise ValueError(f"deepfool step_eps={step_eps!r}: expected a number >= 0")
    x0 = x0.detach()
    r_tot, first_step, f0, it, reason = torch.zeros_like(x0), None, None, 0, "max_iter"
    while True:
        x = (x0 + (1.0 + overshoot) * r_tot).requires_grad_(True)
        with torch.enable_grad():
            fx = f(x)
            value = float(fx.detach())
            f0 = value if f0 is None else f0
            if not math.isfinite(value) or value < 0 or it >= max_iter:
                reason = "non_finite" if not math.isfinite(value) else "max_iter" if value >= 0 else \
                    "success" if it > 0 else "already"
                break
            (grad,) = torch.autograd.grad(fx, x)
        gg = float((grad.double() ** 2).sum())
        if gg == 0.0 or not math.isfinite(gg):
            reason = "zero_gradient" if gg == 0.0 else "non_finite"
            break
        r_i = (-(value / math.sqrt(gg) + step_eps) / math.sqrt(gg)) * grad.detach()
        first_step = r_i.clone() if first_step is None else first_step
        r_tot, it = r_tot + r_i, it + 1
    return dict(r=(x.detach() - x0), success=reason in ("success", "already"), iterations=it,
                f0=f0, f=float(fx.detach()), first_step=first_step, reason=reason)


def detector_margin(model, instances: Instances, threshold: float):
    """``f(x) = max_a g_a(x) - logit(threshold)`` over the matched anchors; ``_NoMatch`` without any."""
    check_threshold(threshold)
    c = math.log(threshold) - math.log1p(-threshold)

    def f(x):
        g = matched_score_logits(model, [x], [instances])[0]
        if g.numel() == 0:
            raise _NoMatch()
        return g.max() - c

    return f


class _NoMatch(Exception):
    """No anchor is matched to an object of the image."""


def deepfool_detector(model, example: AttackExample, *, threshold: float, max_iter: int = 50,
                      overshoot: float = 0.02, keep_perturbation: bool = False) -> Dict:
    """DeepFool on one image: ``rho``, ``r_norm``, ``x_norm``, ``success``, ``reason``, ..."""
    check_attack_model(model, "deepfool")
    x0 = _hwc_to_tensor(example.test_image).to(next(model.parameters()).device)
    res = dict(image_id=example.image_id, objects=len(example.instances))
    if len(example.instances) == 0:
        return dict(res, reason="no_objects", success=False, attacked=False)
    f = detector_margin(model, example.instances, threshold)
    try:
        with frozen_params(model):
            out = deepfool_binary(f, x0, max_iter=max_iter, overshoot=overshoot)
    except _NoMatch:
        return dict(res, reason="no_matched_anchor", success=False, attacked=False)
    r_norm, x_norm = float(out["r"].double().norm()), float(x0.double().norm())
    res = dict(res, reason=out["reason"], attacked=out["reason"] != "already",
               success=out["reason"] == "success", iterations=out["iterations"], f0=out["f0"],
               f=out["f"], r_norm=r_norm, x_norm=x_norm, rho=r_norm / x_norm if x_norm else None)
    if keep_perturbation:
        res["perturbation"] = out["r"]
    return res


def deepfool_dataset(cfg, model, dataset_name: str, *, max_images: Optional[int] = None,
                     threshold: Optional[float] = None, max_iter: int = 50,
                     overshoot: float = 0.02, scale: float = 1000.0,
                     log: Optional[Callable[[str], None]] = None) -> Dict:
    """DeepFool on the first ``max_images`` images: per-image results, ``rho``, ``rho * scale``, counts."""
    check_attack_model(model, "deepfool")
    _check_positive("deepfool scale", scale, float)
    threshold = model.test_score_thresh if threshold is None else threshold
    check_threshold(threshold)
    examples = load_examples(cfg, dataset_name, max_images)
    was_training, per_image = model.training, []
    model.eval()
    for i, ex in enumerate(examples):
        per_image.append(deepfool_detector(model, ex, threshold=threshold, max_iter=max_iter, overshoot=overshoot))
        if log is not None:
            r = per_image[-1]
            log(f"deepfool image {i + 1}/{len(examples)}: {r['reason']}"
                + (f", {r['iterations']} steps, rho {r['rho']:.3g}" if r.get("attacked") else ""))
    model.train(was_training)
    attacked = [r for r in per_image if r.get("attacked")]
    succ = [r for r in attacked if r["success"]]
    rho = float(np.mean([r["rho"] for r in succ])) if succ else None
    return dict(
        rho=rho, rho_scaled=None if rho is None else rho * scale, scale=scale,
        rho_median=float(np.median([r["rho"] for r in succ])) if succ else None,
        success_rate=len(succ) / len(attacked) if attacked else None, images=len(per_image),
        attacked=len(attacked), succeeded=len(succ),
        already_undetected=sum(r["reason"] == "already" for r in per_image),
        no_objects=sum(r["reason"] in ("no_objects", "no_matched_anchor") for r in per_image),
        mean_iterations=float(np.mean([r["iterations"] for r in succ])) if succ else None,
        threshold=float(threshold), max_iter=int(max_iter), overshoot=float(overshoot), per_image=per_image)


STUDY = "robustness"
#: Every column of Table 3 (the choices of ``--perturbations``) -> its header, in the paper's order.
PERTURBATION_NAMES = {
    "original": "Original", "black_patch": "Black Patch", "random_patch": "Random Patch",
    "flip_patch": "Flip Patch", "advs_patch": "Advs-Patch", "gaussian_noise": "Gaussian Noise",
    "deepfool": "DeepFool"
}
COLUMNS = tuple(PERTURBATION_NAMES)
ATTACKS = ("advs_patch", "deepfool")  # white-box, per model; RetinaNet only


def image_seed(seed: int, image_id) -> int:
    """``seed + image_id`` (integer ids); other ids (e.g. VOC file ids) via CRC32 of ``str``."""
    try:
        iid = int(image_id)
    except (TypeError, ValueError):
        iid = zlib.crc32(str(image_id).encode())
    return int(seed) + iid


class PerturbedDatasetMapper(BoxAwareDatasetMapper):
    """Detectron2's test mapper perturbing each decoded image first (``perturbation`` or ``fn``),
    then its test-time augmentations; the counts in the output's ``"perturbation"``; docs/studies.md."""

    include_crowd = True

    def __init__(self, cfg, perturbation: str, seed: int = 0, fn: Callable = None):
        if perturbation == "advs_patch":
            if fn is None:
                raise ValueError("perturbation 'advs_patch' needs fn=AdversarialPatch(patch)")
        elif perturbation not in PERTURBATIONS:
            valid = ", ".join(list(PERTURBATIONS) + ["advs_patch (with fn)"])
            raise ValueError(f"Unknown perturbation {perturbation!r}; valid: {valid}")
        super().__init__(cfg, is_train=False)
        self.perturbation, self.seed, self.fn = perturbation, seed, fn or PERTURBATIONS[perturbation]

    def aug_input(self, dataset_dict, image, sem_seg):
        aug_input = super().aug_input(dataset_dict, image, sem_seg)
        boxes = np.zeros((0, 4)) if aug_input.boxes is None else aug_input.boxes
        stats = dataset_dict["perturbation"] = dict(name=self.perturbation, image_id=dataset_dict["image_id"])
        rng = np.random.default_rng(image_seed(self.seed, dataset_dict["image_id"]))
        aug_input.image = self.fn(image, boxes, rng, stats)
        return aug_input


class PerturbationStats(DatasetEvaluator):
    """Sums the mapper's per-image perturbation statistics (``"perturbation_stats"``)."""

    def reset(self):
        self._items = []

    def process(self, inputs, outputs):
        self._items.extend(i["perturbation"] for i in inputs if "perturbation" in i)

    def evaluate(self):
        items = [x for part in comm.gather(self._items, dst=0) for x in part]
        if not comm.is_main_process():
            return {}
        total = Counter()
        for it in items:
            total.update({k: v for k, v in it.items() if k not in ("name", "image_id")})
        return {"perturbation_stats": dict(images=len(items), **dict(sorted(total.items())))}


def evaluate_run(cfg, model, dataset_name, perturbation, seed, output_folder, fn=None):
    """``(evaluator results, perturbation stats)`` of ``model`` on the perturbed dataset."""
    loader = build_detection_test_loader(DatasetCatalog.get(dataset_name), num_workers=cfg.DATALOADER.NUM_WORKERS,
                                         mapper=PerturbedDatasetMapper(cfg, perturbation, seed, fn=fn))
    evaluator = DatasetEvaluators([build_evaluator(cfg, dataset_name, str(output_folder)), PerturbationStats()])
    results = dict(inference_on_dataset(model, loader, evaluator))
    return results, results.pop("perturbation_stats", {})


def _metric(results, key):
    bbox = (results.get("bbox") if isinstance(results, dict) else None) or {}
    return float(bbox[key]) if key in bbox else None


def plot_examples(dataset_name, perturbations, seed, path, fns=None, image_format="RGB"):
    """Every perturbation (``fns``: extra ones) of the first image of ``dataset_name`` in one figure."""
    fns = dict(PERTURBATIONS, **(fns or {}))
    perturbations = [p for p in perturbations if p in fns]
    record = DatasetCatalog.get(dataset_name)[0]
    image = utils.read_image(record["file_name"], format=image_format)
    boxes = annotation_boxes(record, include_crowd=True)
    fig, axes = subplots(1, len(perturbations), figsize=(2.6 * len(perturbations), 3.0), squeeze=False)
    for ax, name in zip(axes[0], perturbations):
        img = fns[name](image, boxes, np.random.default_rng(image_seed(seed, record["image_id"])), None)
        ax.imshow(utils.convert_image_to_rgb(img, image_format))
        for x0, y0, x1, y1 in boxes:
            ax.add_patch(pyplot().Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.6, color="yellow"))
        ax.set_title(PERTURBATION_NAMES[name], fontsize=9)
        ax.axis("off")
    save_figure(fig, path, dpi=110)


def _cell(run, metric, pert, digits):
    if pert == "deepfool":
        return fmt_num((run.get("deepfool") or {}).get("rho_scaled"), digits + 1)
    return fmt_num(run[metric].get(pert), digits)


def column_header(pert, report=None):
    """Table 3 header of a column (DeepFool with its scale)."""
    if pert == "deepfool":
        scale = (report or {}).get("deepfool", {}).get("scale", DEEPFOOL_SCALE)
        return f"DeepFool (rho x {fmt_num(scale, 0)})"
    return PERTURBATION_NAMES[pert]


def build_table(report, metric=None, digits=1):
    """Table 3 as markdown: one row per run, one column per perturbation (DeepFool: scaled mean rho)."""
    metric = metric or report["metric"]
    perts = report["perturbations"]
    rows = [[run["label"]] + [_cell(run, metric, p, digits) for p in perts]
            for run in report["runs"]]
    return markdown_table(["Training Loss"] + [column_header(p, report) for p in perts], rows)


DEEPFOOL_SCALE = 1000.0


def parse_args(argv=None):
    p = study_argument_parser(STUDY, __doc__.split("\n\n")[0], runs=RUN_SPEC)
    add = p.add_argument
    add("--max-images", type=int, default=None, help="evaluate on the first N images only (ground truth too)")
    add("--perturbations", nargs="+", choices=list(COLUMNS), default=list(COLUMNS),
        help="Table 3 columns (default: all); advs_patch and deepfool need RetinaNet runs")
    add("--seed", type=int, default=0, help="per-image seed is seed + image id")
    add("--digits", type=int, default=1, help="decimals in the markdown table")
    add("--no-plot", action="store_true", help="skip robustness.png")
    add = p.add_argument_group("Advs-Patch (one universal patch per run, trained white-box)").add_argument
    add("--patch-dataset", default=None, help="training images of the patch (default: the run's DATASETS.TRAIN[0])")
    add("--patch-images", type=number(int), default=64, help="the first N images of --patch-dataset")
    add("--patch-steps", type=number(int), default=100, help="Adam steps")
    add("--patch-lr", type=number(float), default=0.03, help="Adam step size on pixel values in [0, 1]")
    add("--patch-batch", type=number(int), default=8, help="images per step")
    add("--patch-size", type=number(int), default=32, help="side of the square patch in pixels")
    add("--patch-seed", type=int, default=0, help="initial patch and image order")
    add = p.add_argument_group("DeepFool (minimal L2 perturbation per test image)").add_argument
    add("--deepfool-images", type=number(int), default=None, help="the first N evaluated images (default: all)")
    add("--deepfool-max-iter", type=number(int), default=50, help="steps per image before it counts as failed")
    add("--deepfool-overshoot", type=number(float, low=0), default=0.02, help="DeepFool's overshoot")
    add("--deepfool-score-thresh", type=float, default=None,
        help="score an anchor must fall below (default: the run's MODEL.RETINANET.SCORE_THRESH_TEST)")
    add("--deepfool-scale", type=number(float), default=DEEPFOOL_SCALE, help="factor on rho in the table")
    return p.parse_args(argv)


def check_attacks(args, resolved):
    """Fail before any work when an attack is asked of a run it does not support."""
    for pert in ATTACKS:
        if pert not in args.perturbations:
            continue
        for cfg, label in resolved:
            try:
                check_attack_model(META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE), pert)
            except ValueError as e:
                raise ValueError(f"run {label!r}: {e}") from None
            if pert == "deepfool":
                t = args.deepfool_score_thresh
                check_threshold(cfg.MODEL.RETINANET.SCORE_THRESH_TEST if t is None else t)


def run_advs_patch(args, cfg, model, run_index, out):
    """Train the run's patch, save it as PNG; ``(AdversarialPatch, summary dict)``."""
    dataset = args.patch_dataset or cfg.DATASETS.TRAIN[0]
    res = train_adversarial_patch(
        model, load_examples(cfg, dataset, args.patch_images), steps=args.patch_steps, lr=args.patch_lr,
        batch_size=args.patch_batch,
        size=args.patch_size, seed=args.patch_seed, log=lambda m: progress(STUDY, "    " + m))
    name = f"advs_patch_run{run_index}.png"
    from PIL import Image

    Image.fromarray(patch_to_rgb_uint8(res["patch"], cfg.INPUT.FORMAT)).save(out / name)
    summary = {k: v for k, v in res.items() if k != "patch"}
    summary.update(dataset=dataset, file=name, image_format=cfg.INPUT.FORMAT,
                   objective_definition="mean softplus(score logit) of the matched anchors "
                                        "at their object's class (minimised)")
    return AdversarialPatch(res["patch"]), summary


def main(argv=None):
    args = parse_args(argv)
    out, specs, resolved, labels, dataset = prepare_runs(args)
    check_attacks(args, [(cfg, lab) for (cfg, _), lab in zip(resolved, labels)])
    eval_name = dataset_subset(dataset, args.max_images, out / "subsets")
    evaluator_type = MetadataCatalog.get(eval_name).get("evaluator_type", None)
    metric = "AP50"
    report = {
        "study": STUDY, "created": timestamp(), "dataset": dataset, "evaluated_dataset": eval_name,
        "evaluator_type": evaluator_type, "max_images": args.max_images, "metric": metric,
        "metrics": ["AP50", "AP"], "seed": args.seed, "noise_variance": NOISE_VARIANCE,
        "perturbations": list(args.perturbations),
        "perturbation_names": {p: PERTURBATION_NAMES[p] for p in args.perturbations}, "runs": [],
        "figures": []
    }
    if "advs_patch" in args.perturbations:
        report["advs_patch"] = {k[6:]: v for k, v in vars(args).items() if k.startswith("patch_")}
    if "deepfool" in args.perturbations:
        report["deepfool"] = dict(
            {k[9:]: v for k, v in vars(args).items() if k.startswith("deepfool_")},
            definition="rho = mean over images attacked successfully of ||r||_2 / ||x||_2 "
                       "(x: test-resized input, pixel units); binary DeepFool on "
                       "max over matched anchors of score logit - logit(threshold)")
    n_total = len(specs) * len(args.perturbations)
    k = 0
    plot_fns = {}
    for spec, (cfg, _), label in zip(specs, resolved, labels):
        model = build_model_for_run(cfg, spec.weights)
        index = len(report["runs"])
        run = {"label": label, "config": spec.config, "weights": spec.weights or cfg.MODEL.WEIGHTS,
               "cls_loss": cfg.MODEL.CLS_LOSS.NAME, "results": {}, "perturbation_stats": {},
               "AP50": {}, "AP": {}}
        for pert in args.perturbations:
            k += 1
            progress(STUDY, f"({k}/{n_total}) {label}: {PERTURBATION_NAMES[pert]} on {eval_name}")
            if pert == "deepfool":
                run["deepfool"] = deepfool_dataset(
                    cfg, model, eval_name, max_images=args.deepfool_images,
                    threshold=args.deepfool_score_thresh, max_iter=args.deepfool_max_iter,
                    overshoot=args.deepfool_overshoot, scale=args.deepfool_scale,
                    log=lambda m: progress(STUDY, "    " + m))
                d = run["deepfool"]
                progress(STUDY, f"    rho x {args.deepfool_scale:g}: {fmt_num(d['rho_scaled'], 3)}"
                                f"; succeeded {d['succeeded']}/{d['attacked']} attacked images")
                continue
            fn = None
            if pert == "advs_patch":
                fn, run["advs_patch"] = run_advs_patch(args, cfg, model, index, out)
                plot_fns.setdefault("advs_patch", (fn, cfg.INPUT.FORMAT))
            folder = out / "eval" / f"run{index}" / pert
            results, stats = evaluate_run(cfg, model, eval_name, pert, args.seed, folder, fn=fn)
            run["results"][pert] = results
            run["perturbation_stats"][pert] = stats
            for m in ("AP50", "AP"):
                run[m][pert] = _metric(results, m)
            progress(STUDY, f"    AP50 {fmt_num(run['AP50'][pert], 2)}, AP "
                            f"{fmt_num(run['AP'][pert], 2)}; {stats}")
        report["runs"].append(run)
        del model

    if not args.no_plot:
        try:
            fmt = plot_fns["advs_patch"][1] if plot_fns else "RGB"
            plot_examples(eval_name, args.perturbations, args.seed, out / "robustness.png",
                          fns={k: v[0] for k, v in plot_fns.items()}, image_format=fmt)
            report["figures"].append("robustness.png")
        except (OSError, ValueError) as e:
            progress(STUDY, f"no example figure: {type(e).__name__}: {e}")

    table = build_table(report, digits=args.digits)
    md = [f"## Robustness (Table 3): {metric} on `{dataset}`"
          + (f" (first {args.max_images} images)" if args.max_images else ""), "", table, ""]
    md.append(f"Evaluator: {evaluator_type}; seed {args.seed} (+ image id); Gaussian noise "
              f"variance {NOISE_VARIANCE} on [0, 1]. AP (0.5:0.95) is in robustness.json.")
    fallbacks = {r["label"]: r["perturbation_stats"].get("random_patch", {}).get(
        "random_patch_fallbacks", 0) for r in report["runs"]}
    if any(fallbacks.values()):
        md.append(f"Random patch fallbacks (no box-free region): {fallbacks}")
    if "advs_patch" in args.perturbations:
        md += ["", "Advs-Patch objective (docs/studies.md), initial -> final patch: " + "; ".join(
            f"{r['label']} {r['advs_patch']['initial_objective']:.4f} -> {r['advs_patch']['final_objective']:.4f} "
            f"(`{r['advs_patch']['file']}`)" for r in report["runs"] if "advs_patch" in r)]
    if "deepfool" in args.perturbations:
        scale = report["deepfool"]["scale"]
        md += ["", f"DeepFool rho x {scale:g} (docs/studies.md); succeeded/attacked: " + "; ".join(
            f"{r['label']} {r['deepfool']['succeeded']}/{r['deepfool']['attacked']} of {r['deepfool']['images']}"
            for r in report["runs"] if "deepfool" in r)]
    if report["figures"]:
        md += ["", "![perturbation examples](robustness.png)"]
    write_study_outputs(out, STUDY, report, md, table)
    return report


if __name__ == "__main__":
    main()
