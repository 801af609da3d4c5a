"""``python -m ap_loss_d2.benchmark``: the loss table (``--quick``, tiny sizes, CPU), the
``--device cuda`` message without a GPU, and the training-iteration breakdown (``--breakdown``,
tiny, CPU; CUDA-marked twins)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LOSSES = ("focal", "ce_ohem", "ap_loss", "ap_loss_float32_targets", "ap_loss_int64_targets",
          "auc_loss", "ap_positive_loop")


def _bench(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "ap_loss_d2.benchmark", *args], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=timeout)


def _check_report(out, device):
    report = json.loads((out / "benchmark.json").read_text())
    assert (out / "benchmark.png").stat().st_size > 0
    assert (out / "benchmark.txt").read_text().startswith("device")
    cfg = report["config"]
    assert len(report["results"]) == len(cfg["images"]) * len(cfg["positives"]) * len(
        cfg["anchors"])
    for row in report["results"]:
        assert row["device"] == device
        assert set(row["losses"]) == set(LOSSES), row["losses"].keys()
        focal = row["losses"]["focal"]["time_s"]
        assert focal > 0
        for name in LOSSES:
            e = row["losses"][name]
            for key in ("time_s", "ratio_to_focal"):
                assert isinstance(e[key], (int, float)) and math.isfinite(e[key]), (name, key, e)
            assert e["time_s"] > 0
            assert math.isclose(e["ratio_to_focal"], e["time_s"] / focal, rel_tol=1e-9)
            assert len(e["times_s"]) == cfg["repeats"]
            mm = report["memory_method"].get(device)
            if mm and not mm.startswith("unavailable"):
                assert isinstance(e["extra_peak_mb"], (int, float)) and e["extra_peak_mb"] >= 0
                assert isinstance(e["extra_peak_x_logits"], (int, float))
        # host synchronisations per call: the ranking module's documented count
        from ap_loss_d2.losses.ranking import HOST_SYNCS

        for name in ("ap_loss", "ap_loss_float32_targets", "ap_loss_int64_targets"):
            assert row["losses"][name]["host_syncs"] == HOST_SYNCS["ap"], (name, row)
        assert row["losses"]["auc_loss"]["host_syncs"] == HOST_SYNCS["auc"]
        assert row["losses"]["focal"]["host_syncs"] >= 1  # x[valid] runs a nonzero
        loop = row["losses"]["ap_positive_loop"]
        if row["positives"] > cfg["loop_positives"]:
            assert loop["extrapolated"] and loop["timed_positives"] == cfg["loop_positives"]
            assert loop["note"] == (f"(extrapolated from {cfg['loop_positives']} of "
                                    f"{row['positives']} positives)")
            assert math.isclose(loop["time_s"], loop["fixed_s"] + loop["per_positive_s"]
                                * row["positives"], rel_tol=1e-9)
    return report


@pytest.mark.slow
def test_benchmark_quick(tmp_path):
    out = tmp_path / "bench"
    r = _bench("--quick", "--device", "cpu", "--output-dir", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "extrapolated from" in r.stdout  # the positive loop row says it is extrapolated
    assert "syncs" in r.stdout and "AP-loss, float32 targets" in r.stdout
    _check_report(out, "cpu")


def test_default_anchors_named():
    from ap_loss_d2.benchmark import ANCHOR_NAMES, parse_args

    args = parse_args([])
    assert args.anchors == [32736, 49104]  # the paper's 6 per location first (issue 14 item 5)
    assert "paper" in ANCHOR_NAMES[32736] and "issue 15" in ANCHOR_NAMES[49104]
    assert 32736 == 6 * sum((512 // 2**k) ** 2 for k in range(3, 8))  # 6 per location, P3-P7
    assert 49104 == 9 * sum((512 // 2**k) ** 2 for k in range(3, 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
@pytest.mark.slow  # two subprocesses
def test_device_cuda_without_gpu_is_a_clean_error(tmp_path):
    for extra in ((), ("--breakdown",)):
        r = _bench("--quick", "--device", "cuda", "--output-dir", str(tmp_path), *extra)
        assert r.returncode == 2
        assert "CUDA is not available" in r.stderr and "Traceback" not in r.stderr


def _check_breakdown(out, device):
    report = json.loads((out / "breakdown.json").read_text())
    assert (out / "breakdown.png").stat().st_size > 0
    assert "of the iteration" in (out / "breakdown.txt").read_text()
    med = report["median_s"]
    parts = ("net_forward", "loss_forward", "other_forward", "bwd_to_loss", "loss_backward",
             "net_backward")
    assert all(med[k] >= 0 for k in parts) and med["loss_forward"] > 0
    assert math.isclose(sum(med[k] for k in parts), med["iteration"], rel_tol=0.05)
    assert 0 < report["loss_share"] < 1
    assert report["config"]["device"] == device and report["config"]["loss"] == "ap"
    assert report["config"]["config_file"].endswith("retinanet_R_50_FPN_160e_voc0712_ap.yaml")
    return report


@pytest.mark.slow
def test_breakdown_cpu_tiny(tmp_path):
    pytest.importorskip("detectron2")
    r = _bench("--breakdown", "--device", "cpu", "--images", "1", "--size", "128", "--iters",
               "1", "--warmup", "0", "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rep = _check_breakdown(tmp_path, "cpu")
    # the paper config's 6 anchors per location over P3-P7, 20 VOC classes, at 128x128
    assert rep["config"]["images"] == 1
    assert rep["ranked_entries"] == 6 * sum((128 // 2**k) ** 2 for k in range(3, 8)) * 20


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_benchmark_cuda_quick(tmp_path):
    r = _bench("--quick", "--device", "cuda", "--output-dir", str(tmp_path), "--no-memory")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    _check_report(tmp_path, "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_breakdown_cuda_tiny(tmp_path):
    pytest.importorskip("detectron2")
    r = _bench("--breakdown", "--device", "cuda", "--images", "2", "--size", "256", "--iters",
               "2", "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    _check_breakdown(tmp_path, "cuda")
