"""The parameter update under DistributedDataParallel equals the single-process update.

Semantics (docs/multi_gpu.md): the training loss is the mean over ranking sets of each set's
AP-loss, so after DDP's average over the processes the parameter gradient must equal the mean,
over the ranking sets, of the gradient of one process ranking that set's images.

Real models (APLossRetinaNet, Faster R-CNN with APLossROIHeads) built from the repository's
small configs, wrapped by Detectron2's ``create_ddp_model`` as the trainers do, on CPU with
Gloo; each process holds one image. Only the classification loss moves the parameters here:
the box losses get weight 0 (RetinaNet's box loss is normalised per process, and the RPN's
anchor sampling is random), BN is frozen (batch statistics depend on the per-process batch)
and the RoI sampler keeps every proposal (so that it does not draw random subsets).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("detectron2")

from detectron2.engine import create_ddp_model  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import ap_loss_d2.modeling  # noqa: E402,F401  (registers the models)
from ap_loss_d2.engine import get_ap_loss_cfg  # noqa: E402
from ap_loss_d2.losses.cls_losses import APLoss  # noqa: E402

from .gloo import run_gloo  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

SIZE = 64
COMMON = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", "FrozenBN"]
if "IMAGES_PER_RANKING_SET" in get_ap_loss_cfg().MODEL.CLS_LOSS:  # absent before (see __main__)
    COMMON += ["MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "0"]
ARCHS = {
    "retinanet": (
        "tests/configs/tiny_synth_retinanet.yaml",
        ["MODEL.AP_LOSS_RETINANET.BOX_REG_WEIGHT", "0.0"],
        ("head.cls_score.weight", "head.cls_score.bias", "backbone.bottom_up.stem.conv1.weight",
         "backbone.fpn_output4.weight"),
    ),
    "faster_rcnn": (
        "configs/FasterRCNN/faster_rcnn_R_18_FPN_600it_synth_ap.yaml",
        [
            "MODEL.RPN.LOSS_WEIGHT", "0.0",
            "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", "0.0",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "100000",
            "MODEL.ROI_HEADS.POSITIVE_FRACTION", "1.0",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
            "MODEL.FPN.OUT_CHANNELS", "16",
            "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
        ],
        ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
         "roi_heads.box_head.fc1.weight", "backbone.bottom_up.stem.conv1.weight"),
    ),
}


def _images(indices):
    """Fixed random images with 3 boxes each (image i is the same in every process)."""
    batch = []
    for i in indices:
        g = torch.Generator().manual_seed(100 + i)
        image = torch.rand(3, SIZE, SIZE, generator=g) * 255
        xy = torch.rand(3, 2, generator=g) * (SIZE - 30)
        wh = 8 + torch.rand(3, 2, generator=g) * 20
        instances = Instances((SIZE, SIZE))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.randint(0, 3, (3,), generator=g)
        batch.append({"image": image, "instances": instances, "height": SIZE, "width": SIZE})
    return batch


def _gradients(arch, image_indices, opts=(), ddp=False):
    """(named parameter gradients, loss_cls) of one forward/backward on the given images."""
    path, arch_opts, names = ARCHS[arch]
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list([*COMMON, *arch_opts, *opts])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    if ddp:  # as train_net.py's LazyConfig flow on CPU: no device_ids for CPU modules
        model = create_ddp_model(model, broadcast_buffers=False, device_ids=None)
    with EventStorage(0):
        losses = model(_images(image_indices))
        sum(losses.values()).backward()
    params = dict((model.module if ddp else model).named_parameters())
    return {n: params[n].grad.detach().clone() for n in names}, losses["loss_cls"].item()


def _ddp_gradients(rank, arch, opts):
    return _gradients(arch, [rank], opts, ddp=True)


def run_ddp(arch, world, opts):
    """Per rank: (gradients after DDP, loss_cls); rank r holds image r."""
    return run_gloo(_ddp_gradients, world, arch, list(opts))


def reference(arch, sets):
    """Mean over ranking sets of the single-process gradient of ranking each set's images."""
    runs = [_gradients(arch, images) for images in sets]
    grads = {n: torch.stack([g[n] for g, _ in runs]).mean(0) for n in runs[0][0]}
    return grads, [loss for _, loss in runs]


def relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_same_update(ddp_grads, ref_grads):
    for name, ref in ref_grads.items():
        assert ref.norm() > 0, f"{name}: no gradient in the reference, the test would be vacuous"
        rel = relative_difference(ddp_grads[name], ref)
        assert rel < 1e-4, f"{name}: DDP / single-process relative difference {rel:.2e}"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow  # launches processes
@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_two_processes_rank_across_equal_one_process(arch):
    """2 processes x 1 image ranked across processes == 1 process ranking both images."""
    out = run_ddp(arch, 2, ["MODEL.CLS_LOSS.RANK_ACROSS_PROCESSES", "True"])
    ref, ref_losses = reference(arch, [[0, 1]])
    for grads, loss in out:
        assert_same_update(grads, ref)
        assert loss == pytest.approx(ref_losses[0], rel=1e-5)  # the logged loss is the set's loss
    ratio = (out[0][0][ARCHS[arch][2][0]].norm() / ref[ARCHS[arch][2][0]].norm()).item()
    print(f"{arch}: |DDP grad| / |single-process grad| of {ARCHS[arch][2][0]} = {ratio:.4f}")


