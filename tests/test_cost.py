"""Cost study (Fig. 10, 9, 11): tables from a hand-written metrics.json, and the page of a real
``python -m tools.benchmark --quick`` run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from studies import cost
from studies.common import cls_loss_label as L

REPO = Path(__file__).resolve().parents[1]

# Detectron2 JSONWriter style: one object per line; eval results on their own line; a resumed
# run re-logs iteration 39; a truncated last line.
METRICS = [
    {"iteration": 19, "time": 1.25, "data_time": 0.01, "cls_loss/time": 0.5,
     "cls_loss/num_neg_nontrivial": 48000, "cls_loss/num_pos": 310, "total_loss": 2.0},
    {"iteration": 39, "time": 1.0, "cls_loss/time": 0.375, "cls_loss/num_neg_nontrivial": 30000.5,
     "cls_loss/num_pos": 320},
    {"iteration": 39, "time": 0.875, "cls_loss/time": 0.3125,
     "cls_loss/num_neg_nontrivial": 20000, "cls_loss/num_pos": 330},
    {"iteration": 59, "time": 0.75, "cls_loss/time": 0.25, "cls_loss/num_neg_nontrivial": 12000,
     "cls_loss/num_pos": 340},
    {"iteration": 59, "bbox/AP": 12.5, "bbox/AP50": 30.0},
]


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run_ap"
    d.mkdir()
    text = "\n".join(json.dumps(m) for m in METRICS) + '\n{"iteration": 79, "ti'
    (d / "metrics.json").write_text(text)
    (d / "config.yaml").write_text("MODEL:\n  CLS_LOSS:\n    NAME: ap\n")
    return d


def test_training_table_equals_inputs(run_dir, tmp_path):
    out = tmp_path / "cost"
    report = cost.main(["--run-dir", str(run_dir), "--output-dir", str(out)])
    saved = json.loads((out / "cost.json").read_text())
    assert saved["study"] == "cost"
    run = saved["runs"][0]
    assert run["label"] == L("ap") and run["skipped_lines"] == 1
    assert run == json.loads(json.dumps(report["runs"][0]))
    s = run["series"]
    assert s["cls_loss/time"] == {"iterations": [19, 39, 59], "values": [0.5, 0.3125, 0.25]}
    assert s["time"]["values"] == [1.25, 0.875, 0.75]
    assert s["cls_loss/num_neg_nontrivial"]["values"] == [48000, 20000, 12000]
    assert s["cls_loss/num_pos"]["values"] == [310, 330, 340]
    t = run["summary"]["cls_loss/time"]
    assert (t["start"], t["end"], t["min"], t["max"], t["n"]) == (0.5, 0.25, 0.25, 0.5, 3)
    assert t["mean"] == pytest.approx((0.5 + 0.3125 + 0.25) / 3)
    assert run["loss_share_of_iteration"] == pytest.approx(
        ((0.5 + 0.3125 + 0.25) / 3) / ((1.25 + 0.875 + 0.75) / 3))
    md = (out / "cost.md").read_text()
    assert (f"| {L('ap')} | cls_loss/time | 3 | 19-59 | 0.5000 | 0.2500 | 0.3542 | 0.2500 | "
            "0.5000 |") in md
    assert f"| {L('ap')} | time | 3 | 19-59 | 1.2500 | 0.7500 | 0.9583 | 0.7500 | 1.2500 |" in md
    assert (f"| {L('ap')} | cls_loss/num_neg_nontrivial | 3 | 19-59 | 48000 | 12000 | 26666.7 | "
            "12000 | 48000 |") in md
    assert f"| {L('ap')} | cls_loss/num_pos | 3 | 19-59 | 310 | 340 | 326.7 | 310 | 340 |" in md
    assert (out / "cost_training.png").stat().st_size > 0
    assert saved["figures"] == ["cost_training.png"]
    # training measurements are labelled as such, with the 20-iteration window median
    assert "## Measured during training (Fig. 10)" in md and "20-iteration smoothing window" in md
    assert "Synthetic logits" not in md


def test_metrics_label_and_missing_keys(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"iteration": 0, "time": 2.0}) + "\n")
    report = cost.main(["--metrics", f"{f}:focal run", "--output-dir", str(tmp_path / "o")])
    run = report["runs"][0]
    assert run["label"] == "focal run" and list(run["summary"]) == ["time"]
    assert run["loss_share_of_iteration"] is None


@pytest.mark.slow  # launches the benchmark in a process
def test_benchmark_table_and_figure_are_the_benchmarks_own(tmp_path):
    bench_dir = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "tools.benchmark", "--quick", "--device",
                        "cpu", "--output-dir", str(bench_dir)], cwd=str(REPO), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "cost"
    report = cost.main(["--benchmark", str(bench_dir), "--output-dir", str(out)])
    md = (out / "cost.md").read_text()
    assert "```\n" + (bench_dir / "benchmark.txt").read_text().rstrip() + "\n```" in md
    assert (out / "cost_benchmark.png").read_bytes() == (bench_dir / "benchmark.png").read_bytes()
    assert report["benchmark"] == str(bench_dir.resolve()) and "cost_benchmark.png" in report["figures"]
    assert "![loss benchmark](cost_benchmark.png)" in md


def test_both_sources_labelled(run_dir, tmp_path):
    """With a training run and a benchmark, the page says which numbers come from training
    and which from synthetic logits; a folder without the benchmark's files is refused."""
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "benchmark.txt").write_text("device anchors ... (the benchmark's table)\n")
    (bench / "benchmark.png").write_bytes(bytes.fromhex("89504e470d0a1a0a"))
    out = tmp_path / "cost"
    cost.main(["--run-dir", str(run_dir), "--benchmark", str(bench), "--output-dir", str(out)])
    md = (out / "cost.md").read_text()
    assert md.index("## Measured during training") < md.index("## Synthetic logits: memory and time")
    assert "N(0, 1) logits" in md and "(the benchmark's table)" in md
    (bench / "benchmark.txt").unlink()
    with pytest.raises(SystemExit, match="no benchmark.txt; give the --output-dir of python -m tools.benchmark"):
        cost.main(["--benchmark", str(bench), "--output-dir", str(tmp_path / "cost2")])
