"""The registry of classification losses (``MODEL.CLS_LOSS.NAME``).

A loss is one :class:`ClsLoss` subclass, ``@configurable`` with keyword-only arguments that it
validates in its constructor, registered beside its definition::

    @CLS_LOSS_REGISTRY.register()
    class MyLoss(ClsLoss):
        name = "my_loss"            # the value of MODEL.CLS_LOSS.NAME
        label = "My loss"           # plots and tables
        heads = ("retinanet", "ssd")

        @configurable
        def __init__(self, *, margin=1.0, **kwargs):
            super().__init__(**kwargs)
            self.margin = check_number("margin", margin)

        @classmethod
        def from_config(cls, cfg):
            return {**super().from_config(cfg), "margin": 1.0}

        def loss(self, logits, gt_labels, stats, normalizer, entries_per_image):
            ...  # see ClsLoss (ap_loss_d2/losses/base.py)

The heads (``APLossRetinaNet``, ``APLossROIHeads``, ``APLossSSD``) build it with
:func:`build_cls_loss` and call it; LazyConfig configs write ``model.cls_loss = L(MyLoss)()``.
"""
from typing import Optional, Tuple

from torch import nn

from detectron2.utils.registry import Registry

from .base import HEADS, ClsLoss, check_number  # noqa: F401  (re-exported for loss authors)

__all__ = ["CLS_LOSS_REGISTRY", "HEADS", "ClsLoss", "build_cls_loss", "check_number", "cls_loss_names", "cls_loss_label"]

CLS_LOSS_REGISTRY = Registry("CLS_LOSS")
CLS_LOSS_REGISTRY.__doc__ = "Classification losses (ClsLoss subclasses), chosen by MODEL.CLS_LOSS.NAME."


def _classes():
    return {cls.name: cls for _, cls in CLS_LOSS_REGISTRY}


def cls_loss_names(head: Optional[str] = None) -> Tuple[str, ...]:
    """The registered names (usable by ``head`` when given), in registration order."""
    return tuple(n for n, c in _classes().items() if head is None or head in c.heads)


def cls_loss_label(name: str) -> str:
    """The plot/table label of the loss ``name``."""
    return _classes()[name].label


def get_cls_loss_class(name: str, head: str, key: str = "MODEL.CLS_LOSS.NAME"):
    """The class registered as ``name`` for ``head``; ValueError naming ``key`` and the valid names."""
    cls = _classes().get(name)
    if cls is None or head not in cls.heads:
        raise ValueError(
            f"{key}={name!r} is not a classification loss for the {head} head; valid names: "
            f"{', '.join(cls_loss_names(head))}"
        )
    return cls


def build_cls_loss(cfg, head: str) -> ClsLoss:
    """The loss ``MODEL.CLS_LOSS.NAME`` of ``cfg`` ("" = "ap") for ``head``."""
    return get_cls_loss_class(cfg.MODEL.CLS_LOSS.NAME or "ap", head)(cfg)


def check_head(cls_loss: nn.Module, head: str) -> nn.Module:
    """``cls_loss`` if it serves ``head`` (TypeError/ValueError naming the valid ones if not)."""
    if not isinstance(cls_loss, ClsLoss):
        raise TypeError(f"cls_loss must be a ClsLoss module (see ap_loss_d2.losses.registry), got {type(cls_loss).__name__}")
    if head not in cls_loss.heads:
        raise ValueError(
            f"cls_loss {type(cls_loss).__name__} ({cls_loss.name!r}) does not serve the {head} head; valid names: "
            f"{', '.join(cls_loss_names(head))}"
        )
    return cls_loss


def registry_table() -> str:
    """The registered losses as a markdown table (``python -m ap_loss_d2.losses``)."""
    rows = ["| `MODEL.CLS_LOSS.NAME` | class | heads | loss |", "|---|---|---|---|"]
    for name, c in _classes().items():
        doc = (c.__doc__ or "").strip().splitlines()[0]
        rows.append(f"| `{name}` | `{c.__name__}` | {', '.join(c.heads)} | {doc} |")
    return "\n".join(rows)


from . import cls_losses  # noqa: E402,F401  (registers the built-in losses)
