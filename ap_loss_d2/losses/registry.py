"""The registry of classification losses: the one list of the names ``MODEL.CLS_LOSS.NAME`` (and
the models' ``cls_loss`` argument) may take. Needs only PyTorch (``"focal"`` also needs fvcore,
a Detectron2 dependency, when it is called).

Every loss has one signature::

    fn(logits, gt_labels, num_classes, *, stats, **options) -> 0-dim tensor

* ``logits``: ``(N, R, K)`` scores of N images x R anchors/RoIs x K classes, or ``(sum_i R_i, K)``
  with the option ``entries_per_image=[R_1, ..., R_N]`` (the RoIs of a two-stage detector);
* ``gt_labels``: ``(N, R)`` / ``(sum_i R_i,)`` int labels: -1 ignored, ``0..K-1`` foreground
  class, ``K`` background;
* ``stats``: a dict the loss may fill with diagnostics (ints/floats); the models write them to
  the event storage as ``cls_loss/<key>``;
* ``options``: only the names the entry declares (:attr:`ClsLoss.options`), passed by keyword.

Adding a loss is one function and one registration::

    @register_cls_loss("my_loss", heads=("retinanet",), options=("delta",))
    def my_loss(logits, gt_labels, num_classes, *, stats, delta):
        ...

The models (``APLossRetinaNet``: head ``"retinanet"``; ``APLossROIHeads``: head
``"roi_heads"``) look the name up once when built and call :func:`compute_cls_loss` with every
option they know; config validation and the README's table of names read this registry too.
"""
import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch

from .alternatives import ap_loss_approx_gradient, ap_loss_structured_hinge
from .distributed import group_size, ranking_set_group, ranking_set_layout, resolve_group, scale_gradient
from .neg_selection import select_negatives
from .ohem import ce_ohem_loss, ce_ohem_scores
from .ranking import ap_loss, auc_loss

__all__ = [
    "CLS_LOSSES",
    "HEADS",
    "ClsLoss",
    "cls_loss_names",
    "compute_cls_loss",
    "get_cls_loss",
    "ranking_loss",
    "ranking_targets",
    "register_cls_loss",
    "registry_table",
]

#: The heads that read a classification loss from the registry.
HEADS = ("retinanet", "roi_heads")
#: Options the ranking-set machinery reads (validated against the batch at start-up).
RANKING_SET_OPTIONS = ("rank_across_processes", "images_per_ranking_set")


@dataclasses.dataclass(frozen=True)
class ClsLoss:
    """One registered loss.

    Attributes:
        name: the value of ``MODEL.CLS_LOSS.NAME`` / ``cls_loss``.
        fn: the loss (signature in the module docstring).
        heads: the heads that may use it (subset of :data:`HEADS`).
        options: the keyword options ``fn`` takes besides ``stats``; the model passes them from
            its own arguments (``delta``, ``step``...) or from what it computes
            (``entries_per_image``, ``normalizer``, ``focal_loss_alpha``...; ``loss_state``: a
            dict the RetinaNet model keeps between iterations, e.g. GHM-C's EMA).
        scores: inference scores from the logits of one image, ``(R, K) -> (R, K)``; None means
            the head's own (per-class sigmoids; Detectron2's softmax for a ``native`` loss).
        native: the head's own Detectron2 loss (``"ce"`` of ``FastRCNNOutputLayers``): the
            head keeps Detectron2's classifier (K + 1 logits), loss and inference, so that
            Detectron2 main's options of that classifier keep working.
        stock: the stock Detectron2 models whose own loss this is (``RetinaNet`` trains
            ``"focal"``): ``MODEL.CLS_LOSS.NAME`` may name it with those models.
        doc: one line for the README and error messages.
    """

    name: str
    fn: Callable
    heads: Tuple[str, ...]
    options: Tuple[str, ...] = ()
    scores: Optional[Callable] = None
    native: bool = False
    stock: Tuple[str, ...] = ()
    doc: str = ""

    @property
    def ranks(self) -> bool:
        """Whether the ranking-set options (``images_per_ranking_set``...) apply."""
        return set(RANKING_SET_OPTIONS) <= set(self.options)


#: name -> :class:`ClsLoss`, in registration order.
CLS_LOSSES: Dict[str, ClsLoss] = {}


