"""The CPU-scale SSD study config (``configs/SSD/ssd192_vgg16n_1000it_synth.yaml``, docs/ssd.md):
its class logits start near the 0.01 prior on every level, and the study's commands (training,
the LR sweep, Fig. 6b's checkpoint curves) run at their smallest setting."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import ap_loss_d2.modeling  # noqa: E402,F401  (registers APLossSSD)
from ap_loss_d2.engine import get_ap_loss_cfg  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/SSD/ssd192_vgg16n_1000it_synth.yaml"
LOSSES = ("ap", "focal", "auc", "ce_ohem")
#: The smallest setting of a run: 2 iterations of 2 images ranked together.
SMALLEST = ["SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "2"]


def _cfg(opts=()):
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(REPO / CONFIG))
    cfg.merge_from_list(list(opts))
    return cfg


def _initial_logit_std(cfg, images):
    """Per level, the standard deviation of the freshly built model's class logits on ``images``."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = [{"image": torch.as_tensor(im.transpose(2, 0, 1).copy())} for im in images]
    with torch.no_grad():
        batch = model.preprocess_image(model.resize_inputs(inputs))
        features = model.backbone(batch.tensor)
        logits, _ = model.head([features[f] for f in model.head_in_features])
    return {f: x.std().item() for f, x in zip(model.head_in_features, logits)}


def test_l2norm_scale_keeps_ssd512_per_channel_magnitude_at_the_narrow_width():
    s = _cfg().MODEL.SSD
    assert s.L2NORM_SCALE == pytest.approx(20 * math.sqrt(s.VGG_WIDTH), abs=0.01)


def test_class_logits_start_near_the_prior_on_every_level(synth_dataset_dir, one_thread):
    """Xavier-initialised class convolutions on L2-normalised conv4_3 features: the logit variance
    is fan_in * 2 / (fan_in + fan_out) * scale^2 / channels (inner cells). At SSD512's scale 20
    and 1/8 width the conv4_3 logits would spread about 3 around the prior's -4.6 (many anchors
    start near probability 1); at 20 * sqrt(1/8) they spread about 1."""
    cfg = _cfg(["MODEL.DEVICE", "cpu"])
    images = [read_image(d["file_name"], format=cfg.INPUT.FORMAT) for d in DatasetCatalog.get("synth_shapes_val")[:2]]
    s = cfg.MODEL.SSD
    channels = round(512 * s.VGG_WIDTH)
    per_cell = 2 + 2 * len(s.PRIOR_ASPECT_RATIOS[0])
    fan_in, fan_out = 9 * channels, 9 * per_cell * s.NUM_CLASSES
    predicted = lambda scale: math.sqrt(fan_in * 2 / (fan_in + fan_out) * scale**2 / channels)  # noqa: E731

    std = _initial_logit_std(cfg, images)
    assert set(std) == set(s.IN_FEATURES)
    assert all(v < 1.5 for v in std.values()), std
    # conv4_3 follows the formula (border cells see zero padding: a little below it) ...
    assert 0.7 * predicted(s.L2NORM_SCALE) < std["conv4_3"] <= predicted(s.L2NORM_SCALE)
    # ... and SSD512's scale would start it three times wider.
    cfg.defrost()
    cfg.MODEL.SSD.L2NORM_SCALE = 20.0
    wide = _initial_logit_std(cfg, images)["conv4_3"]
    assert 0.7 * predicted(20.0) < wide <= predicted(20.0) and wide > 2.0


def _run(args, tmp_path, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout


@pytest.mark.slow  # trains and evaluates in subprocesses
def test_study_commands_at_their_smallest_setting(synth_dataset_dir, tmp_path):
    """docs/ssd.md's commands: train_net.py with the config, the LR sweep over the four losses
    (seed 0), Fig. 6b's curves from the runs' checkpoints with --group."""
    out = _run(["train_net.py", "--config-file", CONFIG, *SMALLEST, "OUTPUT_DIR", str(tmp_path / "one")], tmp_path)
    assert "copypaste: Task: bbox" in out and (tmp_path / "one" / "model_final.pth").is_file()

    sweep = tmp_path / "sweep"
    _run(["-m", "studies.lr_sweep", "--config-file", CONFIG, "--output-dir", str(sweep),
          "--losses", *LOSSES, "--lrs", "0.01", "--seeds", "0", *SMALLEST, "SOLVER.CHECKPOINT_PERIOD", "1"],
         tmp_path, timeout=1800)
    report = json.loads((sweep / "lr_sweep.json").read_text())
    runs = report["runs"]
    assert sorted(r["settings"]["loss"] for r in runs) == sorted(LOSSES)
    assert all(r["status"] == "ok" for r in runs), [(r["settings"], r["status"]) for r in runs]
    assert (sweep / "lr_sweep.md").is_file()

    fig = tmp_path / "fig6b"
    _run(["-m", "studies.training_curves", "--group", "--device", "cpu", "--max-images", "4",
          "--output-dir", str(fig), *(f"--run={sweep / f'{loss}_lr0.01_seed0'}:{loss}" for loss in LOSSES)], tmp_path)
    curves = json.loads((fig / "training_curves.json").read_text())
    groups = {g["label"]: [p["iteration"] for p in g["points"]] for g in curves["groups"]}
    assert groups == {loss: [1, 2] for loss in LOSSES}
    assert (fig / "training_curves.png").is_file()
