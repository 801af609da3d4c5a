"""configs/quick/retinanet_R_18_FPN_1000it_synth_ap.py, the CPU LazyConfig of the README, is the
twin of the yaml quick config: the same model (same modules, and with the same weights the same
losses and detections), solver and data, checked against what Detectron2 builds from the yaml;
and ``python train_net.py`` trains it on CPU."""
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.data import DatasetMapper  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.solver import build_lr_scheduler, build_optimizer  # noqa: E402

from ap_loss_d2.engine import get_ap_loss_cfg  # noqa: E402

from . import test_retinanet as retina  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAZY = REPO / "configs/quick/retinanet_R_18_FPN_1000it_synth_ap.py"
YAML = REPO / "configs/quick/retinanet_R_18_FPN_1000it_synth_ap.yaml"


@pytest.fixture(scope="module")
def configs():
    yaml = get_ap_loss_cfg()
    yaml.merge_from_file(str(YAML))
    return LazyConfig.load(str(LAZY)), yaml


@pytest.fixture(scope="module")
def models(configs):
    lazy, yaml = configs
    torch.manual_seed(0)
    a, b = instantiate(lazy.model), build_model(yaml)
    a.load_state_dict(b.state_dict())  # strict: every tensor has its twin
    return a, b


def _plain(obj):
    """The plain-valued attributes of ``obj`` (sequences as lists: LazyConfig hands lists over as
    ListConfig, yacs as tuples)."""
    out = {k: v for k, v in vars(obj).items() if isinstance(v, (bool, int, float, str))}
    out.update({k: list(v) for k, v in vars(obj).items() if isinstance(v, Sequence) and not isinstance(v, str)})
    return out


def test_same_model(models):
    a, b = models
    assert str(a) == str(b) and _plain(a) == _plain(b)
    assert [x.tolist() for x in a.anchor_generator.cell_anchors] == [x.tolist() for x in b.anchor_generator.cell_anchors]
    assert a.anchor_generator.offset == b.anchor_generator.offset
    assert a.box2box_transform.weights == b.box2box_transform.weights
    assert (a.anchor_matcher.thresholds, a.anchor_matcher.labels) == (b.anchor_matcher.thresholds, b.anchor_matcher.labels)
    assert torch.equal(a.pixel_mean, b.pixel_mean) and torch.equal(a.pixel_std, b.pixel_std)
    la, lb = (retina.train_step(m, retina.make_batch(num_objects=(3,)))[0] for m in (a, b))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    for m in (a, b):
        m.eval()
        m.test_score_thresh = 0.0  # detections from the untrained model
    image = torch.randint(0, 256, (3, 64, 64), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        da, db = (m([{"image": image, "height": 64, "width": 64}])[0]["instances"] for m in (a, b))
    assert len(da) > 0 and torch.equal(da.pred_boxes.tensor, db.pred_boxes.tensor) and torch.equal(da.scores, db.scores)


def test_same_solver(configs, models):
    lazy, yaml = configs
    a, b = models
    lazy.optimizer.params.model = a
    opt_a, opt_b = instantiate(lazy.optimizer), build_optimizer(yaml, b)
    groups = [[(g["lr"], g["momentum"], g["weight_decay"], g["nesterov"], len(g["params"])) for g in o.param_groups] for o in (opt_a, opt_b)]
    assert groups[0] == groups[1]
    assert lazy.train.max_iter == yaml.SOLVER.MAX_ITER and lazy.train.checkpointer.period == yaml.SOLVER.CHECKPOINT_PERIOD
    multiplier = instantiate(lazy.lr_multiplier)
    scheduler = build_lr_scheduler(yaml, opt_b)
    for it in range(yaml.SOLVER.MAX_ITER):
        expected = opt_b.param_groups[0]["lr"]
        assert lazy.optimizer.lr * multiplier(it / lazy.train.max_iter) == pytest.approx(expected, rel=1e-9, abs=1e-15), it
        scheduler.step()


def test_same_data(configs):
    lazy, yaml = configs
    train, test = lazy.dataloader.train, lazy.dataloader.test
    assert (train.dataset.names, test.dataset.names) == (yaml.DATASETS.TRAIN[0], yaml.DATASETS.TEST[0])
    assert (train.total_batch_size, train.num_workers) == (yaml.SOLVER.IMS_PER_BATCH, yaml.DATALOADER.NUM_WORKERS)
    for node, is_train in ((train.mapper, True), (test.mapper, False)):
        a, b = instantiate(node), DatasetMapper(yaml, is_train)
        augs = [[(type(x).__name__, _plain(x)) for x in m.augmentations.augs] for m in (a, b)]
        assert augs[0] == augs[1] and len(augs[0]) == (2 if is_train else 1)
        assert (a.is_train, a.image_format, a.use_instance_mask) == (b.is_train, b.image_format, b.use_instance_mask)
    assert lazy.train.device == yaml.MODEL.DEVICE == "cpu" and lazy.train.init_checkpoint == yaml.MODEL.WEIGHTS == ""


@pytest.mark.slow  # starts train_net.py
def test_trains_on_cpu_through_train_net(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "train_net.py", "--config-file", str(LAZY.relative_to(REPO)), "train.max_iter=2",
           f"train.output_dir={out}", "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
           "dataloader.test.num_workers=0"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model_final.pth").is_file() and '"iteration": 1' in (out / "metrics.json").read_text()
    assert "copypaste: AP,AP50" in r.stdout + r.stderr  # evaluated on synth_shapes_val after training
