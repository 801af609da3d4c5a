"""Every bad input ends in a message that names it (file or key) and the fix.

One row per case: ``(id, call, pattern)``. ``call(tmp_path)`` either raises (the message is
``"<ExceptionType>: <message>"``) or returns text (captured warnings for the cases that recover,
e.g. ``--resume`` falling back); ``pattern`` is a regular expression that text must match
(``re.S``). No message may advise turning safety off (``weights_only=False``). A new case is
one line in ROWS (or SLOW_ROWS for the ones that build a trainer).
"""
import argparse
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from PIL import Image  # noqa: E402

from tests.bad_input import captured_warnings, message  # noqa: E402
from ap_loss_d2 import ap_loss  # noqa: E402
from ap_loss_d2.data import SyntheticShapesSpec, load_validated_coco_json, register_synthetic_shapes  # noqa: E402
from ap_loss_d2.engine import SafeDetectionCheckpointer, Trainer, get_ap_loss_cfg, launch  # noqa: E402
from train_net import check_start  # noqa: E402
from train_net import setup as setup_cfg  # noqa: E402
from train_net import setup_lazy as setup_lazy_cfg  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
YAML = str(REPO / "tests/configs/tiny_synth_retinanet.yaml")
LAZY = str(REPO / "tests/configs/tiny_synth_retinanet_lazy.py")
RCNN_AP = str(REPO / "configs/FasterRCNN/faster_rcnn_R_18_FPN_600it_synth_ap.yaml")


# ---------------------------------------------------------------------------------- helpers


def _args(config, *opts, resume=False):
    return argparse.Namespace(
        config_file=config, opts=list(opts), eval_only=False, resume=resume,
        num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto",
    )


def yaml_setup(*opts):
    return lambda tmp: setup_cfg(_args(YAML, "OUTPUT_DIR", str(tmp / "out"), *opts))


def lazy_setup(*opts):
    return lambda tmp: setup_lazy_cfg(_args(LAZY, f"train.output_dir={tmp / 'out'}", *opts))


def _cfg(tmp, *opts, config=YAML):
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(["OUTPUT_DIR", str(tmp / "out"), "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    return cfg


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def load_file(name, content, suffix=""):
    """Write ``content`` (bytes, or a callable writing the file) as ``name``; load it (with
    ``suffix`` appended to the path: loading options)."""

    def call(tmp):
        path = tmp / name
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
        return SafeDetectionCheckpointer(_tiny_model()).load(str(path) + suffix)

    return call


def _good_checkpoint_bytes():
    import io

    buf = io.BytesIO()
    torch.save({"model": _tiny_model().state_dict()}, buf)
    return buf.getvalue()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _evil_pkl(path):
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "x": _Evil()}, f)


def _evil_pth(path):
    torch.save({"model": {}, "x": _Evil()}, path)


def _run_dir(tmp, iterations):
    """An output folder with checkpoints at ``iterations`` (tiny model + trainer state)."""
    out = tmp / "run"
    model = _tiny_model()
    ck = SafeDetectionCheckpointer(model, str(out))
    for it in iterations:
        ck.save(f"model_{it:07d}", iteration=it)
    return out


def resume_after(damage, iterations=(4, 9)):
    """Checkpoints at ``iterations``, then ``damage(out)``; resume; returns warnings + iteration."""

    def call(tmp):
        out = _run_dir(tmp, iterations)
        damage(out)
        ck = SafeDetectionCheckpointer(_tiny_model(), str(out))
        return captured_warnings(lambda: ck.resume_or_load("", resume=True).get("iteration"))

    return call


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan_weights(path):
    state = torch.load(path, weights_only=True)
    state["model"]["1.bias"][1] = float("nan")
    torch.save(state, path)


def _truncate_newest_shuffle_times(out):
    """A run folder copied with ``cp -r``: file times no longer in iteration order."""
    _truncate(out / "model_0000014.pth")
    for age, it in enumerate((4, 14, 9)):  # 4 newest, 9 oldest
        os.utime(out / f"model_{it:07d}.pth", (1e9 - 1000 * age, 1e9 - 1000 * age))


def _all_corrupt(out):
    for p in out.glob("*.pth"):
        p.write_text("not a checkpoint")


# -------------------------------------------------------------- classifier layout mismatch

_MODELS = {}


