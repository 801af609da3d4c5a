"""Bad loss registrations and loss arguments (issue 28 items 4, 9, 16, 18): each is refused when
the class is registered or the loss is built, with a message naming the class or argument and
the fix. Rows ``(id, call, pattern)`` as in tests/test_bad_inputs.py."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, instantiate  # noqa: E402

from tests.bad_input import message  # noqa: E402
from ap_loss_d2.losses.registry import CLS_LOSS_REGISTRY, ClsLoss, cls_loss_names, registry_table  # noqa: E402

LAZY = str(Path(__file__).resolve().parents[1] / "tests/configs/tiny_synth_retinanet_lazy.py")


def _loss(self, logits, gt_labels, stats, normalizer, entries_per_image):
    return logits.sum() * 0.0


def register(class_name, then=None, **attrs):
    """A call that registers a new class ``class_name`` (a ClsLoss unless ``attrs["base"]``
    says otherwise) and returns what the registry then holds (``then()`` when given); the class
    is unregistered afterwards, whatever happened."""
    base = attrs.pop("base", ClsLoss)
    cls = type(class_name, (base,), {"loss": _loss, **attrs})

    def call(tmp):
        try:
            CLS_LOSS_REGISTRY.register()(cls)
            return then() if then else f"registered; names: {', '.join(cls_loss_names())}"
        finally:
            CLS_LOSS_REGISTRY._obj_map.pop(class_name, None)  # fvcore's Registry has no public unregister

    return call


def no_loss_method(tmp):
    class NoLossMethod(ClsLoss):
        name = "no_loss_method"

    try:
        CLS_LOSS_REGISTRY.register(NoLossMethod)
        return str(NoLossMethod()(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long)))
    finally:
        CLS_LOSS_REGISTRY._obj_map.pop("NoLossMethod", None)


def lazy_model(*overrides):
    return lambda tmp: instantiate(LazyConfig.apply_overrides(LazyConfig.load(LAZY), list(overrides)).model)


ROWS = [
    ("register-second-ap", register("SecondAP", name="ap"), r"ValueError: SecondAP\.name='ap' is already the name of ap_loss_d2\.losses\.cls_losses\.APLoss; give SecondAP a name of its own"),
    ("register-without-name", register("Nameless"), r"ValueError: Nameless has no name: set the class attribute name = '\.\.\.', its MODEL\.CLS_LOSS\.NAME"),
    ("register-unknown-head", register("RetinaTypo", name="retina_typo", heads=("retina",)), r"ValueError: RetinaTypo\.heads=\('retina',\) must be a non-empty tuple of valid heads: retinanet, roi_heads, ssd"),
    ("register-plain-module", register("PlainModule", base=nn.Module, name="plain"), r"TypeError: PlainModule cannot be registered in CLS_LOSS_REGISTRY: a classification loss must subclass ap_loss_d2\.losses\.registry\.ClsLoss"),
    ("register-without-loss-method", no_loss_method, r"TypeError: NoLossMethod does not define loss\(self, logits, gt_labels, stats, normalizer, entries_per_image\)"),
    ("registry-table-without-docstring", register("Undocumented", then=registry_table, name="undocumented"), r"\| `undocumented` \| `Undocumented` \| retinanet, roi_heads, ssd \|  \|$"),
    ("lazy-unknown-loss-argument", lazy_model("model.cls_loss.deltaa=1"), r"TypeError: APLoss \('ap'\) got unknown argument\(s\) 'deltaa' \(did you mean 'delta'\?\); valid arguments: delta, diagnostics, .*images_per_ranking_set, interpolate, .*sigmoid_k, step, weight"),
]




@pytest.mark.parametrize("case,call,pattern", [pytest.param(*r, id=r[0]) for r in ROWS])
def test_bad_input(case, call, pattern, tmp_path):
    names = cls_loss_names()
    text = message(call, tmp_path)
    assert re.search(pattern, text, re.S), f"{case}: {text}"
    assert cls_loss_names() == names  # the built-in losses are left as they were