def register_cls_loss(name, *, heads, options=(), scores=None, native=False, stock=(), doc=""):
    """Decorator registering ``fn`` as the classification loss ``name`` (ValueError if taken)."""
    unknown = set(heads) - set(HEADS)
    if not heads or unknown:
        raise ValueError(f"loss {name!r}: heads must be a non-empty subset of {HEADS}, got {heads!r}")

    def register(fn):
        if name in CLS_LOSSES:
            raise ValueError(f"a classification loss named {name!r} is already registered")
        CLS_LOSSES[name] = ClsLoss(name, fn, tuple(heads), tuple(options), scores, native, tuple(stock), doc)
        return fn

    return register


def cls_loss_names(head: Optional[str] = None) -> Tuple[str, ...]:
    """The registered names (usable by ``head`` when given), in registration order."""
    return tuple(n for n, e in CLS_LOSSES.items() if head is None or head in e.heads)


def get_cls_loss(name, head: Optional[str] = None, key: str = "cls_loss") -> ClsLoss:
    """The entry of ``name``; ValueError naming ``key`` and the valid names if ``name`` is not
    registered (for ``head``)."""
    entry = CLS_LOSSES.get(name) if isinstance(name, str) else None
    if entry is None or (head is not None and head not in entry.heads):
        where = f" for the {head} head" if head else ""
        raise ValueError(f"{key}={name!r} is not a classification loss{where}; valid names: {', '.join(cls_loss_names(head))}")
    return entry


def compute_cls_loss(entry: ClsLoss, logits, gt_labels, num_classes, options: dict, stats: dict):
    """Call ``entry.fn`` with the options it declares, taken from ``options`` (a KeyError names
    an option the caller does not provide)."""
    missing = [k for k in entry.options if k not in options]
    if missing:
        raise KeyError(f"classification loss {entry.name!r} needs option(s) {missing} the model does not provide")
    return entry.fn(logits, gt_labels, num_classes, stats=stats, **{k: options[k] for k in entry.options})


