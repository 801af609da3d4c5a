"""python -m studies.roi_sampling end to end on a tiny setting (CPU, offline).

Two RoI batch sizes x two losses, 3 iterations of ResNet-18-FPN on 64px images of the embedded
synthetic dataset, evaluated on its first 6 validation images (registered by a training script
given as ``--train-net``). The report's numbers are checked against an independent evaluation
of each run's final model with the project's evaluator, then an interrupted run is resumed and
finished runs are skipped.
"""
import json
import math
import os
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from ap_loss_d2.engine import SafeDetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from ap_loss_d2.data import CLASSES  # noqa: E402
from ap_loss_d2.engine import Trainer, get_ap_loss_cfg  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "FasterRCNN" / "faster_rcnn_R_18_FPN_600it_synth_ce.yaml"
TINY_VAL = "synth_shapes_val_first6"
SIZES = (32, 64)
LOSSES = ("ce", "ap")
ITERS = 3
# fmt: off
OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "MODEL.FPN.OUT_CHANNELS", "16",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # detections from an almost untrained model
    "DATASETS.TEST", f"('{TINY_VAL}',)",
]
# fmt: on
METRICS = ("AP", "AP50", "AP75")


def _load_tool():
    from studies import roi_sampling

    return roi_sampling


def _register_tiny_val():
    """The first 6 images of synth_shapes_val, in this process (the independent evaluation)."""
    if TINY_VAL not in DatasetCatalog.list():
        DatasetCatalog.register(TINY_VAL, lambda: DatasetCatalog.get("synth_shapes_val")[:6])
        MetadataCatalog.get(TINY_VAL).set(thing_classes=list(CLASSES), evaluator_type="coco")


