"""Loss modules as users see them: no diagnostic synchronisation by default, and GHM-C's moving
average as model state (state_dict, --resume, one per process under DDP)."""
import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.engine import create_ddp_model  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import ap_loss_d2.losses.base as base  # noqa: E402

from . import test_ddp as ddp  # noqa: E402
from . import test_faster_rcnn as frcnn  # noqa: E402
from . import test_retinanet as retina  # noqa: E402
from .gloo import run_gloo  # noqa: E402
from .params import slow_except  # noqa: E402


@pytest.fixture(autouse=True)
def _few_threads(one_thread):
    """Every test of this module runs torch on one thread (tests/conftest.py)."""


@pytest.fixture
def clock_calls(monkeypatch):
    calls = []
    real = base.loss_clock

    def counting(device):
        calls.append(device)
        return real(device)

    monkeypatch.setattr(base, "loss_clock", counting)
    return calls


@pytest.mark.parametrize("loss", ["ap", "focal"])
def test_default_retinanet_step_runs_no_timing(loss, clock_calls):
    """The timing path (a device synchronisation on CUDA) runs only with MODEL.CLS_LOSS.DIAGNOSTICS."""
    cfg = retina.tiny_cfg(loss)
    assert cfg.MODEL.CLS_LOSS.DIAGNOSTICS is False
    torch.manual_seed(0)
    _, storage = retina.train_step(build_model(cfg), retina.make_batch())
    assert clock_calls == [] and "cls_loss/time" not in storage.histories()
    cfg.MODEL.CLS_LOSS.DIAGNOSTICS = True
    _, storage = retina.train_step(build_model(cfg), retina.make_batch())
    assert len(clock_calls) == 2 and storage.histories()["cls_loss/time"].latest() > 0


def test_default_faster_rcnn_step_runs_no_timing(clock_calls):
    losses, scalars, _ = frcnn.train_step(frcnn.tiny_model("ap"), frcnn.make_batch())
    assert clock_calls == [] and "cls_loss/time" not in scalars and scalars["cls_loss/num_pos"] > 0


def test_ghm_moving_average_is_model_state():
    torch.manual_seed(0)
    model = build_model(retina.tiny_cfg("ghm"))
    state = model.state_dict()
    assert state["cls_loss.ghm_acc"].shape == (30,) and not state["cls_loss.ghm_started"]
    retina.train_step(model, retina.make_batch())
    trained = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("cls_loss.")}
    assert trained["cls_loss.ghm_started"] and trained["cls_loss.ghm_acc"].sum() > 0
    fresh = build_model(retina.tiny_cfg("ghm"))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.cls_loss.ghm_acc, trained["cls_loss.ghm_acc"]) and fresh.cls_loss.ghm_started
    fresh.eval()
    with torch.no_grad():
        fresh(retina.make_batch())  # inference leaves the average alone
    assert torch.equal(fresh.cls_loss.ghm_acc, trained["cls_loss.ghm_acc"])


@pytest.mark.slow  # trains and resumes with the Trainer
def test_ghm_moving_average_survives_resume(synth_dataset_dir, tmp_path):
    from ap_loss_d2.engine import Trainer

    cfg = retina.tiny_cfg("ghm")
    cfg.merge_from_list(["OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()"])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert saved["cls_loss.ghm_acc"].sum() > 0 and saved["cls_loss.ghm_started"]
    cfg.SOLVER.MAX_ITER = 3
    resumed = Trainer(cfg)
    assert resumed.model.cls_loss.ghm_acc.sum() == 0
    resumed.resume_or_load(resume=True)  # what train_net.py --resume does
    assert torch.equal(resumed.model.cls_loss.ghm_acc, saved["cls_loss.ghm_acc"])
    assert resumed.start_iter == 2


def _ghm_average(image_indices, ddp_wrap=False):
    cfg = retina.tiny_cfg("ghm")
    cfg.merge_from_list(["MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "0"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    if ddp_wrap:  # as Detectron2's Trainer: broadcast_buffers=False
        model = create_ddp_model(model, broadcast_buffers=False, device_ids=None)
    with EventStorage(0):
        sum(model(ddp._images(image_indices)).values()).backward()
    return (model.module if ddp_wrap else model).cls_loss.ghm_acc.clone()


def _ghm_average_under_ddp(rank):
    return _ghm_average([rank], ddp_wrap=True)


@pytest.mark.slow  # launches processes
def test_ghm_moving_average_is_per_process_under_ddp():
    """Each process keeps the average of its own images' gradient norms, as GHM-C's released
    code does on every GPU (docs: a checkpoint holds the main process's)."""
    results = run_gloo(_ghm_average_under_ddp, 2)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank], _ghm_average([rank]), rtol=1e-6, atol=0)
    assert not torch.equal(results[0], results[1])


@pytest.mark.parametrize("name", slow_except(["ap", "auc"], fast=("ap",)))
def test_loss_module_compiles_without_graph_break(name):
    """The whole training-path module (targets, ranking sets split in the process, kernel)
    compiles with fullgraph=True: no data-dependent host read left; same value and gradient."""
    from ap_loss_d2.losses.cls_losses import APLoss, AUCLoss

    torch.manual_seed(0)
    x = torch.randn(2, 50, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 50))
    labels[0, :3] = -1
    loss = {"ap": APLoss, "auc": AUCLoss}[name](images_per_ranking_set=1)
    ref = loss(x, labels)
    (ref_grad,) = torch.autograd.grad(ref, x)
    out = torch.compile(loss, fullgraph=True, backend="aot_eager")(x, labels)
    (grad,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-15)