def ranking_targets(gt_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Replicate each anchor/RoI per class and label it for ranking (paper Fig. 3).

    Args:
        gt_labels: (..., R) int labels, -1 ignored, 0..K-1 foreground class, K background.
        num_classes: K.

    Returns:
        (..., R, K) int8 tensor: 1 for the matched class, 0 for the other classes and for
        background, -1 for every class of an ignored entry.
    """
    fg = (gt_labels >= 0) & (gt_labels < num_classes)
    targets = torch.zeros((*gt_labels.shape, num_classes), dtype=torch.int8, device=gt_labels.device)
    targets[gt_labels < 0] = -1
    targets[fg, gt_labels[fg]] = 1
    return targets


def _world_size():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def ranking_loss(
    name,
    logits,
    gt_labels,
    num_classes,
    *,
    rank_across_processes=False,
    images_per_ranking_set=0,
    entries_per_image=None,
    stats=None,
    neg_selection="all",
    neg_pos_ratio=3.0,
    **options,
):
    """AP-loss (``name="ap"``) or AUC-loss (``"auc"``) of per-class scores, ranked per ranking
    set: the entries (anchors/RoIs x classes) of the images of one set are ranked together.

    Ranking sets:

    * ``images_per_ranking_set=0`` and ``rank_across_processes=False``: one set = the images
      of this process (the default).
    * ``rank_across_processes=True``: one set = the images of all processes (the whole global
      batch).
    * ``images_per_ranking_set=S``: sets of ``S`` images. If a process holds ``n`` images and
      ``S`` divides ``n``, its images are split into ``n / S`` consecutive sets ranked
      separately; if ``n`` divides ``S``, each ``S / n`` consecutive ranks rank their images
      together, exactly (see :mod:`ap_loss_d2.losses.distributed`). Anything else is a
      ValueError.

    The loss is the mean over the sets of this process (1 set unless split) of each set's loss.
    When ``G > 1`` processes rank a set together, each backpropagates its slice of the set's
    gradient and DistributedDataParallel then averages over all ``W`` processes; the gradient
    (not the value) of the loss is therefore scaled by ``G``, so that the parameter update is
    the mean over all ranking sets of the whole batch of the single-process gradient of each
    set.

    Args:
        logits: (N, R, K) scores of N images, or (sum_i R_i, K) with ``entries_per_image``.
        gt_labels: (N, R) or (sum_i R_i,) labels as for :func:`ranking_targets`.
        num_classes: K.
        rank_across_processes: one ranking set = every process's images.
        images_per_ranking_set: images ranked together (0: this process's images).
        entries_per_image: [R_1, ..., R_N] when the images' entries are concatenated along
            dim 0; None when dim 0 indexes the images.
        stats: optional dict, filled with ``num_pos`` and ``num_neg_nontrivial`` (of this
            process's ranking set(s)).
        neg_selection: ``"all"`` (every negative), ``"ohem"`` / ``"random"`` (per image, keep
            ``ceil(neg_pos_ratio x positives)`` hardest / random negatives, ignore the others;
            paper Table 8), see :func:`ap_loss_d2.losses.neg_selection.select_negatives`.
        neg_pos_ratio: negatives kept per positive by ``"ohem"`` / ``"random"``.
        options: ``delta``, ``step``, ``sigmoid_k`` (and ``interpolate`` for AP), see
            :func:`ap_loss_d2.losses.ap_loss`.

    Returns:
        The scalar loss.
    """
    fn = {"ap": ap_loss, "auc": auc_loss}[name]
    targets = ranking_targets(gt_labels, num_classes)
    targets = select_negatives(targets, logits, neg_selection, neg_pos_ratio, entries_per_image)
    if rank_across_processes and images_per_ranking_set:
        raise ValueError(
            "rank_across_processes=True (one ranking set = the whole global batch) and "
            f"images_per_ranking_set={images_per_ranking_set} both set the ranking set; use one"
        )
    sizes = [1] * logits.shape[0] if entries_per_image is None else [int(r) for r in entries_per_image]
    if rank_across_processes:
        group = resolve_group(True)
        sets = 1
    elif images_per_ranking_set:
        try:
            sets, processes = ranking_set_layout(images_per_ranking_set, len(sizes), _world_size())
        except ValueError as e:
            raise ValueError(f"images_per_ranking_set={images_per_ranking_set}: {e}") from e
        group = ranking_set_group(processes)
    else:
        group, sets = None, 1

    if sets == 1:
        parts = [(logits, targets)]
    else:
        per_set = len(sizes) // sets
        rows = [sum(sizes[k * per_set : (k + 1) * per_set]) for k in range(sets)]
        parts = list(zip(logits.split(rows, dim=0), targets.split(rows, dim=0)))
    losses, num_pos, num_neg = [], 0, 0
    for x, t in parts:
        part = {}
        losses.append(fn(x, t, stats=part, process_group=group, **options))
        num_pos += part["num_pos"]
        num_neg += part["num_neg_nontrivial"]
    loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
    if stats is not None:
        stats.update(num_pos=num_pos, num_neg_nontrivial=num_neg)
    return scale_gradient(loss, group_size(group))


# ------------------------------------------------------------------------------------------------
# The registered losses. Both heads look names up here; nowhere else lists them.
# ------------------------------------------------------------------------------------------------
_STEP_OPTIONS = ("delta", "step", "sigmoid_k")
_SETS = ("entries_per_image",) + RANKING_SET_OPTIONS


@register_cls_loss(
    "ap",
    heads=("retinanet", "roi_heads"),
    options=_STEP_OPTIONS + ("interpolate",) + _SETS,
    doc="AP-loss (the paper; error-driven update, Algorithm 1)",
)
def _ap(logits, gt_labels, num_classes, *, stats, **options):
    return ranking_loss("ap", logits, gt_labels, num_classes, stats=stats, **options)


@register_cls_loss(
    "auc",
    heads=("retinanet", "roi_heads"),
    options=_STEP_OPTIONS + _SETS,
    doc="AUC-loss (Eq. 7, same error-driven update)",
)
def _auc(logits, gt_labels, num_classes, *, stats, **options):
    return ranking_loss("auc", logits, gt_labels, num_classes, stats=stats, **options)


def _register_negative_selection(name, selection, doc):
    """Table 8: AP-loss over the positives and, per image, ``ohem_neg_pos_ratio`` negatives per
    positive chosen by ``selection`` ("ohem": the hardest, "random"); other negatives ignored."""

    def loss(logits, gt_labels, num_classes, *, stats, ohem_neg_pos_ratio, **options):
        return ranking_loss(
            "ap", logits, gt_labels, num_classes, stats=stats, neg_selection=selection,
            neg_pos_ratio=ohem_neg_pos_ratio, **options
        )

    register_cls_loss(
        name,
        heads=("retinanet",),
        options=_STEP_OPTIONS + ("interpolate", "ohem_neg_pos_ratio") + _SETS,
        doc=doc,
    )(loss)


_register_negative_selection(
    "ap_ohem", "ohem",
    "OHEM + AP-loss (Table 8): per image the hardest negatives, ohem_neg_pos_ratio per positive, others ignored",
)
_register_negative_selection(
    "ap_random", "random",
    "Random sampling + AP-loss (Table 8): per image random negatives, ohem_neg_pos_ratio per positive, others ignored",
)


@register_cls_loss(
    "focal",
    heads=("retinanet",),
    options=("focal_loss_alpha", "focal_loss_gamma", "normalizer"),
    stock=("RetinaNet",),
    doc="RetinaNet's sigmoid focal loss, identical to stock RetinaNet",
)
def focal_loss(logits, gt_labels, num_classes, *, stats, focal_loss_alpha, focal_loss_gamma, normalizer):
    """Stock RetinaNet's classification loss: fvcore's sigmoid focal loss summed over the
    non-ignored anchors and the K classes (background: all-zero target), divided by
    ``normalizer`` (the EMA of the positive-anchor count)."""
    from fvcore.nn import sigmoid_focal_loss_jit

    valid = gt_labels >= 0
    target = torch.nn.functional.one_hot(gt_labels[valid], num_classes=num_classes + 1)[:, :-1]
    loss = sigmoid_focal_loss_jit(
        logits[valid], target.to(logits.dtype), alpha=focal_loss_alpha, gamma=focal_loss_gamma, reduction="sum"
    )
    return loss / normalizer


@register_cls_loss(
    "ce_ohem",
    heads=("retinanet",),
    options=("ohem_neg_pos_ratio",),
    scores=ce_ohem_scores,
    doc="softmax CE (background logit 0) with 3:1 online hard negative mining; softmax scores at test",
)
def _ce_ohem(logits, gt_labels, num_classes, *, stats, ohem_neg_pos_ratio):
    return ce_ohem_loss(logits, gt_labels, neg_pos_ratio=ohem_neg_pos_ratio)


@register_cls_loss(
    "ap_approx",
    heads=("retinanet",),
    options=("approx_sigmoid_k",),
    doc="AP-loss by the approximate gradient, -log(smoothed AP) (Fig. 8)",
)
def _ap_approx(logits, gt_labels, num_classes, *, stats, approx_sigmoid_k):
    return ap_loss_approx_gradient(logits, ranking_targets(gt_labels, num_classes), sigmoid_k=approx_sigmoid_k)


@register_cls_loss(
    "ap_hinge",
    heads=("retinanet",),
    doc="AP-loss by the structured hinge-loss upper bound, SVM-AP (Fig. 8)",
)
def _ap_hinge(logits, gt_labels, num_classes, *, stats):
    return ap_loss_structured_hinge(logits, ranking_targets(gt_labels, num_classes))


@register_cls_loss(
    "ce",
    heads=("roi_heads",),
    native=True,
    stock=("StandardROIHeads",),
    doc="softmax CE over K + 1 classes, Detectron2's own Fast R-CNN head (stock Faster R-CNN)",
)
def softmax_ce_loss(logits, gt_labels, num_classes, *, stats):
    """Softmax cross entropy over ``K + 1`` logits (background last), mean over the non-ignored
    entries; 0 (attached to the graph) without any. A ``native`` head computes it with
    Detectron2's own ``FastRCNNOutputLayers.losses``."""
    valid = gt_labels >= 0
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits[valid], gt_labels[valid])


def registry_table() -> str:
    """The registered losses as a markdown table (the README's; ``python -m
    ap_loss_d2.losses`` prints it)."""
    rows = ["| name | heads | options | loss |", "|---|---|---|---|"]
    for e in CLS_LOSSES.values():
        options = ", ".join(f"`{o}`" for o in e.options) or "—"
        rows.append(f"| `{e.name}` | {', '.join(e.heads)} | {options} | {e.doc} |")
    return "\n".join(rows)