@pytest.mark.slow  # launches processes
def test_four_processes_in_two_ranking_sets_equal_two_single_process_runs():
    """4 processes x 1 image with a ranking set of 2 images: groups {0, 1} and {2, 3}; the
    update is the mean of the single-process updates of ranking images {0, 1} and {2, 3}."""
    out = run_ddp("retinanet", 4, ["MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "2"])
    ref, ref_losses = reference("retinanet", [[0, 1], [2, 3]])
    for rank, (grads, loss) in enumerate(out):
        assert_same_update(grads, ref)
        assert loss == pytest.approx(ref_losses[rank // 2], rel=1e-5)
    # the two sets differ: ranking all 4 together would be another update
    whole, _ = reference("retinanet", [[0, 1, 2, 3]])
    name = ARCHS["retinanet"][2][0]
    assert relative_difference(whole[name], ref[name]) > 1e-3


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_sets_within_one_process(arch):
    """1 process x 4 images with a ranking set of 2: the mean of ranking {0, 1} and {2, 3}."""
    grads, loss = _gradients(arch, [0, 1, 2, 3], ["MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "2"])
    ref, ref_losses = reference(arch, [[0, 1], [2, 3]])
    assert_same_update(grads, ref)
    assert loss == pytest.approx(sum(ref_losses) / 2, rel=1e-5)


def test_ranking_loss_rejects_both_settings():
    with pytest.raises(ValueError, match="both choose the ranking set"):
        APLoss(rank_across_processes=True, images_per_ranking_set=2)


def test_ranking_loss_rejects_uneven_set():
    logits = torch.randn(3, 10, 3)
    labels = torch.zeros(3, 10, dtype=torch.int64)
    with EventStorage(0), pytest.raises(ValueError, match="images_per_ranking_set=2.*Valid set sizes here: 0, 1, 3"):
        APLoss(images_per_ranking_set=2)(logits, labels)


REPO = Path(__file__).resolve().parents[1]
FIXED_LAZY = "tests/configs/tiny_synth_retinanet_lazy_fixed.py"  # deterministic input, seed 0, ranking sets of 2


def _train_net(out, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", FIXED_LAZY, *args, f"train.output_dir={out}", "train.max_iter=1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    return state, metrics, proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (Gloo) launch path is taken without CUDA")
def test_train_net_two_cpu_processes_same_update_as_one(synth_dataset_dir, tmp_path):
    """``train_net.py --num-gpus 2`` with a LazyConfig trains on a machine without CUDA (2 Gloo processes x 1 image,
    ranked together), and its first SGD step moves the classification bias exactly as 1 process ranking the same 2
    images does (the bias gets no gradient from the box loss, whose normaliser is per process)."""
    two, metrics2, log = _train_net(tmp_path / "two", "--num-gpus", "2")
    assert "World size: 2" in log and "copypaste: Task: bbox" in log  # and evaluated in both processes
    one, metrics1, _ = _train_net(tmp_path / "one", "--num-gpus", "1")
    b0 = -math.log((1 - 0.01) / 0.01)  # RetinaNet's prior initialisation of the bias
    step2, step1 = two["head.cls_score.bias"] - b0, one["head.cls_score.bias"] - b0
    assert step1.norm() > 1e-6
    assert relative_difference(step2, step1) < 1e-4
    train2, train1 = ([r for r in rows if "loss_cls" in r][-1] for rows in (metrics2, metrics1))
    assert train2["loss_cls"] == pytest.approx(train1["loss_cls"], rel=1e-5)
    assert train2["cls_loss/num_pos"] == train1["cls_loss/num_pos"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (Gloo) launch path is taken without CUDA")
def test_train_net_yaml_on_cpu_processes_is_refused(synth_dataset_dir, tmp_path):
    """Detectron2's DefaultTrainer gives DDP device_ids, which a CPU model rejects: a yaml config on several CPU
    processes stops at start-up with the way out, before anything is written."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "train_net.py", "--num-gpus", "2", "--config-file", "tests/configs/tiny_synth_retinanet.yaml",
         "OUTPUT_DIR", str(tmp_path / "out")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert "MODEL.DEVICE cpu in several processes" in proc.stdout and "LazyConfig" in proc.stdout, proc.stdout[-3000:]


if __name__ == "__main__":
    # python tests/test_ddp.py: |gradient after DDP| / |single-process gradient| of the
    # classification weights, 2 Gloo processes x 1 image with RANK_ACROSS_PROCESSES (1.0 =
    # the single-process update). Runs against older checkouts too (PYTHONPATH=<checkout>),
    # which lack IMAGES_PER_RANKING_SET.
    import ap_loss_d2

    torch.set_num_threads(1)
    for arch in ARCHS:
        name = ARCHS[arch][2][0]
        ddp = run_ddp(arch, 2, ["MODEL.CLS_LOSS.RANK_ACROSS_PROCESSES", "True"])[0][0][name]
        single = reference(arch, [[0, 1]])[0][name]
        print(f"{ap_loss_d2.__file__}: {arch} {name}: |DDP| / |single| = "
              f"{(ddp.norm() / single.norm()).item():.4f}, relative difference "
              f"{relative_difference(ddp, single):.2e}")
