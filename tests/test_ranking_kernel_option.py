"""The kernel choice of the AP-/AUC-loss modules: ``MODEL.CLS_LOSS.KERNEL`` (yaml) and the
``kernel`` argument (LazyConfig) reach ``ap_loss``/``auc_loss``; both kernels train the same."""
import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import LazyCall as L  # noqa: E402
from detectron2.config import instantiate  # noqa: E402

from ap_loss_d2.engine import get_ap_loss_cfg  # noqa: E402
from ap_loss_d2.losses.cls_losses import APLoss, AUCLoss  # noqa: E402
from ap_loss_d2.losses.registry import build_cls_loss  # noqa: E402


def _batch(seed=0, images=2, anchors=300, classes=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(images, anchors, classes, generator=g)
    labels = torch.randint(0, classes + 1, (images, anchors), generator=g)  # K = background
    labels[:, :10] = -1
    return logits, labels


@pytest.mark.parametrize("name", ["ap", "auc"])
def test_yaml_key_reaches_the_kernel(name):
    cfg = get_ap_loss_cfg()
    assert cfg.MODEL.CLS_LOSS.KERNEL == "auto"
    logits, labels = _batch()
    results = {}
    for kernel in ("grid", "sync_free"):
        cfg.merge_from_list(["MODEL.CLS_LOSS.NAME", name, "MODEL.CLS_LOSS.KERNEL", kernel])
        module = build_cls_loss(cfg, "retinanet")
        assert module.options["kernel"] == kernel and f"kernel='{kernel}'" in repr(module)
        x = logits.clone().requires_grad_(True)
        stats = {}
        module.loss(x, labels, stats, None, None).backward()
        results[kernel] = (module.loss(x.detach(), labels, {}, None, None), x.grad, stats)
    (l_grid, g_grid, s_grid), (l_free, g_free, s_free) = results["grid"], results["sync_free"]
    torch.testing.assert_close(l_free, l_grid, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_free, g_grid, rtol=1e-5, atol=1e-9)
    assert s_free == s_grid and s_grid["num_pos"] > 0


def test_lazy_argument():
    for cls in (APLoss, AUCLoss):
        assert instantiate(L(cls)(kernel="sync_free")).options["kernel"] == "sync_free"
        assert instantiate(L(cls)()).options["kernel"] == "auto"
