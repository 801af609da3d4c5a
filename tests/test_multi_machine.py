"""Several machines: two launchers on one host (``--num-machines 2 --machine-rank 0/1``, one CPU
process each, Gloo; a LazyConfig, as yaml configs train on CPU in one process) train as one machine
with two processes does."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .gloo import free_port

pytest.importorskip("detectron2")
pytestmark = [
    pytest.mark.slow,  # launches training processes
    pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (Gloo) launch path is taken without CUDA"),
]

REPO = Path(__file__).resolve().parents[1]
# deterministic input, seed 0, frozen BN, 2 SGD steps; both processes rank their images together
CONFIG = "tests/configs/tiny_synth_retinanet_lazy_fixed.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _train_net(out, *launch_args):
    cmd = [sys.executable, "train_net.py", "--config-file", CONFIG, *launch_args, f"train.output_dir={out}", "train.max_iter=2"]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc):
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-6000:]
    return log


def test_two_machines_same_update_as_two_processes_on_one(synth_dataset_dir, tmp_path):
    url = f"tcp://127.0.0.1:{free_port()}"
    machines = [
        _train_net(tmp_path / "machines", "--num-gpus", "1", "--num-machines", "2",
                   "--machine-rank", str(rank), "--dist-url", url)
        for rank in (0, 1)
    ]
    log = [_finish(p) for p in machines][0]
    assert "Rank of current process: 0. World size: 2" in log
    # only rank 0 logs to the terminal; the others to log.txt.rank<N>
    assert "Rank of current process: 1. World size: 2" in (tmp_path / "machines" / "log.txt.rank1").read_text()
    one = _finish(_train_net(tmp_path / "one", "--num-gpus", "2"))
    assert "World size: 2" in one

    start = torch.load(tmp_path / "one" / "model_final.pth", weights_only=True)["model"]
    two = torch.load(tmp_path / "machines" / "model_final.pth", weights_only=True)["model"]
    assert start.keys() == two.keys()
    for name, value in start.items():
        torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-7, msg=name)
    # the runs trained: the classifier moved away from its prior initialisation
    prior = -torch.log(torch.tensor((1 - 0.01) / 0.01))
    assert (start["head.cls_score.bias"] - prior).abs().max() > 1e-5
