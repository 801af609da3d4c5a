"""White-box attacks of Table 3 (robustness study): the adversarial patch ("Advs-Patch", Brown et
al. 2017, the paper's [57]) and DeepFool (Moosavi-Dezfooli et al. CVPR'16, the paper's [56]),
"slightly generalised from attacking a classifier to attacking a detector".

Details: docs/studies.md#studiesattacks."""
import contextlib
import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances

from ap_loss_d2.data.mapper import annotation_boxes
from ap_loss_d2.losses.registry import ClsLoss
from .perturbations import center_patch_region, check_image_boxes, count


# ---------------------------------------------------------------------------------------------
# Model access
# ---------------------------------------------------------------------------------------------
def _retinanet_class():
    from detectron2.modeling import RetinaNet

    return RetinaNet


def check_attack_model(model_or_class, attack: str):
    """Raise a ValueError unless ``model_or_class`` is a Detectron2 RetinaNet (or subclass)."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    if not issubclass(cls, _retinanet_class()):
        raise ValueError(
            f"{attack}: attacks the anchor classification scores of a RetinaNet "
            f"(MODEL.META_ARCHITECTURE RetinaNet, APLossRetinaNet or a subclass); got "
            f"{cls.__name__}. Faster R-CNN is not supported: leave {attack} out of "
            "--perturbations for this run"
        )


def check_threshold(t: float):
    if not (isinstance(t, (int, float)) and 0.0 < float(t) < 1.0):
        raise ValueError(
            f"score threshold {t!r}: the attacks need 0 < t < 1 (the anchors' score logit is "
            "compared with logit(t)); set --deepfool-score-thresh or "
            "MODEL.RETINANET.SCORE_THRESH_TEST"
        )


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


def _to_nrk(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, A*K, H, W) head output -> (N, H*W*A, K), Detectron2's anchor order."""
    n, _, h, w = x.shape
    return x.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k)


