"""Every bad input ends in a message that names it (file or key) and the fix.

One row per case: ``(id, call, pattern)``. ``call(tmp_path)`` either raises (the message is
``"<ExceptionType>: <message>"``) or returns text (captured warnings for the cases that recover,
e.g. ``--resume`` falling back); ``pattern`` is a regular expression that text must match
(``re.S``). No message may advise turning safety off (``weights_only=False``). A new case is
one line in ROWS (or SLOW_ROWS for the ones that train).
"""
import argparse
import json
import logging
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

from ap_loss_d2 import ap_loss  # noqa: E402
from ap_loss_d2.data import SyntheticShapesSpec, load_validated_coco_json, register_synthetic_shapes  # noqa: E402
from ap_loss_d2.engine import SafeDetectionCheckpointer, Trainer, get_ap_loss_cfg, setup_cfg, setup_lazy_cfg  # noqa: E402
from ap_loss_d2.engine.checkpoint import truncate_metrics_after  # noqa: E402
from ap_loss_d2.engine.validation import check_startup  # noqa: E402

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


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def captured_warnings(fn, *loggers):
    """Run fn(); return its warnings (from ``loggers``) joined, then ``result=<fn's result>``."""
    handler = _Capture()
    loggers = [logging.getLogger(n) for n in loggers or ("fvcore", "ap_loss_d2", "detectron2")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        result = fn()
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    return "\n".join(handler.lines) + f"\nresult={result}"


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


def _run_dir(tmp, iterations=(4, 9)):
    """An output folder with checkpoints at ``iterations`` (tiny model + trainer state)."""
    out = tmp / "run"
    model = _tiny_model()
    ck = SafeDetectionCheckpointer(model, str(out))
    for it in iterations:
        ck.save(f"model_{it:07d}", iteration=it)
    return out


def resume_after(damage):
    """Checkpoints at 4 and 9, then ``damage(out)``; resume; returns warnings + iteration."""

    def call(tmp):
        out = _run_dir(tmp)
        damage(out)
        ck = SafeDetectionCheckpointer(_tiny_model(), str(out))
        return captured_warnings(lambda: ck.resume_or_load("", resume=True).get("iteration"))

    return call


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _mark_exploded(out):
    index = json.loads((out / "checkpoint_health.json").read_text())
    index["model_0000009.pth"]["max_abs"] = 1.6e23
    (out / "checkpoint_health.json").write_text(json.dumps(index))


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


def load_into(train_opts, eval_opts, config=YAML, suffix=""):
    """Save a model built with ``train_opts``; load it into one built with ``eval_opts``."""

    def call(tmp):
        src = _built(tmp, config, *train_opts)
        SafeDetectionCheckpointer(src, str(tmp / "ck")).save("model_final")
        dst = _built(tmp, config, *eval_opts)
        return captured_warnings(
            lambda: (SafeDetectionCheckpointer(dst).load(str(tmp / "ck" / "model_final.pth") + suffix), "loaded")[1]
        )

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
            check_startup(cfg)
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
        check_startup(cfg)
        return next(iter(Trainer.build_test_loader(cfg, name)))

    return call


def _truncated_jpeg(data):
    return data[: len(data) // 2]


def bad_dataset_root(tmp):
    blocker = tmp / "file"
    blocker.write_text("x")
    names = register_synthetic_shapes(SyntheticShapesSpec(num_train=2, num_val=2), root=blocker / "ds",
                                      prefix=f"badroot{abs(hash(str(tmp))) % 10**8}")
    return setup_cfg(_args(YAML, "OUTPUT_DIR", str(tmp / "out"), "DATASETS.TRAIN", f"('{names[0]}',)"))


def embedded_loader_negative_box(tmp):
    name, json_file = _coco_dataset(tmp, "neg", [[[10, 10, -5, 8]]])
    return load_validated_coco_json(json_file, tmp / "neg" / "img")


def check_world(*opts, world_size):
    return lambda tmp: check_startup(_cfg(tmp, *opts), world_size=world_size)


# ---------------------------------------------------------------------------------- the table

_L = torch.zeros(2, 5)
_T = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 1, 0, 0]])

