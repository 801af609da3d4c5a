"""Smoke test of ``python -m ap_loss_d2.benchmark --quick`` (tiny sizes, CPU)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOSSES = ("focal", "ce_ohem", "ap_loss", "auc_loss", "ap_positive_loop")


def test_benchmark_quick(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "ap_loss_d2.benchmark", "--quick", "--device", "cpu",
                        "--out", str(out)], cwd=str(REPO), env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "extrapolated from" in r.stdout  # the positive loop row says it is extrapolated
    report = json.loads((out / "benchmark.json").read_text())
    assert (out / "benchmark.png").stat().st_size > 0
    cfg = report["config"]
    assert len(report["results"]) == len(cfg["images"]) * len(cfg["positives"])
    for row in report["results"]:
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
            if report["memory_method"]["cpu"] and not report["memory_method"]["cpu"].startswith(
                    "unavailable"):
                assert isinstance(e["extra_peak_mb"], (int, float)) and e["extra_peak_mb"] >= 0
                assert isinstance(e["extra_peak_x_logits"], (int, float))
        loop = row["losses"]["ap_positive_loop"]
        if row["positives"] > cfg["loop_positives"]:
            assert loop["extrapolated"] and loop["timed_positives"] == cfg["loop_positives"]
            assert loop["note"] == (f"(extrapolated from {cfg['loop_positives']} of "
                                    f"{row['positives']} positives)")
            assert math.isclose(loop["time_s"], loop["fixed_s"] + loop["per_positive_s"]
                                * row["positives"], rel_tol=1e-9)
