"""The base class of the classification losses (:class:`ClsLoss`), built from
``MODEL.CLS_LOSS`` by :func:`~ap_loss_d2.losses.registry.build_cls_loss`."""
import difflib
import inspect
import math
import time
from typing import List, Optional, Tuple

import torch
from torch import nn

from detectron2.config import configurable

__all__ = ["HEADS", "ClsLoss", "check_number", "loss_arguments", "loss_clock"]

#: The heads that take a classification loss module.
HEADS = ("retinanet", "roi_heads", "ssd")


def check_number(name: str, value, *, allow_zero: bool = False, upper: Optional[float] = None) -> float:
    """``float(value)``; ValueError naming ``name`` unless it is a finite number > 0 (>= 0 with
    ``allow_zero``; < ``upper`` when given)."""
    bound = (">= 0" if allow_zero else "> 0") + (f" and < {upper}" if upper is not None else "")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero) or (upper is not None and value >= upper):
        raise ValueError(f"{name}={value!r} must be a finite number {bound}")
    return float(value)


def loss_clock(device: torch.device) -> float:
    """Host clock for ``cls_loss/time``; on CUDA it waits for the device first."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def loss_arguments(cls) -> List[str]:
    """The keyword arguments of the loss class ``cls``: those of every ``__init__`` from ``cls``
    up to :class:`ClsLoss`, sorted."""
    names = set()
    for klass in cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, ClsLoss) and "__init__" in vars(klass):
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self":
                    names.add(p.name)
    return sorted(names)


class ClsLoss(nn.Module):
    """Base class of the classification losses.

    Attributes (class level): ``name`` (``MODEL.CLS_LOSS.NAME``), ``label`` (plots, tables),
    ``heads`` (subset of :data:`HEADS`), ``native`` (the head keeps its own Detectron2 loss and
    classifier, e.g. Faster R-CNN's softmax CE). Subclasses define :meth:`loss`.
    """

    name = ""
    label = ""
    heads: Tuple[str, ...] = HEADS
    native = False

    @configurable
    def __init__(self, *, weight: float = 1.0, diagnostics: bool = False, **unknown):
        """``weight``: factor of the loss; ``diagnostics``: also log ``cls_loss/time`` and counts
        that are device tensors (a host synchronisation each on CUDA). ``unknown``: arguments no
        ``__init__`` of the class took (e.g. a misspelled LazyConfig ``model.cls_loss.<arg>``),
        a TypeError listing the valid ones."""
        if unknown:
            valid = loss_arguments(type(self))
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if m else repr(k)
                     for k in unknown for m in [difflib.get_close_matches(k, valid, n=1)]]
            raise TypeError(
                f"{type(self).__name__} ({self.name!r}) got unknown argument(s) {', '.join(hints)}; "
                f"valid arguments: {', '.join(valid)}"
            )
        super().__init__()
        self.weight = check_number("weight", weight, allow_zero=True)
        self.diagnostics = bool(diagnostics)

    @classmethod
    def from_config(cls, cfg):
        return {"weight": cfg.MODEL.CLS_LOSS.WEIGHT, "diagnostics": cfg.MODEL.CLS_LOSS.DIAGNOSTICS}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}"

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Inference probabilities ``(..., K)`` from logits ``(..., K)``: per-class sigmoids."""
        return logits.sigmoid()

    def loss(self, logits, gt_labels, stats: dict, normalizer, entries_per_image) -> torch.Tensor:
        """The unweighted loss; arguments as :meth:`forward`, ``stats`` a dict to fill with
        scalars logged as ``cls_loss/<key>``. Every registered loss defines it."""
        raise NotImplementedError(f"{type(self).__name__} does not define loss()")

    def forward(self, logits, gt_labels, *, normalizer=None, entries_per_image=None, storage=None):
        """The loss of ``(N, R, K)`` logits and ``(N, R)`` int labels (-1 ignored, 0..K-1 class, K
        background), or ``(sum_i R_i, K)`` / ``(sum_i R_i,)`` with ``entries_per_image``, times
        ``weight``; 0 for empty input. ``normalizer``: the head's positive-anchor normaliser
        (``"focal"``); ``storage``: Detectron2 ``EventStorage`` for ``cls_loss/*`` (None: no logging).
        """
        if logits.numel() == 0:
            return logits.sum() * 0.0
        timed = self.diagnostics and storage is not None
        start = loss_clock(logits.device) if timed else 0.0
        stats = {}
        loss = self.loss(logits, gt_labels, stats, normalizer, entries_per_image)
        if storage is not None:
            if timed:
                storage.put_scalar("cls_loss/time", loss_clock(logits.device) - start)
            for k, v in stats.items():
                if self.diagnostics or not torch.is_tensor(v) or v.device.type == "cpu":
                    storage.put_scalar(f"cls_loss/{k}", float(v))
        return loss * self.weight
