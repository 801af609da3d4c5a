"""Mixed precision: every loss trains under autocast; the ranking-loss gradients in half
precision equal the float32 ones on the same logits. Detectron2's AMPTrainer needs CUDA."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from ap_loss_d2.losses.registry import cls_loss_names  # noqa: E402
from ap_loss_d2.engine import Trainer, get_ap_loss_cfg  # noqa: E402
from ap_loss_d2.losses import ap_loss, auc_loss  # noqa: E402
from ap_loss_d2.losses.cls_losses import APLoss, AUCLoss  # noqa: E402

from .params import slow_except  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "tests" / "configs" / "tiny_synth_retinanet.yaml"


def _cfg(loss, *opts):
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(TINY_YAML))
    cfg.merge_from_list(["MODEL.CLS_LOSS.NAME", loss, *opts])
    return cfg


def _batch(device="cpu"):
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(2):
        inst = Instances((64, 64))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 28.0], [34.0, 30.0, 60.0, 62.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        batch.append({"image": torch.rand(3, 64, 64, generator=g) * 255, "instances": inst.to(device)})
    return batch


@pytest.mark.parametrize("loss", slow_except(cls_loss_names("retinanet"), {"ap", "focal", "ce_ohem"}))
def test_every_loss_trains_under_cpu_autocast(loss):
    torch.manual_seed(0)
    model = build_model(_cfg(loss))
    model.train()
    with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(_batch())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("loss,fn", [("ap", ap_loss), ("auc", auc_loss)])
def test_ranking_gradient_under_autocast_equals_float32(loss, fn, monkeypatch):
    seen = []

    def recording(logits, targets, **kwargs):
        logits.retain_grad()
        seen.append((logits, targets, kwargs))
        return fn(logits, targets, **kwargs)

    monkeypatch.setattr(APLoss if loss == "ap" else AUCLoss, "kernel", staticmethod(recording))
    torch.manual_seed(0)
    model = build_model(_cfg(loss))
    model.train()
    with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(_batch())["loss_cls"].backward()
    (logits, targets, kwargs), = seen
    assert logits.dtype == torch.bfloat16
    kwargs.pop("stats", None)
    ref = logits.detach().float().requires_grad_()
    fn(ref, targets, **kwargs).backward()
    torch.testing.assert_close(logits.grad.float(), ref.grad.to(torch.bfloat16).float(), rtol=1e-2, atol=0)
    assert torch.equal(logits.grad != 0, ref.grad != 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Detectron2's AMPTrainer needs CUDA")
@pytest.mark.parametrize("loss", cls_loss_names("retinanet"))
def test_amp_trainer_cuda(loss, synth_dataset_dir, tmp_path):
    cfg = _cfg(loss, "MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "3",
               "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path))
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.train()
    assert (tmp_path / "model_final.pth").exists()
