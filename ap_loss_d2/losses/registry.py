"""The registry of classification losses (``MODEL.CLS_LOSS.NAME``): one :class:`ClsLoss`
subclass per loss, ``@configurable`` with keyword-only arguments validated in its constructor,
registered beside its definition with ``@CLS_LOSS_REGISTRY.register()`` (example:
docs/losses.md, "Adding a loss"). Registration checks the class. The heads build the loss with
:func:`build_cls_loss`; LazyConfig configs write ``model.cls_loss = L(MyLoss)(...)``.
"""
from typing import Optional, Tuple

from torch import nn

from detectron2.utils.registry import Registry

from .base import HEADS, ClsLoss, check_number  # noqa: F401  (re-exported for loss authors)

__all__ = [
    "CLS_LOSS_REGISTRY", "HEADS", "ClsLoss", "ClsLossRegistry", "build_cls_loss", "check_number", "cls_loss_names",
    "cls_loss_label",
]


class ClsLossRegistry(Registry):
    """Detectron2's ``Registry`` that checks each loss class when it is registered."""

    def register(self, obj=None):
        if obj is None:  # used as a decorator
            def deco(cls):
                self.register(cls)
                return cls

            return deco
        self.check_loss_class(obj)
        return super().register(obj)

    def check_loss_class(self, cls):
        """TypeError/ValueError naming ``cls`` and the fix unless it is a :class:`ClsLoss` with a
        ``loss`` method, a non-empty ``name`` no registered class has, and ``heads`` from
        :data:`HEADS`."""
        what = getattr(cls, "__name__", repr(cls))
        if not (isinstance(cls, type) and issubclass(cls, ClsLoss)):
            raise TypeError(
                f"{what} cannot be registered in CLS_LOSS_REGISTRY: a classification loss must subclass "
                "ap_loss_d2.losses.registry.ClsLoss (and define loss())"
            )
        if cls.loss is ClsLoss.loss:
            raise TypeError(
                f"{what} does not define loss(self, logits, gt_labels, stats, normalizer, entries_per_image), "
                "which returns its unweighted loss (see ClsLoss.loss)"
            )
        if not isinstance(cls.name, str) or not cls.name:
            raise ValueError(f"{what} has no name: set the class attribute name = '...', its MODEL.CLS_LOSS.NAME")
        other = self.classes().get(cls.name)
        if other is not None and other is not cls:
            raise ValueError(
                f"{what}.name={cls.name!r} is already the name of {other.__module__}.{other.__qualname__}; "
                f"give {what} a name of its own (registered names: {', '.join(self.classes())})"
            )
        heads = cls.heads
        if isinstance(heads, str) or not heads or any(h not in HEADS for h in heads):
            raise ValueError(f"{what}.heads={heads!r} must be a non-empty tuple of valid heads: {', '.join(HEADS)}")

    def classes(self):
        """``{name: class}`` of the registered losses, in registration order."""
        return {cls.name: cls for _, cls in self}


CLS_LOSS_REGISTRY = ClsLossRegistry("CLS_LOSS")
CLS_LOSS_REGISTRY.__doc__ = "Classification losses (ClsLoss subclasses), chosen by MODEL.CLS_LOSS.NAME."


def cls_loss_names(head: Optional[str] = None) -> Tuple[str, ...]:
    """The registered names (usable by ``head`` when given), in registration order."""
    return tuple(n for n, c in CLS_LOSS_REGISTRY.classes().items() if head is None or head in c.heads)


def cls_loss_label(name: str) -> str:
    """The plot/table label of the loss ``name`` (its name when it has no label)."""
    cls = CLS_LOSS_REGISTRY.classes()[name]
    return cls.label or cls.name


def get_cls_loss_class(name: str, head: str, key: str = "MODEL.CLS_LOSS.NAME"):
    """The class registered as ``name`` for ``head``; ValueError naming ``key`` and the valid names."""
    cls = CLS_LOSS_REGISTRY.classes().get(name)
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
    for name, c in CLS_LOSS_REGISTRY.classes().items():
        doc = next(iter((c.__doc__ or "").strip().splitlines()), "")
        rows.append(f"| `{name}` | `{c.__name__}` | {', '.join(c.heads)} | {doc} |")
    return "\n".join(rows)


from . import cls_losses  # noqa: E402,F401  (registers the built-in losses)
