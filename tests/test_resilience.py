"""Long runs survive interruptions and bad values: kill -9 then --resume; NaN logits stop the run
with the iteration named and the last good checkpoint intact."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")
pytestmark = pytest.mark.slow

from detectron2.engine import HookBase  # noqa: E402

from ap_loss_d2.engine import SafeDetectionCheckpointer, Trainer, get_ap_loss_cfg  # noqa: E402
from ap_loss_d2.engine.checkpoint import NonFiniteCheckpointError  # noqa: E402
from ap_loss_d2.losses import NonFiniteLogitsError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = "tests/configs/tiny_synth_retinanet.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _iterations(out):
    path = Path(out) / "metrics.json"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the kill
            pass
    return [r["iteration"] for r in rows if "iteration" in r]


def _train_cmd(out, *extra):
    return [
        sys.executable, "train_net.py", "--config-file", TINY_YAML, "OUTPUT_DIR", str(out),
        "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD", "10",
        *extra,
    ]


def test_sigkill_between_checkpoints_then_resume(synth_dataset_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(out), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if (out / "last_checkpoint").exists() and (out / "last_checkpoint").read_text() == "model_0000019.pth":
                break
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint at iteration 19 in time")
        time.sleep(0.3)  # a little past the checkpoint, before the next one
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "model_final.pth").exists(), "killed too late"
    last = (out / "last_checkpoint").read_text()
    assert last in ("model_0000019.pth", "model_0000029.pth")
    resumed_from = int(last[len("model_"):-len(".pth")]) + 1
    SafeDetectionCheckpointer(torch.nn.Module()).load(str(out / last), checkpointables=[])  # intact

    before = _iterations(out)
    cmd = _train_cmd(out)
    subprocess.run(cmd[:2] + ["--resume"] + cmd[2:], cwd=REPO, env=ENV, check=True, stdout=subprocess.DEVNULL)
    assert (out / "model_final.pth").exists()
    logged = _iterations(out)
    assert logged[: len(before)] == before  # metrics.json appended to, as Detectron2 does
    after = logged[len(before):]
    assert after and min(after) >= resumed_from  # continued, did not start over
    assert after[-1] == 39


class _PoisonAt(HookBase):
    """Makes the classification logits NaN from iteration `at` on."""

    def __init__(self, at):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            head = self.trainer.model.head
            with torch.no_grad():
                head.cls_score.bias.fill_(float("nan"))


@pytest.mark.parametrize("loss", ["ap", "focal"])
def test_nan_logits_stop_with_iteration_and_keep_checkpoint(synth_dataset_dir, tmp_path, loss):
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(REPO / TINY_YAML))
    cfg.merge_from_list([
        "OUTPUT_DIR", str(tmp_path), "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "20",
        "SOLVER.CHECKPOINT_PERIOD", "4", "MODEL.CLS_LOSS.NAME", loss,
    ])
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.register_hooks([_PoisonAt(6)])
    # AP-loss checks its logits; Detectron2 stops on a non-finite loss (focal) and names the iteration
    match = r"NaN or Inf" if loss == "ap" else r"Loss became infinite or NaN at iteration=6"
    with pytest.raises((NonFiniteLogitsError, FloatingPointError), match=match):
        trainer.train()
    assert trainer.iter == 6
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (tmp_path / "model_final.pth").exists()
    state = torch.load(tmp_path / "model_0000003.pth", weights_only=True)
    assert state["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_divergence_keeps_finite_checkpoints_and_an_early_one_trains_on(synth_dataset_dir, tmp_path):
    """SOLVER.BASE_LR 5.0 diverges within a few iterations and stops the run. The checkpoints saved before load, a
    NaN one is refused by name, and a new run from the weights of an early one, with a lower learning rate, trains."""
    out = tmp_path / "run"
    proc = subprocess.run(_train_cmd(out, "SOLVER.BASE_LR", "5.0", "SOLVER.CHECKPOINT_PERIOD", "1"),
                          cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode != 0
    assert re.search(r"NaN or Inf|Loss became infinite or NaN at iteration=\d+", proc.stdout), proc.stdout[-3000:]

    def finite(path):
        state = torch.load(path, weights_only=True)["model"]
        return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

    saved = sorted(out.glob("model_*.pth"))
    good = [p for p in saved if finite(p)]
    assert good and good[0] == saved[0]
    for path in saved:
        if path not in good:
            with pytest.raises(NonFiniteCheckpointError, match=path.name):
                SafeDetectionCheckpointer(torch.nn.Module()).load(str(path), checkpointables=[])
    cmd = _train_cmd(tmp_path / "again", "MODEL.WEIGHTS", str(good[0]), "SOLVER.BASE_LR", "0.01", "SOLVER.MAX_ITER", "4")
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "again" / "model_final.pth").exists()