def _resumed(reason):
    return r"resuming from \S*model_0000004\.pth instead of the latest.*model_0000009\.pth" + reason + ".*result=4"


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
    ("output-dir-under-a-file", lambda tmp: setup_cfg(_args(YAML, "OUTPUT_DIR", "/etc/hostname/out")), r"OUTPUT_DIR='/etc/hostname/out' cannot be created: /etc/hostname .*not a folder"),
    ("output-dir-not-writable", lambda tmp: setup_cfg(_args(YAML, "OUTPUT_DIR", "/proc/ap_loss_out")), r"OUTPUT_DIR='/proc/ap_loss_out' is not writable"),
    ("lazy-output-dir-not-writable", lambda tmp: setup_lazy_cfg(_args(LAZY, "train.output_dir=/proc/ap_loss_out")), r"train\.output_dir='/proc/ap_loss_out' is not writable"),
    ("datasets-root-not-writable", bad_dataset_root, r"dataset root of 'badroot\d+_train'.*AP_LOSS_D2_DATASETS.*cannot be created.*writable folder"),
    # --- the loss (already handled)
    ("loss-nan-logits", lambda tmp: ap_loss(torch.full((2, 5), float("nan")), _T), r"NonFiniteLogitsError: 10 of 10 logits are NaN or Inf"),
    ("loss-shape-mismatch", lambda tmp: ap_loss(_L, _T[:, :3]), r"shape"),
    ("loss-bad-labels", lambda tmp: ap_loss(_L, _T * 2), r"-1, 0 or 1|1 positive|label|target"),
    # --- weight files
    ("missing-weights-file", lambda tmp: SafeDetectionCheckpointer(_tiny_model()).load(str(tmp / "none.pth")), r"Checkpoint \S*none\.pth not found"),
    ("text-as-pth", load_file("text.pth", b"hello, I am text\n"), r"text\.pth is not a PyTorch checkpoint: it is neither a zip archive.*nor a pickle"),
    ("text-as-pkl", load_file("text.pkl", b"hello, I am text\n"), r"text\.pkl is not a readable weights pickle"),
    ("random-bytes-pth", load_file("random.pth", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))), r"CorruptCheckpointError: \S*random\.pth is not a PyTorch checkpoint"),
    ("random-bytes-pickle-header", load_file("rand2.pth", b"\x80\x04" + bytes(range(256)) * 8), r"rand2\.pth is not a readable weights pickle"),
    ("empty-pth", load_file("empty.pth", b""), r"empty\.pth is empty \(0 bytes\)"),
    ("empty-pkl", load_file("empty.pkl", b""), r"empty\.pkl is empty \(0 bytes\)"),
    ("truncated-pth", load_file("trunc.pth", _good_checkpoint_bytes()[:300]), r"trunc\.pth is truncated or corrupt"),
    ("malicious-pkl", load_file("evil.pkl", _evil_pkl), r"UnsafeCheckpointError: \S*evil\.pkl: refusing to load posix\.system"),
    ("malicious-pth", load_file("evil.pth", _evil_pth), r"UnsafeCheckpointError: \S*evil\.pth is not a weights-only checkpoint: it references posix\.system"),
    ("bad-load-option", load_file("m.pth", _good_checkpoint_bytes(), "?allow_partial=yes"), r"allow_partial='yes' is not valid; use allow_partial=True or False"),
    # --- --resume falls back to the newest valid checkpoint, deleting nothing
    ("resume-empty-last-checkpoint", resume_after(lambda out: (out / "last_checkpoint").write_text("")), r"last_checkpoint is empty.*result=9"),
    ("resume-binary-last-checkpoint", resume_after(lambda out: (out / "last_checkpoint").write_bytes(b"\xff\xfe\x00\x81")), r"last_checkpoint is not text.*result=9"),
    ("resume-last-checkpoint-names-missing-file", resume_after(lambda out: (out / "model_0000009.pth").rename(out / "elsewhere")), r"names model_0000009\.pth, which does not exist.*result=4"),
    ("resume-truncated-latest", resume_after(lambda out: _truncate(out / "model_0000009.pth")), _resumed(" is truncated or corrupt")),
    ("resume-empty-latest", resume_after(lambda out: (out / "model_0000009.pth").write_bytes(b"")), _resumed(r" is empty \(0 bytes\)")),
    ("resume-exploded-latest", resume_after(_mark_exploded), _resumed(": its weights had exploded")),
    ("resume-all-corrupt", resume_after(_all_corrupt), r"--resume: no usable checkpoint in \S*run.*model_0000009\.pth is not a PyTorch.*model_0000004\.pth is not a PyTorch.*without --resume"),
    # --- checkpoint / model layout
    ("retinanet-ap-into-ce_ohem", load_into((), ("MODEL.CLS_LOSS.NAME", "ce_ohem")), r"CheckpointCompatibilityError: checkpoint was saved from APLossRetinaNet with cls_loss='ap'.*scored by sigmoid, but the model is APLossRetinaNet with cls_loss='ce_ohem'.*scored by softmax.*allow_partial=True"),
    ("retinanet-ap-into-focal-same-layout-loads", load_into((), ("MODEL.CLS_LOSS.NAME", "focal")), r"^\s*result=loaded$"),
    ("retinanet-3-into-5-classes", load_into((), ("MODEL.RETINANET.NUM_CLASSES", "5")), r"num_classes=3.*num_classes=5.*differs in: num_classes, cls_logits"),
    ("rcnn-ap-into-ce", load_into((), ("MODEL.CLS_LOSS.NAME", "ce"), config=RCNN_AP), r"cls_loss='ap', num_classes=3, 3 classifier logits.*cls_loss='ce', num_classes=3, 4 classifier logits"),
    ("rcnn-ap-into-ce-partial", load_into((), ("MODEL.CLS_LOSS.NAME", "ce"), config=RCNN_AP, suffix="?allow_partial=True"), r"(?s)Skip loading parameter.*cls_score.*result=loaded"),
    # --- data
    ("negative-box-width", train_loader_on([[[10, 10, -5, 8]]]), r"ValueError: dataset 'ds_\d+' \(\S*ann\.json\): image \S*0\.jpg \(image_id 1\), annotation 0: box \[10, 10, -5, 8\] has negative width"),
    ("negative-box-height-embedded-loader", embedded_loader_negative_box, r"ann\.json: image id 1 \(0\.jpg\), annotation id 1: bbox \[10, 10, -5, 8\] \(XYWH\) is degenerate"),
    ("zero-area-boxes", train_loader_on([[[10, 10, 0, 8]], [[4, 4, 20, 20]]]), r"Dataset 'ds_\d+': 1 of 2 boxes have zero width or height.*result=read"),
    ("images-without-annotations", train_loader_on([[], [[4, 4, 20, 20]], []]), r"Dataset 'ds_\d+': 2 of 3 images have no \(non-crowd\) annotations.*FILTER_EMPTY_ANNOTATIONS.*result=read"),
    ("no-valid-data", train_loader_on([[], []]), r"No valid data found in ds_\d+.*set DATALOADER\.FILTER_EMPTY_ANNOTATIONS False"),
    ("truncated-jpeg-train", train_loader_on([[[4, 4, 20, 20]]], image_bytes=_truncated_jpeg), r"OSError: \S*ds/img/0\.jpg: cannot read this image"),
    ("truncated-jpeg-test", eval_loader_on(_truncated_jpeg), r"OSError: \S*tds/img/0\.jpg: cannot read this image"),
    ("not-an-image", eval_loader_on(lambda data: b"<html>not found</html>"), r"cannot identify image file .*tds/img/0\.jpg"),
]