def score_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` of the test-time scores ``p`` of ``(..., K)`` head logits: the logits
    themselves for sigmoid scoring; for a loss with its own ``scores`` (``ce_ohem``)
    the logit of those scores (clamped to [1e-12, 1 - 1e-7])."""
    loss = getattr(model, "cls_loss", None)
    if loss is None or type(loss).scores is ClsLoss.scores:  # per-class sigmoids
        return logits
    p = loss.scores(logits).clamp(1e-12, 1 - 1e-7)
    return torch.log(p) - torch.log1p(-p)


def _batch_inputs(model, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """``model.preprocess_image(...).tensor`` of ``images``, differentiable for batches too
    (Detectron2 pads a batch in place): each image preprocessed alone, then zero-padded to the
    largest (already divisible) size, as ``ImageList.from_tensors`` pads."""
    tensors = [model.preprocess_image([{"image": im}]).tensor for im in images]
    if len(tensors) == 1:
        return tensors[0]
    h = max(t.shape[-2] for t in tensors)
    w = max(t.shape[-1] for t in tensors)
    return torch.cat([F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2])) for t in tensors])


def matched_score_logits(model, images: Sequence[torch.Tensor], gt_instances: Sequence[Instances]):
    """Score logits of the anchors matched to ground-truth objects, per image.

    Args:
        model: a Detectron2 RetinaNet in eval mode.
        images: (C, H, W) float tensors in the model's input format (pixel units, before
            normalisation), e.g. a test mapper's ``"image"`` as float.
        gt_instances: per image, ``Instances`` with ``gt_boxes`` (in the coordinates of the
            image tensor) and ``gt_classes``.

    Returns:
        list of 1-D tensors, per image the score logit (see :func:`score_logits`) of every
        matched anchor at its object's class (empty if none is matched); differentiable w.r.t.
        ``images``.
    """
    check_attack_model(model, "attack")
    features = model.backbone(_batch_inputs(model, images))
    features = [features[f] for f in model.head_in_features]
    logits, _ = model.head(features)
    k = model.num_classes
    logits = torch.cat([_to_nrk(x, k) for x in logits], dim=1)  # (N, R, K)
    anchors = model.anchor_generator(features)
    gt_labels, _ = model.label_anchors(anchors, [g.to(logits.device) for g in gt_instances])
    out = []
    for i, labels in enumerate(gt_labels):
        pos = (labels >= 0) & (labels < k)
        idx = torch.nonzero(pos).squeeze(1)
        out.append(score_logits(model, logits[i, idx, labels[idx]]))
    return out


# ---------------------------------------------------------------------------------------------
# Images with their ground truth
# ---------------------------------------------------------------------------------------------
class AttackExample:
    """One record prepared for the attacks: the decoded image (HxWxC uint8, ``cfg.INPUT.FORMAT``),
    all its boxes (original coordinates, crowd included: where patches go), the test-time size
    ``(new_h, new_w)`` and ``Instances`` of the non-crowd objects in test-time coordinates."""

    def __init__(self, record, image, boxes, size, instances, test_image):
        self.record, self.image, self.boxes = record, image, boxes
        self.size, self.instances, self.test_image = size, instances, test_image

    @property
    def image_id(self):
        return self.record.get("image_id")


def _test_transform(cfg, image):
    augs = T.AugmentationList(utils.build_augmentation(cfg, is_train=False))
    aug_input = T.AugInput(image)
    tfm = augs(aug_input)
    for t in tfm.transforms:
        if not isinstance(t, (T.ResizeTransform, T.NoOpTransform)):
            raise ValueError(
                f"the attacks support test-time augmentations that only resize; got "
                f"{type(t).__name__}"
            )
    return tfm, aug_input.image


def load_examples(cfg, dataset_name: str, max_images: Optional[int] = None) -> List[AttackExample]:
    """The first ``max_images`` records of ``dataset_name`` (all when None) as
    :class:`AttackExample` (test-time resize of ``cfg``, as Detectron2's test mapper)."""
    records = DatasetCatalog.get(dataset_name)
    if max_images is not None:
        records = records[:max_images]
    out = []
    for rec in records:
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


# ---------------------------------------------------------------------------------------------
# Adversarial patch
# ---------------------------------------------------------------------------------------------
def resize_patch(patch: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, S, S) float patch resized to (C, height, width): bilinear, antialiased."""
    if tuple(patch.shape[1:]) == (height, width):
        return patch
    return F.interpolate(patch[None], size=(height, width), mode="bilinear",
                         align_corners=False, antialias=True)[0]


def _regions(boxes, height, width):
    regions = (center_patch_region(b, height, width) for b in np.asarray(boxes).reshape(-1, 4))
    return [r for r in regions if r is not None]


def paste_patch_tensor(image: torch.Tensor, boxes, patch: torch.Tensor) -> torch.Tensor:
    """``image`` (C, H, W) float with ``patch`` (C, S, S, pixel units) resized into the centre
    region of every box (XYXY, image coordinates); differentiable w.r.t. ``patch``."""
    out = image.clone()
    h, w = image.shape[1:]
    for x0, y0, x1, y1 in _regions(boxes, h, w):
        out[:, y0:y1, x0:x1] = resize_patch(patch, y1 - y0, x1 - x0)
    return out


class AdversarialPatch:
    """The test-time perturbation of a trained patch, with the signature of
    :data:`~studies.perturbations.PERTURBATIONS`: ``(image, boxes, rng, stats)``.

    ``patch``: (S, S, C) uint8 in the image format of the mapper (``cfg.INPUT.FORMAT``). Each
    box's centre region is replaced by the patch resized as in training (bilinear, antialiased),
    rounded to uint8. ``rng`` is unused."""

    def __init__(self, patch):
        patch = np.asarray(patch)
        if patch.dtype != np.uint8 or patch.ndim != 3:
            raise ValueError(f"patch: expected an SxSxC uint8 array, got {patch.dtype} {patch.shape}")
        self.patch = patch
        self._tensor = _hwc_to_tensor(patch)

    def __call__(self, image, boxes, rng=None, stats=None):
        image, boxes = check_image_boxes(image, boxes)
        out = image.copy()
        h, w = image.shape[:2]
        for x0, y0, x1, y1 in _regions(boxes, h, w):
            p = resize_patch(self._tensor, y1 - y0, x1 - x0)
            p = p.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            out[y0:y1, x0:x1] = p
            count(stats, "patches")
        return out


def _resize_image(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[1:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


def _patch_terms(model, examples, patch):
    images = [
        _resize_image(paste_patch_tensor(_hwc_to_tensor(ex.image).to(patch.device), ex.boxes, patch),
                      ex.size)
        for ex in examples
    ]
    return F.softplus(torch.cat(matched_score_logits(model, images, [ex.instances for ex in examples])))


def patch_objective(model, examples: Sequence[AttackExample], patch: torch.Tensor) -> torch.Tensor:
    """Mean over the matched anchors of ``examples`` of ``softplus(g)`` (``g``: score logit of the
    anchor at its object's class) with ``patch`` ((C, S, S), pixel units 0..255) pasted at the
    centre of every box of each image, then the image resized to its test size; the quantity
    :func:`train_adversarial_patch` minimises (a scalar, differentiable w.r.t. ``patch``)."""
    terms = _patch_terms(model, examples, patch)
    if terms.numel() == 0:
        return patch.sum() * 0.0
    return terms.mean()


def _check_positive(name, value, kind=int):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0 or (
        kind is int and int(value) != value
    ):
        raise ValueError(f"{name}={value!r}: expected a positive {kind.__name__}")


def train_adversarial_patch(model, examples: Sequence[AttackExample], *, steps: int = 100,
                            lr: float = 0.02, batch_size: int = 8, size: int = 32, seed: int = 0,
                            log: Optional[Callable[[str], None]] = None) -> Dict:
    """Train one universal patch against ``model`` (see the module docstring).

    Args:
        model: a Detectron2 RetinaNet (eval mode; its parameters are not changed).
        examples: training images (:func:`load_examples`); those without a matched anchor do not
            contribute to the objective.
        steps: Adam steps (> 0); lr: Adam's step size on pixel values in [0, 1];
        batch_size: images per step, drawn without replacement per epoch from ``examples``;
        size: side of the square patch in pixels; seed: initial patch (uniform in [0, 1]) and
            batch order.

    Returns:
        dict with ``patch`` ((S, S, C) uint8, the model's input format), ``objective`` (value per
        step, on that step's batch, before the update), ``initial_objective`` / ``final_objective``
        (on all ``examples``, initial and final quantised patch) and the settings.
    """
    check_attack_model(model, "advs_patch")
    for name, value, kind in (("steps", steps, int), ("lr", lr, float),
                              ("batch_size", batch_size, int), ("size", size, int)):
        _check_positive(f"advs_patch {name}", value, kind)
    if not examples:
        raise ValueError("advs_patch: no training images")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    channels = examples[0].image.shape[2]
    param = torch.rand((channels, size, size), generator=gen).to(device).requires_grad_()
    opt = torch.optim.Adam([param], lr=lr)
    history = []
    order: List[int] = []
    was_training = model.training
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


# ---------------------------------------------------------------------------------------------
# DeepFool
# ---------------------------------------------------------------------------------------------
def deepfool_binary(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, *,
                    max_iter: int = 50, overshoot: float = 0.02, step_eps: float = 1e-4) -> Dict:
    """Binary DeepFool (Moosavi-Dezfooli et al. 2016, Algorithm 1 with their overshoot) driving
    the scalar ``f`` below 0, starting from ``x0``.

    Iterates ``r_i = -(f(x_i) / ||w_i|| + step_eps) * w_i / ||w_i||`` with
    ``w_i = grad f(x_i)`` (for ``step_eps = 0`` Algorithm 1's ``-f w / ||w||^2``; the authors'
    code adds ``step_eps = 1e-4`` to the step length so that the iteration cannot stall where
    ``f`` rounds to 0), ``x_{i+1} = x0 + (1 + overshoot) * sum r_i`` until ``f(x_i) < 0`` or
    ``max_iter`` steps.

    Returns:
        dict with ``r`` (the perturbation ``x_final - x0``, zeros when ``f(x0) < 0``),
        ``success`` (``f < 0`` at the end), ``iterations`` (steps taken), ``f0``, ``f`` (final
        value), ``first_step`` (``r_0``, None when no step was taken) and ``reason`` ("success",
        "already" (``f(x0) < 0``), "max_iter", "zero_gradient" or "non_finite").
    """
    _check_positive("deepfool max_iter", max_iter, int)
    if not (isinstance(overshoot, (int, float)) and overshoot >= 0):
        raise ValueError(f"deepfool overshoot={overshoot!r}: expected a number >= 0")
    if not (isinstance(step_eps, (int, float)) and step_eps >= 0):
        raise ValueError(f"deepfool step_eps={step_eps!r}: expected a number >= 0")
    x0 = x0.detach()
    r_tot = torch.zeros_like(x0)
    first_step, f0 = None, None
    it = 0
    reason = "max_iter"
    while True:
        x = (x0 + (1.0 + overshoot) * r_tot).requires_grad_(True)
        with torch.enable_grad():
            fx = f(x)
            if f0 is None:
                f0 = float(fx.detach())
            if not math.isfinite(float(fx.detach())):
                reason = "non_finite"
                break
            if float(fx.detach()) < 0:
                reason = "success" if it > 0 else "already"
                break
            if it >= max_iter:
                break
            (grad,) = torch.autograd.grad(fx, x)
        gg = float((grad.double() ** 2).sum())
        if gg == 0.0 or not math.isfinite(gg):
            reason = "zero_gradient" if gg == 0.0 else "non_finite"
            break
        norm = math.sqrt(gg)
        r_i = (-(float(fx.detach()) / norm + step_eps) / norm) * grad.detach()
        if first_step is None:
            first_step = r_i.clone()
        r_tot = r_tot + r_i
        it += 1
    return dict(r=(x.detach() - x0), success=reason in ("success", "already"), iterations=it,
                f0=f0, f=float(fx.detach()), first_step=first_step, reason=reason)


def detector_margin(model, instances: Instances, threshold: float):
    """``f(x) = max_a g_a(x) - logit(threshold)`` over the anchors of ``model`` matched to the
    objects of ``instances``, as a function of the model input ``x`` ((C, H, W) float); None
    when no anchor is matched (see :func:`matched_score_logits`)."""
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
    """DeepFool on one image (see the module docstring): per-image result dict (``rho``,
    ``r_norm``, ``x_norm``, ``success``, ``reason``, ``iterations``, ``f0``, ``f``,
    ``objects``; ``perturbation``, the (C, H, W) tensor ``r``, if ``keep_perturbation``)."""
    check_attack_model(model, "deepfool")
    device = next(model.parameters()).device
    x0 = _hwc_to_tensor(example.test_image).to(device)
    res = dict(image_id=example.image_id, objects=len(example.instances))
    if len(example.instances) == 0:
        return dict(res, reason="no_objects", success=False, attacked=False)
    f = detector_margin(model, example.instances, threshold)
    try:
        with frozen_params(model):
            out = deepfool_binary(f, x0, max_iter=max_iter, overshoot=overshoot)
    except _NoMatch:
        return dict(res, reason="no_matched_anchor", success=False, attacked=False)
    r_norm = float(out["r"].double().norm())
    x_norm = float(x0.double().norm())
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
    """DeepFool on the first ``max_images`` images of ``dataset_name``: per-image results and
    ``rho`` (mean ``||r|| / ||x||`` over the successful attacks), ``rho_scaled``
    (``rho * scale``), ``success_rate`` (successes / attacked images) and counts."""
    check_attack_model(model, "deepfool")
    _check_positive("deepfool scale", scale, float)
    threshold = model.test_score_thresh if threshold is None else threshold
    check_threshold(threshold)
    examples = load_examples(cfg, dataset_name, max_images)
    was_training = model.training
    model.eval()
    per_image = []
    for i, ex in enumerate(examples):
        per_image.append(deepfool_detector(model, ex, threshold=threshold, max_iter=max_iter,
                                           overshoot=overshoot))
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
        success_rate=len(succ) / len(attacked) if attacked else None,
        images=len(per_image), attacked=len(attacked), succeeded=len(succ),
        already_undetected=sum(r["reason"] == "already" for r in per_image),
        no_objects=sum(r["reason"] in ("no_objects", "no_matched_anchor") for r in per_image),
        mean_iterations=float(np.mean([r["iterations"] for r in succ])) if succ else None,
        threshold=float(threshold), max_iter=int(max_iter), overshoot=float(overshoot),
        per_image=per_image,
    )
