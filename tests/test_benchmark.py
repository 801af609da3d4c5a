"""``python -m tools.benchmark``: the loss table (``--quick``, tiny sizes, CPU), the
``--device cuda`` message without a GPU, and the training-iteration breakdown (``--breakdown``,
tiny, CPU; CUDA-marked twins)."""
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LOSSES = ("focal", "focal_plain", "ce_ohem", "ap_loss", "ap_loss_float32_targets",
          "ap_loss_int64_targets", "auc_loss", "ap_loss_grid", "ap_loss_sync_free",
          "ap_positive_loop", "ap_loss_reference", "auc_loss_reference")


def _bench(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "tools.benchmark", *args], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=timeout)


def _check_report(out, device):
    report = json.loads((out / "benchmark.json").read_text())
    assert (out / "benchmark.png").stat().st_size > 0
    cfg = report["config"]
    text = (out / "benchmark.txt").read_text()
    assert text.startswith(f"torch {torch.__version__}, {cfg['torch_threads']} thread(s)")
    assert "load average" in text
    assert len(cfg["loadavg_start"]) == 3 and len(cfg["loadavg_end"]) == 3
    assert len(report["results"]) == len(cfg["images"]) * len(cfg["positives"]) * len(
        cfg["anchors"]) * len(cfg["classes"])
    for row in report["results"]:
        assert row["device"] == device
        assert set(row["losses"]) == set(LOSSES), row["losses"].keys()
        for base in ("focal", "focal_plain"):
            base_e = row["losses"][base]
            assert base_e["time_s"] > 0
            for name in LOSSES:
                e = row["losses"][name]
                ratio = e[f"ratio_to_{base}"]
                assert isinstance(ratio, float) and math.isfinite(ratio), (name, base, e)
                assert math.isclose(ratio, e["time_s"] / base_e["time_s"], rel_tol=1e-9)
                rounds = e[f"ratio_to_{base}_rounds"]
                if not e["extrapolated"]:  # per-round ratios of the interleaved rounds
                    per = sorted(a / b for a, b in zip(e["times_s"], base_e["times_s"]))
                    assert rounds["min"] == per[0] and rounds["max"] == per[-1]
        for name in ("ap_loss", "auc_loss"):  # against the --reference-kernel twin, per round
            per = [a / b for a, b in zip(row["losses"][name]["times_s"],
                                         row["losses"][f"{name}_reference"]["times_s"])]
            assert row["losses"][name]["ratio_to_reference_rounds"]["max"] == max(per)
        for name in LOSSES:
            e = row["losses"][name]
            assert len(e["times_s"]) == cfg["repeats"]
            if not e["extrapolated"]:
                assert e["min_s"] == min(e["times_s"]) and e["max_s"] == max(e["times_s"])
                assert e["time_s"] == statistics.median(e["times_s"])
            mm = report["memory_method"].get(device)
            if mm and not mm.startswith("unavailable"):
                assert isinstance(e["extra_peak_mb"], (int, float)) and e["extra_peak_mb"] >= 0
                assert isinstance(e["extra_peak_x_logits"], (int, float))
        # host synchronisations: counted by CUDA's sync debug mode, not measured on the CPU
        if device == "cpu":
            assert all(e["host_syncs"] is None for e in row["losses"].values())
        else:
            for name in ("ap_loss", "ap_loss_float32_targets", "ap_loss_int64_targets",
                         "auc_loss", "ap_loss_sync_free", "focal_plain"):
                assert row["losses"][name]["host_syncs"] == 0, (name, row["losses"][name])
            assert row["losses"]["focal"]["host_syncs"] >= 1  # x[valid] runs a nonzero
            assert row["losses"]["ap_loss_grid"]["host_syncs"] >= 1
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
    r = _bench("--quick", "--device", "cpu", "--output-dir", str(out), "--no-memory",
               "--reference-kernel", str(REPO / "ap_loss_d2" / "losses" / "ranking.py"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "extrapolated from" in r.stdout  # the positive loop row says it is extrapolated
    assert "syncs" in r.stdout and "AP-loss, float32 targets" in r.stdout
    _check_report(out, "cpu")


@pytest.mark.slow
def test_benchmark_cpu_memory(tmp_path):
    """The memory pass (one fresh process per loss and configuration), on one tiny one."""
    r = _bench("--device", "cpu", "--images", "1", "--anchors", "600", "--classes", "4",
               "--positives", "12", "--repeats", "1", "--warmup", "0", "--losses", "ap_loss",
               "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["losses"] == ["focal", "focal_plain", "ap_loss"]
    method = report["memory_method"]["cpu"]
    for e in report["results"][0]["losses"].values():
        if method.startswith("unavailable"):
            assert e["extra_peak_mb"] is None
        else:  # (tiny tensors stay below the page granularity of the resident-set method)
            assert e["extra_peak_x_logits"] >= 0 and e["extra_peak_mb"] >= 0


def test_default_anchors_named():
    from tools.benchmark import ANCHOR_NAMES, parse_args

    args = parse_args([])
    assert args.anchors == [32736, 49104]  # the paper's 6 per location first (issue 14 item 5)
    assert "paper" in ANCHOR_NAMES[32736] and "issue 15" in ANCHOR_NAMES[49104]
    assert 32736 == 6 * sum((512 // 2**k) ** 2 for k in range(3, 8))  # 6 per location, P3-P7
    assert 49104 == 9 * sum((512 // 2**k) ** 2 for k in range(3, 8))


@pytest.mark.parametrize("argv, words", [
    (["--images", "0"], "--images: 0 is too small: give an integer >= 1"),
    (["--images", "2", "-1"], "--images: -1 is too small"),
    (["--anchors", "0"], "--anchors: 0 is too small"),
    (["--classes", "x"], "--classes: 'x' is not an integer"),
    (["--positives", "0"], "--positives: 0 is too small"),
    (["--repeats", "0"], "--repeats: 0 is too small"),
    (["--warmup", "-1"], "--warmup: -1 is too small: give an integer >= 0"),
    (["--breakdown", "--size", "8"], "--size: 8 is too small: give an integer >= 32"),
    (["--threads", "0"], "--threads: 0 is too small"),
])
def test_nonsense_sizes_are_usage_errors(argv, words, capsys):
    from tools.benchmark import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


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
    r = _bench("--quick", "--device", "cuda", "--output-dir", str(tmp_path), "--no-memory",
               "--reference-kernel", str(REPO / "ap_loss_d2" / "losses" / "ranking.py"))
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