def _built(tmp, config, *opts):
    key = (config, opts)
    if key not in _MODELS:
        _MODELS[key] = Trainer.build_model(_cfg(tmp, *opts, config=config))
    return _MODELS[key]


def load_into(train_opts, eval_opts, config=YAML, resume=False):
    """Save a model built with ``train_opts``; load it (or ``resume``) into one built with ``eval_opts``."""

    def call(tmp):
        src = _built(tmp, config, *train_opts)
        SafeDetectionCheckpointer(src, str(tmp / "ck")).save("model_final")
        dst = _built(tmp, config, *eval_opts)
        ck = SafeDetectionCheckpointer(dst, str(tmp / "ck"))
        load = (lambda: ck.resume_or_load("", resume=True)) if resume else (lambda: ck.load(str(tmp / "ck" / "model_final.pth")))
        return captured_warnings(lambda: (load(), "loaded")[1])

    return call


# ------------------------------------------------------------------------- datasets on disk


def _coco_dataset(tmp, name, boxes_per_image, image_bytes=None):
    """Register a COCO-format dataset of 64x64 images; ``boxes_per_image``: list of lists of
    XYWH boxes (an empty list = an image without annotations)."""
    root = tmp / name
    (root / "img").mkdir(parents=True, exist_ok=True)
    images, annos = [], []
    for i, boxes in enumerate(boxes_per_image):
        file = root / "img" / f"{i}.jpg"
        Image.new("RGB", (64, 64), (i * 20 % 255, 90, 160)).save(file)
        if image_bytes is not None:
            file.write_bytes(image_bytes(file.read_bytes()))
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 64, "height": 64})
        for b in boxes:
            annos.append({"id": len(annos) + 1, "image_id": i + 1, "category_id": 1, "bbox": b,
                          "area": abs(b[2] * b[3]), "iscrowd": 0})
    json_file = root / "ann.json"
    json_file.write_text(json.dumps({
        "images": images, "annotations": annos,
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(("circle", "square", "triangle"))],
    }))
    name = f"{name}_{abs(hash(str(tmp))) % 10**8}"
    register_coco_instances(name, {}, str(json_file), str(root / "img"))
    MetadataCatalog.get(name).thing_classes = ["circle", "square", "triangle"]
    return name, json_file


def train_loader_on(boxes_per_image, *opts, image_bytes=None, batches=1):
    """Start-up checks + Trainer.build_train_loader on a dataset written to disk; read
    ``batches`` batches. Returns the warnings."""

    def call(tmp):
        name, _ = _coco_dataset(tmp, "ds", boxes_per_image, image_bytes)
        cfg = _cfg(tmp, "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()",
                   "AP_LOSS_INPUT.AUGMENTATION", "default", *opts)

        def run():
            check_start(cfg)
            loader = iter(Trainer.build_train_loader(cfg))
            for _ in range(batches):
                next(loader)
            return "read"

        return captured_warnings(run)

    return call


def eval_loader_on(image_bytes):
    def call(tmp):
        name, _ = _coco_dataset(tmp, "tds", [[[4, 4, 20, 20]]], image_bytes)
        cfg = _cfg(tmp, "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)")
        check_start(cfg)
        return next(iter(Trainer.build_test_loader(cfg, name)))

    return call


