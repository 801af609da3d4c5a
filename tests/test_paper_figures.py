"""Fig. 6 (training_curves) and Fig. 5 / 12 (visualize) on two tiny runs of 4 iterations with a
checkpoint every 2 (embedded synthetic set, CPU): the numbers they write equal Detectron2's own
evaluation / predictor on the same checkpoints."""
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("detectron2")
pytestmark = pytest.mark.slow  # trains two tiny runs


from studies.common import cls_loss_label  # noqa: E402

from .test_train_net import FAST_EVAL, TINY_YAML, run_train_net  # noqa: E402


@pytest.fixture(scope="module")
def two_runs(synth_dataset_dir, tmp_path_factory):
    runs = []
    for loss in ("ap", "focal"):
        out = tmp_path_factory.mktemp(f"run_{loss}")
        run_train_net(
            "--config-file", TINY_YAML, "OUTPUT_DIR", str(out), "DATASETS.TEST", "()",
            "MODEL.CLS_LOSS.NAME", loss, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
        )
        runs.append(out)
    return runs


@pytest.fixture(autouse=True)
def _few_threads(one_thread):
    """Every test of this module runs torch on one thread (tests/conftest.py)."""


def _independent_ap(run_dir, weights, dataset, tmp_path):
    """AP of a checkpoint by Detectron2 alone: build_model, DetectionCheckpointer,
    inference_on_dataset with a COCOEvaluator."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset
    from detectron2.modeling import build_model

    from ap_loss_d2.engine import get_ap_loss_cfg

    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(run_dir / "config.yaml"))
    cfg.merge_from_list(FAST_EVAL)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    model.eval()
    evaluator = COCOEvaluator(dataset, output_dir=str(tmp_path), tasks=("bbox",), max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
    return inference_on_dataset(model, build_detection_test_loader(cfg, dataset), evaluator)["bbox"]


def test_training_curves(two_runs, tmp_path, monkeypatch):
    from studies import training_curves as tc

    a, b = two_runs
    # Detectron2 saves model_0000003.pth and model_final.pth after the last iteration: one point
    assert sorted(p.name for p in a.glob("model_*.pth")) == ["model_0000001.pth", "model_0000003.pth", "model_final.pth"]
    assert tc.list_checkpoints(a) == [(2, str(a / "model_0000001.pth")), (4, str(a / "model_final.pth"))]
    out = tmp_path / "fig6"
    argv = ["--run", f"{a}:AP", "--run", str(b), "--output-dir", str(out), "--dataset", "synth_shapes_val",
            "--max-images", "3", *FAST_EVAL]
    report = tc.main(argv)
    data = json.loads((out / "training_curves.json").read_text())
    assert data["complete"] and [r["label"] for r in data["runs"]] == ["AP", cls_loss_label("focal")]
    assert [[q["iteration"] for q in r["points"]] for r in data["runs"]] == [[2, 4], [2, 4]]
    assert (out / "training_curves.png").stat().st_size > 0 and "| AP | 1 | 4 |" in (out / "training_curves.md").read_text()
    subset = data["runs"][0]["points"][0]["dataset"]
    assert subset == "synth_shapes_val__first3"
    for run_dir, run in zip(two_runs, data["runs"]):
        point = run["points"][1]
        expected = _independent_ap(run_dir, point["checkpoint"], subset, tmp_path / run["label"].replace(" ", "_"))
        for m in ("AP", "AP50", "AP75"):
            assert point[m] == pytest.approx(expected[m], abs=1e-6)

    # a second call re-reads the finished evaluations; a changed checkpoint is evaluated again
    calls = []

    def fake(cfg, weights):
        calls.append(weights)
        return {"AP": 1.0, "AP50": 2.0, "AP75": 3.0}

    monkeypatch.setattr(tc, "evaluate_checkpoint", fake)
    again = tc.main(argv)
    assert calls == [] and again["runs"] == report["runs"]
    os.utime(a / "model_0000001.pth", ns=(1, 1))
    tc.main(argv)
    assert calls == [str(a / "model_0000001.pth")]
    # another evaluation setting (here the test score threshold) evaluates every checkpoint again
    tc.main(argv[:-len(FAST_EVAL)] + ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.5"] + FAST_EVAL[2:])
    assert len(calls) == 5


@pytest.mark.parametrize("dataset", ["synth_shapes_val", "synth_shapes_voc_val"])
def test_visualize(two_runs, tmp_path, dataset):
    pytest.importorskip("cv2", reason="Detectron2's Visualizer needs OpenCV (opencv-python-headless)")
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor

    from ap_loss_d2.engine import get_ap_loss_cfg
    from studies import visualize

    a, b = two_runs
    out = tmp_path / "fig5"
    report = visualize.main(["--run", f"{a}:AP", "--run", f"{b}:Focal", "--dataset", dataset, "--num-images", "2",
                             "--score-thresh", "0.005", "--output-dir", str(out), *FAST_EVAL])
    assert sorted(p.name for p in out.glob("*.png")) == ["image_0.png", "image_1.png", "visualize.png"]
    from PIL import Image

    row, grid = Image.open(out / "image_0.png"), Image.open(out / "visualize.png")
    assert row.size[0] > row.size[1] and grid.size[1] > row.size[1]  # 2 columns; 2 rows in the grid
    data = json.loads((out / "visualize.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["AP", "Focal"] and len(data["images"]) == 2
    assert sum(len(r["detections"][lab]) for r in data["images"] for lab in ("AP", "Focal")) > 0
    # the drawn detections are DefaultPredictor's above the threshold
    for run_dir, label in ((a, "AP"), (b, "Focal")):
        cfg = get_ap_loss_cfg()
        cfg.merge_from_file(str(run_dir / "config.yaml"))
        cfg.merge_from_list(FAST_EVAL)
        cfg.MODEL.WEIGHTS = str(run_dir / "model_final.pth")
        predictor = DefaultPredictor(cfg)
        for d, rec in zip(DatasetCatalog.get(dataset)[:2], data["images"]):
            inst = predictor(read_image(d["file_name"], format="BGR"))["instances"].to("cpu")
            inst = inst[inst.scores >= 0.005]
            got = rec["detections"][label]
            assert len(got) == len(inst)
            assert [x["score"] for x in got] == pytest.approx(inst.scores.tolist(), abs=1e-4)
            boxes = [v for x in got for v in x["box"]]
            assert boxes == pytest.approx(inst.pred_boxes.tensor.flatten().tolist(), abs=0.01)
    assert report["dataset"] == dataset
    with pytest.raises(KeyError, match="--dataset 'nope' is not registered"):
        visualize.main(["--run", str(a), "--dataset", "nope", "--output-dir", str(out)])


def test_visualize_without_opencv_names_the_fix(monkeypatch, tmp_path):
    import sys

    from studies import visualize

    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match="pip install opencv-python-headless"):
        visualize.main(["--run", str(tmp_path), "--output-dir", str(tmp_path)])