@pytest.fixture(scope="module")
def train_net(tmp_path_factory):
    """A training script that registers the tiny val set, then runs the repository's train_net.py."""
    path = tmp_path_factory.mktemp("train_net") / "train_net_tiny_val.py"
    path.write_text(
        "import runpy, sys\n"
        "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
        "from ap_loss_d2.data import CLASSES, register_datasets\n"
        "register_datasets()\n"
        f"DatasetCatalog.register({TINY_VAL!r}, lambda: DatasetCatalog.get('synth_shapes_val')[:6])\n"
        f"MetadataCatalog.get({TINY_VAL!r}).set(thing_classes=list(CLASSES), evaluator_type='coco')\n"
        f"sys.argv[0] = {str(REPO / 'train_net.py')!r}\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return path


def _argv(output_dir, train_net, iters=ITERS):
    # fmt: off
    return [
        "--train-net", str(train_net),
        "--sizes", *map(str, SIZES),
        "--losses", *LOSSES,
        "--config-file", str(CONFIG),
        "--iters", str(iters),
        "--output-dir", str(output_dir),
        *OPTS,
    ]
    # fmt: on


@pytest.fixture(scope="module")
def one_thread():
    """One thread here and in the training subprocesses: the tests run on small shared CPUs."""
    import torch

    n, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(n)
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def tool():
    return _load_tool()


@pytest.fixture(scope="module")
def study(tool, tmp_path_factory, one_thread, train_net):
    _register_tiny_val()
    out = tmp_path_factory.mktemp("roi_study")
    records = tool.main(_argv(out, train_net))
    return out, records


def _evaluate_independently(run_dir, loss, out_dir):
    """Evaluate a run's final model with the project's Trainer/evaluator, from the config file,
    the test's overrides and the run's loss (not from the tool's code)."""
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list(OPTS + ["MODEL.CLS_LOSS.NAME", loss])
    cfg.OUTPUT_DIR = str(out_dir)
    cfg.freeze()
    model = Trainer.build_model(cfg)
    SafeDetectionCheckpointer(model).load(str(Path(run_dir) / "model_final.pth"))
    return Trainer.test(cfg, model)


def _same(reported, evaluated):
    if evaluated is None or (isinstance(evaluated, float) and math.isnan(evaluated)):
        return reported is None
    return reported == evaluated


@pytest.mark.slow  # trains the study's runs in processes
def test_report_files(study, capsys):
    out, records = study
    assert [(r["loss"], r["batch_size_per_image"]) for r in records] == [
        (loss, size) for size in SIZES for loss in LOSSES
    ]
    report = json.loads((out / "roi_sampling_study.json").read_text())
    assert report["sizes"] == list(SIZES) and report["losses"] == list(LOSSES)
    assert report["iters"] == ITERS and report["positive_fraction"] == 1.0
    assert report["test_datasets"] == [TINY_VAL]
    assert len(report["runs"]) == len(SIZES) * len(LOSSES)
    table = (out / "roi_sampling_study.md").read_text()
    for r in report["runs"]:
        run_dir = Path(r["run_dir"])
        assert run_dir.parent == out and (run_dir / "model_final.pth").exists()
        # the study's settings reached the training run
        train_cfg = (run_dir / "config.yaml").read_text()
        assert f"BATCH_SIZE_PER_IMAGE: {r['batch_size_per_image']}" in train_cfg
        assert "POSITIVE_FRACTION: 1.0" in train_cfg and f"NAME: {r['loss']}" in train_cfg
        assert f"MAX_ITER: {ITERS}" in train_cfg
        # RoIs per image actually sampled (all positives + negatives up to the batch size)
        assert 0 < r["mean_sampled_rois_per_image"] <= r["batch_size_per_image"]
        prefix = f"| {r['batch_size_per_image']} |"
        row = next(line for line in table.splitlines() if line.startswith(prefix))
        for m in METRICS:
            assert (f"{r[m]:.2f}" if r[m] is not None else "-") in row
    png = (out / "roi_sampling_study.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


@pytest.mark.slow
def test_reported_numbers_equal_the_evaluator(study, tmp_path, one_thread):
    out, _ = study
    report = json.loads((out / "roi_sampling_study.json").read_text())
    for r in report["runs"]:
        run_dir = Path(r["run_dir"])
        evaluated = _evaluate_independently(run_dir, r["loss"], tmp_path / run_dir.name)
        bbox = evaluated["bbox"]
        for m in METRICS:
            assert _same(r[m], bbox[m]), (r["loss"], r["batch_size_per_image"], m, r[m], bbox[m])
        assert set(r["bbox"]) == set(bbox)
        for k, v in bbox.items():
            assert _same(r["bbox"][k], v), k


@pytest.mark.slow
def test_rerun_skips_finished_and_resumes_interrupted(study, tool, train_net, capsys, one_thread):
    out, records = study
    finished = out / "ce_rois32"
    interrupted = out / "ap_rois64"
    # simulate an interruption of ap_rois64 after its checkpoint of iteration 2 (index 1)
    assert (interrupted / "model_0000001.pth").exists()
    (interrupted / "model_final.pth").unlink()
    (interrupted / "sweep_run.json").unlink()
    (interrupted / "last_checkpoint").write_text("model_0000001.pth")
    mtime = (finished / "model_final.pth").stat().st_mtime_ns
    capsys.readouterr()

    again = tool.main(_argv(out, train_net))

    printed = capsys.readouterr().err
    assert "[1/4] ce rois=32\n[roi_sampling_study] ce_rois32: finished earlier (ok)" in printed
    assert "[4/4] ap rois=64\n[roi_sampling_study] ap_rois64: resuming from model_0000001.pth" in printed
    assert (finished / "model_final.pth").stat().st_mtime_ns == mtime  # not retrained
    log = (interrupted / "log.txt").read_text()
    assert "Starting training from iteration 2" in log
    assert (interrupted / "model_final.pth").exists()
    assert [r["loss"] for r in again] == [r["loss"] for r in records]
    report = json.loads((out / "roi_sampling_study.json").read_text())
    assert len(report["runs"]) == 4


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused(study, tool, train_net):
    out, _ = study
    with pytest.raises(SystemExit, match="other settings"):
        tool.main(_argv(out, train_net, iters=ITERS + 1))


def test_invalid_arguments(tool, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tool.main(["--losses", "focal", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        tool.main(["--output-dir", str(tmp_path), "SOLVER.MAX_ITER"])
    assert "KEY VALUE pairs" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