def _truncated_jpeg(data):
    return data[: len(data) // 2]


def bad_dataset_root(tmp):
    blocker = tmp / "file"
    blocker.write_text("x")
    names = register_synthetic_shapes(SyntheticShapesSpec(num_train=2, num_val=2), root=blocker / "ds",
                                      prefix=f"badroot{abs(hash(str(tmp))) % 10**8}")
    return Trainer.build_train_loader(setup_cfg(_args(YAML, "OUTPUT_DIR", str(tmp / "out"), "DATASETS.TRAIN", f"('{names[0]}',)")))


def embedded_loader_negative_box(tmp):
    name, json_file = _coco_dataset(tmp, "neg", [[[10, 10, -5, 8]]])
    return load_validated_coco_json(json_file, tmp / "neg" / "img")


def truncated_json_user_coco(tmp):
    name, json_file = _coco_dataset(tmp, "tj", [[[4, 4, 20, 20]]])
    json_file.write_text(json_file.read_text()[:60])
    return Trainer.build_train_loader(_cfg(tmp, "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()"))


def truncated_json_embedded(tmp):
    names = register_synthetic_shapes(SyntheticShapesSpec(num_train=2, num_val=2), root=tmp / "ds",
                                      prefix=f"tjson{abs(hash(str(tmp))) % 10**8}")
    DatasetCatalog.get(names[0])  # generates the dataset
    json_file = Path(MetadataCatalog.get(names[0]).json_file)
    json_file.write_text(json_file.read_text()[:60])
    return DatasetCatalog.get(names[0])


def truncated_json_builtin_coco(tmp):
    """Detectron2's built-in coco_2017_val, its annotation file truncated (relative to the cwd)."""
    json_file = MetadataCatalog.get("coco_2017_val").json_file
    if os.path.isabs(json_file):
        pytest.skip("$DETECTRON2_DATASETS is set: the built-in COCO files are not under this test's folder")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        os.makedirs(os.path.dirname(json_file))
        Path(json_file).write_text('{"images": [{"id": 1, "file_name": "a.jpg"')
        return Trainer.build_train_loader(_cfg(tmp, "DATASETS.TRAIN", "('coco_2017_val',)", "DATASETS.TEST", "()"))
    finally:
        os.chdir(cwd)


def launch_num_gpus_0(tmp):
    """``train_net.py --num-gpus 0``: the main function runs once, in this process."""
    ran = []
    launch(ran.append, 0, args=("ran in this process",))
    return " / ".join(ran) or "nothing ran"


_TRAINED = {}


def resumed_trainer(*opts, metrics=()):
    """1 iteration trained with SOLVER.BASE_LR 0.01 (model_final at iteration 0; once per module),
    ``metrics`` lines in metrics.json, then a Trainer built with ``opts`` resumes from it;
    returns ``base_lr=<the scheduler's base LR>`` and the metrics.json lines."""

    def call(tmp):
        out = tmp / "out"
        if not _TRAINED:
            trainer = Trainer(_cfg(tmp, "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1"))
            trainer.train()
            _TRAINED.update({n: (out / n).read_bytes() for n in ("model_final.pth", "last_checkpoint")})
        out.mkdir(exist_ok=True)
        for n, data in _TRAINED.items():
            (out / n).write_bytes(data)
        (out / "metrics.json").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        trainer = Trainer(_cfg(tmp, "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "2", *opts))
        trainer.resume_or_load(resume=True)
        return f"base_lr={trainer.scheduler.base_lrs[0]}\n" + (out / "metrics.json").read_text()

    return call


def check_world(*opts, world_size):
    return lambda tmp: check_start(_cfg(tmp, *opts), world_size=world_size)


# ---------------------------------------------------------------------------------- the table

_L = torch.zeros(2, 5)
_T = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 1, 0, 0]])

# ------------------------------------------------------------------ study commands (issue 21)


def benchmark_args(*argv):
    def call(tmp):
        import contextlib
        import io

        from tools import benchmark

        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                benchmark.parse_args(list(argv))
        except SystemExit as e:
            return f"SystemExit: {e.code}: {err.getvalue().strip()}"
        return "parsed"

    return call


def _study(name):
    import importlib

    return importlib.import_module(f"studies.{name}")


def study_args(name, *argv, parser="parse_args", field="opts"):
    """Parse ``argv`` with a study's parser; the text is ``repr`` of ``args.<field>``, or
    argparse's error after ``SystemExit:``."""
    def call(tmp):
        import contextlib
        import io

        module = _study(name)
        parse = module.build_parser().parse_args if parser == "build_parser" else module.parse_args
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                return repr(getattr(parse(list(argv)), field))
        except SystemExit:
            return "SystemExit: " + err.getvalue()
    return call


