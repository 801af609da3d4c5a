"""Report (Table 2 as one command) from synthetic run folders and study outputs."""
import json
from pathlib import Path

from studies import cost, report
from studies.common import cls_loss_label as L

CONFIG = """MODEL:
  META_ARCHITECTURE: {arch}
  CLS_LOSS:
    NAME: {loss}
DATASETS:
  TEST: ["{test}"]
OUTPUT_DIR: ./output/x
"""
PNG = bytes.fromhex("89504e470d0a1a0a")  # only a signature: the report links, never reads it


def _run(root: Path, name, loss, test, evals, arch="APLossRetinaNet"):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(CONFIG.format(arch=arch, loss=loss, test=test))
    lines = [{"iteration": 9, "time": 0.5, "cls_loss/time": 0.2, "total_loss": 1.0}]
    for it, vals in evals:
        lines.append({"iteration": it, "time": 0.4, "cls_loss/time": 0.1})
        lines.append({"iteration": it, **vals})
    (d / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


def _bbox(ap, ap50, ap75, prefix=""):
    return {f"{prefix}bbox/AP": ap, f"{prefix}bbox/AP50": ap50, f"{prefix}bbox/AP75": ap75,
            f"{prefix}bbox/AP-circle": 1.0}


def _robustness_json(folder: Path):
    folder.mkdir(parents=True)
    (folder / "robustness.png").write_bytes(PNG)
    perts = ["original", "black_patch", "gaussian_noise"]
    data = {
        "study": "robustness", "dataset": "synth_shapes_voc_val", "metric": "AP50",
        "max_images": None, "perturbations": perts,
        "runs": [{"label": "AP-Loss", "AP50": dict(zip(perts, [82.3, 65.2, 68.8])),
                  "AP": dict(zip(perts, [53.1, 40.2, 41.0]))},
                 {"label": "Focal Loss", "AP50": dict(zip(perts, [80.9, 60.9, None])),
                  "AP": dict(zip(perts, [51.3, 38.0, None]))}],
        "figures": ["robustness.png"],
    }
    (folder / "robustness.json").write_text(json.dumps(data))
    (folder / "robustness.md").write_text(
        "## Robustness (Table 3): AP50 on `synth_shapes_voc_val`\n\n"
        "| Training Loss | Original | Black Patch | Gaussian Noise |\n| :--- | ---: | ---: | ---: |\n"
        "| AP-Loss | 82.3 | 65.2 | 68.8 |\n| Focal Loss | 80.9 | 60.9 | - |\n\n"
        "![perturbation examples](robustness.png)\n")


def _score_json(folder: Path):
    folder.mkdir(parents=True)
    (folder / "score_distribution.png").write_bytes(PNG)
    bins = [{"lo": i / 10, "hi": (i + 1) / 10, "mean_score": 0.01 * (i + 1), "count": 3}
            for i in range(10)]
    data = {"study": "score_distribution", "dataset": "synth_shapes_val", "images": 7,
            "high_score": 0.5, "low_iou": 0.4, "figures": ["score_distribution.png"],
            "runs": [{"label": "AP-Loss", "summary": {
                "bins": bins, "high_score_low_iou": {"count": 17, "fraction": 0.00125}}}]}
    (folder / "score_distribution.json").write_text(json.dumps(data))


def test_report_tables_contain_exactly_the_runs_numbers(tmp_path):
    runs = tmp_path / "runs"
    focal = _run(runs, "voc_focal", "focal", "voc_2007_test",
                 [(999, _bbox(40.0, 70.0, 42.0)), (1999, _bbox(51.3, 80.9, 55.3))])
    ap = _run(runs, "voc_ap", "ap", "voc_2007_test", [(1999, _bbox(53.1, 82.3, 58.1))])
    coco = _run(runs, "coco_ap", "ap", "coco_2017_val", [(2999, _bbox(35.0, 57.2, 36.6))])
    ohem = _run(runs, "voc_ohem", "ce_ohem", "voc_2007_test", [])  # no evaluation logged
    two = _run(runs, "two_sets", "auc", "a_val",
               [(5, {**_bbox(10.25, 20.5, 5.75, "a_val/"), **_bbox(1.5, 2.5, 3.5, "b_val/")})])
    _robustness_json(ap / "robustness")
    _score_json(tmp_path / "elsewhere" / "score")
    cost.main(["--run-dir", str(ap), "--output-dir", str(ap / "cost")])

    out = tmp_path / "out" / "report.md"
    text = report.main([str(focal), str(ap), str(coco), str(ohem), str(two), "--studies",
                        str(tmp_path / "elsewhere"), "--output-dir", str(out.parent), "--digits", "2"])
    assert out.read_text() == text

    # Table 2: groups in order of appearance, rows in the paper's order
    header = ("| Training Loss | AP (RetinaNet + voc_2007_test) | AP50 (RetinaNet + voc_2007_test) "
              "| AP75 (RetinaNet + voc_2007_test) | AP (RetinaNet + coco_2017_val) ")
    assert header in text
    assert f"| {L('ce_ohem')} | - | - | - | - | - | - | - | - | - | - | - | - |" in text
    assert f"| {L('focal')} | 51.30 | 80.90 | 55.30 | - | - | - |" in text
    assert f"| {L('auc')} | - | - | - | - | - | - | 10.25 | 20.50 | 5.75 | 1.50 | 2.50 | 3.50 |" in text
    assert f"| {L('ap')} | 53.10 | 82.30 | 58.10 | 35.00 | 57.20 | 36.60 | - | - | - | - | - | - |" in text
    t2 = text.split("## Detection accuracy")[1].split("## Robustness")[0]
    order = [t2.index(f"| {L(name)} |") for name in ("ce_ohem", "focal", "auc", "ap")]
    assert order == sorted(order)
    assert "40.00" not in t2  # the last evaluation of a run is used
    # details: one row per run and dataset
    assert f"| {L('focal')} | RetinaNet | voc_2007_test | 1999 | 51.30 | 80.90 | 55.30 | ok | " \
           "`../runs/voc_focal` |" in text
    assert f"| {L('auc')} | RetinaNet | b_val | 5 | 1.50 | 2.50 | 3.50 | ok |" in text
    assert f"| {L('ce_ohem')} | RetinaNet | voc_2007_test | - | - | - | - | no evaluation |" in text

    # studies found in the run folder and in --studies: each one's own page, its headings one level
    # down, its pictures linked relative to the report
    page = (ap / "robustness" / "robustness.md").read_text()
    assert "### Robustness (Table 3): AP50 on `synth_shapes_voc_val`" in text
    assert page.split("\n\n")[1] in text  # the table as the study wrote it
    assert "![perturbation examples](../runs/voc_ap/robustness/robustness.png)" in text
    assert "Source: [`../runs/voc_ap/robustness/robustness.json`](../runs/voc_ap/robustness/robustness.json)" in text
    assert "`../elsewhere/score/score_distribution.md` is missing: rerun the study" in text
    assert "### Measured during training (Fig. 10)" in text  # cost.main's own page
    assert "![training cost](../runs/voc_ap/cost/cost_training.png)" in text
    assert f"| {L('ap')} | cls_loss/time | 2 | 9-1999 | 0.2000 | 0.1000 | 0.1500 |" in text
    for link in ("../runs/voc_ap/robustness/robustness.png", "../runs/voc_ap/cost/cost_training.png"):
        assert (out.parent / link).is_file()


def test_report_default_digits_and_label_fallback(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"iteration": 3, **_bbox(12.34, 45.67, 8.9)}))
    text = report.main([str(d), "--output-dir", str(tmp_path)])
    assert "| plain | 12.3 | 45.7 | 8.9 |" in text


def test_run_with_no_detections_is_failed(tmp_path):
    """COCOEvaluator logs AP NaN when a model detects nothing: failed, in both tables."""
    d = _run(tmp_path, "empty", "ap", "synth_shapes_val", [(9, _bbox(float("nan"), float("nan"),
                                                                     float("nan")))])
    text = report.main([str(d), "--output-dir", str(tmp_path / "out")])
    assert f"| {L('ap')} | failed | failed | failed |" in text
    assert "failed: no detections (AP, AP50, AP75 NaN or missing)" in text