def _message(call, tmp_path):
    try:
        out = call(tmp_path)
    except Exception as e:  # noqa: BLE001 -- the message is what is tested
        return f"{type(e).__name__}: {e}"
    return out if isinstance(out, str) else f"returned {out!r}"


@pytest.mark.parametrize("case,call,pattern", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(case, call, pattern, tmp_path):
    text = _message(call, tmp_path)
    assert re.search(pattern, text, re.S), f"{case}: {pattern!r} not found in:\n{text}"
    assert "weights_only=False" not in text and "weights_only` set to `False" not in text


# ---------------------------------------------------------------- checks that are not errors


def test_numpy_pth_loads_like_pkl(tmp_path):
    weights = {k: v.numpy() + 1 for k, v in _tiny_model().state_dict().items()}
    torch.save({"model": weights, "__author__": "test"}, tmp_path / "np.pth")
    with open(tmp_path / "np.pkl", "wb") as f:
        pickle.dump({"model": weights, "__author__": "test"}, f)
    for name in ("np.pth", "np.pkl"):
        m = _tiny_model()
        SafeDetectionCheckpointer(m).load(str(tmp_path / name))
        for k, v in m.state_dict().items():
            np.testing.assert_array_equal(v.numpy(), weights[k])


def test_resume_fallback_deletes_nothing(tmp_path):
    out = _run_dir(tmp_path)
    _truncate(out / "model_0000009.pth")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    SafeDetectionCheckpointer(_tiny_model(), str(out)).resume_or_load("", resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_metrics_truncated_at_resume_with_backup(tmp_path):
    lines = [json.dumps({"iteration": i, "loss": i / 10}) for i in range(8)] + ['{"iteration": 8, "lo']
    (tmp_path / "metrics.json").write_text("\n".join(lines))
    original = (tmp_path / "metrics.json").read_text()
    with open(tmp_path / "metrics.json", "a") as appender:  # JSONWriter holds it open like this
        backup = truncate_metrics_after(str(tmp_path), 5)
        appender.write(json.dumps({"iteration": 5}) + "\n")
    assert Path(backup).read_text() == original
    rows = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert truncate_metrics_after(str(tmp_path), 6) is None  # nothing past it: untouched