def _metrics_run(tmp, ap):
    d = tmp / "run"
    d.mkdir()
    (d / "config.yaml").write_text("MODEL:\n  CLS_LOSS:\n    NAME: ap\n")
    rows = [{"iteration": 9, "time": 0.5, "cls_loss/num_neg_nontrivial": 100, "cls_loss/num_pos": 3},
            {"iteration": 9, "bbox/AP": ap, "bbox/AP50": ap, "bbox/AP75": ap}]
    (d / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def report_status_of_nan_ap(tmp):
    return _study("report").collect_run(_metrics_run(tmp, float("nan")))[0]["status"]


def cost_figure_of_one_point(tmp):
    cost = _study("cost")
    run = cost.analyse_run(_metrics_run(tmp, 1.0) / "metrics.json", "x")
    ax = cost.training_figure([run]).axes[1]
    return f"{ax.get_ylabel()}; markers={[line.get_marker() for line in ax.get_lines()]}"


def score_distribution_legends(tmp):
    pairs = {"iou": np.array([0.0, 0.6]), "score": np.array([0.1, 0.9]), "match_label": np.array([0, 1])}
    summary = {"bins": [{"mean_score": 0.5}] * 10,
               "high_score_low_iou": {"score_at_least": 0.5, "iou_below": 0.4, "count": 0}}
    fig = _study("score_distribution").combined_figure([("a", pairs, summary), ("b", pairs, summary)], 0.5)
    return f"legends={[ax.get_legend() is not None for ax in fig.axes]}"


def main_job_verdict(ap):
    return lambda tmp: _study("main_job").expected_spread(_study("main_job").CONFIG, [], {"AP": ap})[1]


def _resumed(reason):
    return r"latest checkpoint cannot be used \(\S*model_0000009\.pth" + reason + r".*\); resuming from \S*model_0000004\.pth.*result=4"


ROWS = [
    # --- start-up: configs
    ("test-set-unregistered", yaml_setup("DATASETS.TEST", "('nope_val',)"), r"DATASETS\.TEST names the dataset 'nope_val', which is not registered.*Register it"),
    ("train-set-misspelled", yaml_setup("DATASETS.TRAIN", "('synth_shapes_trian',)"), r"DATASETS\.TRAIN.*'synth_shapes_trian'.*did you mean 'synth_shapes_train'"),
    ("lazy-test-set-unregistered", lazy_setup("dataloader.test.dataset.names=nope"), r"dataloader\.test\.dataset\.names names the dataset 'nope'"),
    ("lazy-negative-delta", lazy_setup("model.cls_loss.delta=-1"), r"model\.cls_loss: delta must be a finite number > 0, got -1"),
    ("negative-delta", yaml_setup("MODEL.CLS_LOSS.DELTA", "-1.0"), r"MODEL\.CLS_LOSS \(NAME='ap'\): delta must be a finite number > 0, got -1\.0"),
    ("bad-sigmoid-k", yaml_setup("MODEL.CLS_LOSS.SIGMOID_K", "0.0"), r"MODEL\.CLS_LOSS \(NAME='ap'\): sigmoid_k must be a finite number > 0, got 0\.0"),
    ("misspelled-loss", yaml_setup("MODEL.CLS_LOSS.NAME", "apl"), r"MODEL\.CLS_LOSS\.NAME='apl' is not a classification loss for the retinanet head; valid names: .*ap"),
    ("unknown-key", yaml_setup("MODEL.CLS_LOSS.FOO", "1"), r"Non-existent (config )?key: MODEL\.CLS_LOSS\.FOO"),
    ("missing-config-file", lambda tmp: setup_cfg(_args(str(tmp / "nope.yaml"))), r"nope\.yaml"),
    ("ims-per-batch-0", yaml_setup("SOLVER.IMS_PER_BATCH", "0", "MODEL.CLS_LOSS.NAME", "focal"), r"SOLVER\.IMS_PER_BATCH=0.*integer >= 1"),
    ("ims-per-batch-0-ranking", yaml_setup("SOLVER.IMS_PER_BATCH", "0"), r"SOLVER\.IMS_PER_BATCH=0"),
    ("ims-per-batch-not-divisible", check_world("SOLVER.IMS_PER_BATCH", "3", "MODEL.CLS_LOSS.NAME", "focal", world_size=2), r"SOLVER\.IMS_PER_BATCH=3 is not divisible by the number of processes, 2"),
    ("lazy-batch-0", lazy_setup("dataloader.train.total_batch_size=0", "model.cls_loss.images_per_ranking_set=0"), r"dataloader\.train\.total_batch_size=0.*>= 1"),
    ("output-dir-under-a-file", lambda tmp: setup_cfg(_args(YAML, "OUTPUT_DIR", "/etc/hostname/out")), r"OUTPUT_DIR='/etc/hostname/out' is not writable \(Not a directory: /etc/hostname/out\)"),
    ("output-dir-not-writable", lambda tmp: setup_cfg(_args(YAML, "OUTPUT_DIR", "/proc/ap_loss_out")), r"OUTPUT_DIR='/proc/ap_loss_out' is not writable"),
    ("lazy-output-dir-not-writable", lambda tmp: setup_lazy_cfg(_args(LAZY, "train.output_dir=/proc/ap_loss_out")), r"train\.output_dir='/proc/ap_loss_out' is not writable"),
    ("datasets-root-not-writable", bad_dataset_root, r"NotADirectoryError: .*Not a directory: '\S*file/ds'"),
    # --- the loss (already handled)
    ("loss-nan-logits", lambda tmp: ap_loss(torch.full((2, 5), float("nan")), _T), r"NonFiniteLogitsError: 10 of 10 logits are NaN or Inf"),
    ("loss-shape-mismatch", lambda tmp: ap_loss(_L, _T[:, :3]), r"shape"),
    ("loss-bad-labels", lambda tmp: ap_loss(_L, _T * 2), r"-1, 0 or 1|1 positive|label|target"),
    # --- weight files
    ("missing-weights-file", lambda tmp: SafeDetectionCheckpointer(_tiny_model()).load(str(tmp / "none.pth")), r"Checkpoint \S*none\.pth not found"),
    ("text-as-pth", load_file("text.pth", b"hello, I am text\n"), r"text\.pth is not a PyTorch checkpoint: it is neither a zip archive.*nor a pickle"),
    ("text-as-pkl", load_file("text.pkl", b"hello, I am text\n"), r"text\.pkl is not a readable weights pickle"),
    ("random-bytes-pth", load_file("random.pth", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))), r"CorruptCheckpointError: \S*random\.pth is not a PyTorch checkpoint"),
    ("random-bytes-pickle-header", load_file("rand2.pth", b"\x80\x04" + bytes(range(256)) * 8), r"rand2\.pth is not a readable weights pickle \(truncated, corrupt"),
    ("empty-pth", load_file("empty.pth", b""), r"empty\.pth is empty \(0 bytes\)"),
    ("empty-pkl", load_file("empty.pkl", b""), r"empty\.pkl is empty \(0 bytes\)"),
    ("truncated-pth", load_file("trunc.pth", _good_checkpoint_bytes()[:300]), r"trunc\.pth is truncated or corrupt"),
    ("malicious-pkl", load_file("evil.pkl", _evil_pkl), r"UnsafeCheckpointError: \S*evil\.pkl: refusing to load posix\.system"),
    ("malicious-pth", load_file("evil.pth", _evil_pth), r"UnsafeCheckpointError: \S*evil\.pth is not a weights-only checkpoint: it references posix\.system"),
    ("bad-load-option", load_file("m.pth", _good_checkpoint_bytes(), "?matching_heuristics=yes"), r"loading option 'matching_heuristics=yes' is not valid; supported: matching_heuristics=True\|False"),
    ("unknown-load-option", load_file("m.pth", _good_checkpoint_bytes(), "?foo=1"), r"ValueError: checkpoint \S*m\.pth\?foo=1': loading option 'foo=1' is not valid; supported: matching_heuristics=True\|False"),
    ("nan-weights", load_file("nan.pth", lambda p: (p.write_bytes(_good_checkpoint_bytes()), _nan_weights(p))), r"NonFiniteCheckpointError: \S*nan\.pth: tensor '1\.bias' holds 1 NaN/Inf value\(s\); refusing"),
    # --- --resume falls back to the newest valid checkpoint, deleting nothing
    ("resume-empty-last-checkpoint", resume_after(lambda out: (out / "last_checkpoint").write_text("")), r"last_checkpoint is empty.*result=9"),
    ("resume-binary-last-checkpoint", resume_after(lambda out: (out / "last_checkpoint").write_bytes(b"\xff\xfe\x00\x81")), r"last_checkpoint is not text.*result=9"),
    ("resume-last-checkpoint-names-missing-file", resume_after(lambda out: (out / "model_0000009.pth").rename(out / "elsewhere")), r"names model_0000009\.pth, which does not exist.*result=4"),
    ("resume-truncated-latest", resume_after(lambda out: _truncate(out / "model_0000009.pth")), _resumed(" is truncated or corrupt")),
    ("resume-empty-latest", resume_after(lambda out: (out / "model_0000009.pth").write_bytes(b"")), _resumed(r" is empty \(0 bytes\)")),
    ("resume-nan-latest", resume_after(lambda out: _nan_weights(out / "model_0000009.pth")), _resumed(r": tensor '1\.bias' holds 1 NaN/Inf")),
    ("resume-truncated-newest-file-times-shuffled", resume_after(_truncate_newest_shuffle_times, (4, 9, 14)), r"\S*model_0000014\.pth is truncated.*resuming from \S*model_0000009\.pth.*result=9"),
    ("resume-all-corrupt", resume_after(_all_corrupt), r"CorruptCheckpointError: --resume: no readable checkpoint with finite weights in \S*run \(\S*model_0000009\.pth is not a PyTorch.*without --resume"),
    # --- checkpoint / model layout
    ("retinanet-ap-into-focal-same-layout-loads", load_into((), ("MODEL.CLS_LOSS.NAME", "focal")), r"^\s*result=loaded$"),
    ("resume-retinanet-3-into-5-classes", load_into((), ("MODEL.RETINANET.NUM_CLASSES", "5"), resume=True), r"CheckpointCompatibilityError: --resume: .*another model.*head\.cls_score\.weight: \(18, 16, 3, 3\) in the checkpoint, \(30, 16, 3, 3\) in the model.*MODEL\.WEIGHTS"),
    ("resume-rcnn-ap-into-ce", load_into((), ("MODEL.CLS_LOSS.NAME", "ce"), config=RCNN_AP, resume=True), r"CheckpointCompatibilityError: .*roi_heads\.box_predictor\.cls_score\.weight: \(3, \d+\) in the checkpoint, \(4, \d+\) in the model"),
    ("finetune-rcnn-ap-into-ce-as-detectron2", load_into((), ("MODEL.CLS_LOSS.NAME", "ce"), config=RCNN_AP), r"Skip loading parameter 'roi_heads\.box_predictor\.cls_score\.weight'.*result=loaded"),
    # --- data
    ("negative-box-width", train_loader_on([[[10, 10, -5, 8]]]), r"ValueError: dataset 'ds_\d+' \(\S*ann\.json\): image \S*0\.jpg \(image_id 1\), annotation 0: box \[10, 10, -5, 8\] has negative width"),
    ("negative-box-height-embedded-loader", embedded_loader_negative_box, r"ann\.json: image id 1 \(0\.jpg\), annotation id 1: bbox \[10, 10, -5, 8\] \(XYWH\) is degenerate"),
    ("zero-area-boxes", train_loader_on([[[10, 10, 0, 8]], [[4, 4, 20, 20]]]), r"Dataset 'ds_\d+': 1 of 2 boxes have zero width or height.*result=read"),
    ("images-without-annotations", train_loader_on([[], [[4, 4, 20, 20]], []]), r"Dataset 'ds_\d+': 2 of 3 images have no \(non-crowd\) annotations.*FILTER_EMPTY_ANNOTATIONS.*result=read"),
    ("no-valid-data", train_loader_on([[], []]), r"No valid data found in ds_\d+.*set DATALOADER\.FILTER_EMPTY_ANNOTATIONS False"),
    ("truncated-jpeg-train", train_loader_on([[[4, 4, 20, 20]]], image_bytes=_truncated_jpeg), r"OSError: \S*ds/img/0\.jpg: cannot read this image"),
    ("truncated-jpeg-test", eval_loader_on(_truncated_jpeg), r"OSError: \S*tds/img/0\.jpg: cannot read this image"),
    ("not-an-image", eval_loader_on(lambda data: b"<html>not found</html>"), r"cannot identify image file .*tds/img/0\.jpg"),
    ("truncated-json-user-coco", truncated_json_user_coco, r"ValueError: dataset 'tj_\d+': \S*tj/ann\.json is not valid JSON \(.*\); the file is truncated"),
    ("truncated-json-embedded", truncated_json_embedded, r"ValueError: \S*train\.json is not valid JSON .*truncated or corrupt"),
    ("truncated-json-builtin-coco", truncated_json_builtin_coco, r"ValueError: dataset 'coco_2017_val': datasets/coco/annotations/instances_val2017\.json is not valid JSON"),
    # --- launching
    ("num-gpus-0-runs-one-process", launch_num_gpus_0, r"^ran in this process$"),
    # --- the loss function and the benchmark
    ("ap-loss-stats-list", lambda tmp: ap_loss(torch.zeros(2), torch.tensor([1, 0]), stats=[]), r"^TypeError: stats must be a dict"),
    ("ap-loss-interpolate-no", lambda tmp: ap_loss(torch.zeros(2), torch.tensor([1, 0]), interpolate="no"), r"^TypeError: interpolate must be True or False"),
    ("benchmark-images-0", benchmark_args("--images", "0"), r"SystemExit: .*--images: 0 is too small: give an integer >= 1"),
    # --- study commands
    ("study-overrides-after-multi-value-option", study_args("lr_sweep", "--seeds", "0", "SOLVER.MAX_ITER", "10"), r"^\['SOLVER\.MAX_ITER', '10'\]$"),
    ("study-overrides-after-double-dash", study_args("lr_sweep", "--seeds", "0", "1", "--", "SOLVER.MAX_ITER", "10"), r"^\['SOLVER\.MAX_ITER', '10'\]$"),
    ("training-curves-default-output-dir", study_args("training_curves", "--run", "x", field="output_dir"), r"^'output/training_curves'$"),
    ("visualize-default-output-dir", study_args("visualize", "--run", "x", field="output_dir"), r"^'output/visualize'$"),
    ("lr-sweep-no-detections-is-failed", lambda tmp: repr(_study("common").run_status(0, "", {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")})), r"'status': 'failed', 'reason': 'no detections: AP, AP50, AP75 are NaN or missing'"),
    ("report-no-detections-is-failed", report_status_of_nan_ap, r"^failed: no detections \(AP, AP50, AP75 NaN or missing\)$"),
    ("cost-plot-entries-and-single-point", cost_figure_of_one_point, r"^anchor × class entries per batch; markers=\['o', 'o'\]$"),
    ("score-distribution-combined-legend", score_distribution_legends, r"^legends=\[True, True, True\]$"),
    ("main-job-verdict-above-sweep", main_job_verdict(42.8), r"AP 42\.8 is 0\.1 above the sweep's range \[40\.0, 42\.7\] of 3 seeds; .*inside the spread to expect \[40\.0, 48\.5\]"),
    ("main-job-verdict-below-everything", main_job_verdict(30.0), r"AP 30\.0 is 10\.0 below the sweep's range \[40\.0, 42\.7\] of 3 seeds and 10\.0 below the spread to expect"),
    ("lr-sweep-old-config-flag", study_args("lr_sweep", "--config", YAML), r"SystemExit: .*unrecognized arguments: --config "),
    ("report-old-output-flag", study_args("report", "run", "--output", "r.md"), r"SystemExit: .*unrecognized arguments: --output r\.md"),
    ("roi-sampling-old-config-flag", study_args("roi_sampling", "--config", YAML, parser="build_parser"), r"SystemExit: .*unrecognized arguments: --config "),
    ("optimization-old-config-flag", study_args("optimization", "--config", YAML, parser="build_parser"), r"SystemExit: .*unrecognized arguments: --config "),
]

# Cases that build a trainer (a few seconds each).
SLOW_ROWS = [
    ("resume-keeps-checkpoint-lr", resumed_trainer("SOLVER.BASE_LR", "0.001"), r"^base_lr=0\.01\n"),
    ("resume-keeps-metrics-json", resumed_trainer(metrics=[{"iteration": 0}, {"iteration": 1, "bbox/AP": 1.0}]), r'\{"iteration": 0\}\n\{"iteration": 1, "bbox/AP": 1\.0\}\n$'),
]




@pytest.mark.parametrize(
    "case,call,pattern",
    [pytest.param(*r, id=r[0]) for r in ROWS] + [pytest.param(*r, id=r[0], marks=pytest.mark.slow) for r in SLOW_ROWS],
)
def test_bad_input(case, call, pattern, tmp_path):
    text = message(call, tmp_path)
    assert re.search(pattern, text, re.S), f"{case}: {pattern!r} not found in:\n{text}"
    assert "weights_only=False" not in text and "weights_only` set to `False" not in text


# ---------------------------------------------------------------- checks that are not errors


def test_resume_fallback_deletes_nothing(tmp_path):
    out = _run_dir(tmp_path, (4, 9))
    _truncate(out / "model_0000009.pth")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    SafeDetectionCheckpointer(_tiny_model(), str(out)).resume_or_load("", resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
