"""Bad inputs of the engine (issue 28 items 1, 3, 8, 14, 15), one row each, as tests/test_bad_inputs.py:
``(id, call, pattern)``; ``call(tmp_path)`` raises (the text is ``"<ExceptionType>: <message>"``) or returns text
(with the warnings it logged); ``pattern`` must match it (``re.S``)."""
import argparse
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from tests.bad_input import captured_warnings, message  # noqa: E402
from ap_loss_d2.engine import SafeDetectionCheckpointer, Trainer, get_ap_loss_cfg  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
YAML = str(REPO / "tests/configs/tiny_synth_retinanet.yaml")
LAZY = str(REPO / "tests/configs/tiny_synth_retinanet_lazy.py")


def _args(config, *opts, resume=False, eval_only=False):
    return argparse.Namespace(config_file=config, opts=list(opts), eval_only=eval_only, resume=resume,
                              num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto")


def _finished_run(out):
    """An output folder holding another run's checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    SafeDetectionCheckpointer(torch.nn.Linear(2, 2), str(out)).save("model_final", iteration=49)


def run(config, *opts, resume=False, eval_only=False, finished=True):
    """train_net.py's set-up (yaml ``setup`` or ``setup_lazy``) in ``tmp/out``, after another run finished there."""

    def call(tmp):
        import train_net

        out = tmp / "out"
        if finished:
            _finished_run(out)
        key = [f"train.output_dir={out}"] if config == LAZY else ["OUTPUT_DIR", str(out)]
        setup = train_net.setup_lazy if config == LAZY else train_net.setup
        setup(_args(config, *key, *opts, resume=resume, eval_only=eval_only))
        return "started; files: " + ", ".join(sorted(p.name for p in out.iterdir() if p.suffix == ".pth"))

    return call


def _cfg(*opts):
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(YAML)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    return cfg


_MODELS = {}


def _model(loss):
    """The tiny RetinaNet with ``loss`` (built once per module)."""
    if loss not in _MODELS:
        _MODELS[loss] = Trainer.build_model(_cfg("MODEL.CLS_LOSS.NAME", loss))
    return _MODELS[loss]


def trained_with(train_loss, eval_loss):
    """A RetinaNet checkpoint saved with ``train_loss``, loaded into the same model built with ``eval_loss``."""

    def call(tmp):
        SafeDetectionCheckpointer(_model(train_loss), str(tmp)).save("m")
        model = _model(eval_loss)
        return captured_warnings(lambda: (SafeDetectionCheckpointer(model).load(str(tmp / "m.pth")), "loaded")[1])

    return call


def unconverted_weights(tmp):
    """torchvision-style VGG names (an unconverted file) as the weights of a RetinaNet."""
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "features.0.bias": torch.zeros(64)}, tmp / "vgg16.pth")
    model = _model("ap")
    return captured_warnings(lambda: (SafeDetectionCheckpointer(model).load(str(tmp / "vgg16.pth")), "loaded")[1])


class _System:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def plain_pickle_pth(tmp):
    with open(tmp / "evil.pth", "wb") as f:
        pickle.dump({"model": {}, "x": _System()}, f)
    return SafeDetectionCheckpointer(torch.nn.Linear(2, 2)).load(str(tmp / "evil.pth"))


def not_weights(tmp):
    torch.save({"foo": 1}, tmp / "foo.pth")
    return SafeDetectionCheckpointer(torch.nn.Linear(2, 2)).load(str(tmp / "foo.pth"))


def yaml_on_cpu_processes(tmp):
    import train_net

    return train_net.check_start(_cfg("OUTPUT_DIR", str(tmp / "out")), world_size=2)


_NEW_RUN = r"holds another run's checkpoints \(last_checkpoint, model_final\.pth\), which a new run would overwrite: continue that run with --resume, choose a new "

ROWS = [
    # item 1: a new run does not overwrite another run's checkpoints
    ("new-run-in-finished-output-dir", run(YAML), r"ValueError: OUTPUT_DIR='\S*out' " + _NEW_RUN + r"OUTPUT_DIR, or set AP_LOSS_OUTPUT\.OVERWRITE True"),
    ("lazy-new-run-in-finished-output-dir", run(LAZY), r"ValueError: train\.output_dir='\S*out' " + _NEW_RUN + r"train\.output_dir, or set train\.overwrite_output True"),
    # item 8: nothing loaded, classes lost, unconverted weights
    ("eval-only-without-weights", run(YAML, eval_only=True, finished=False), r"ValueError: --eval-only with MODEL\.WEIGHTS empty would evaluate an untrained model: give MODEL\.WEIGHTS path/to/model_final\.pth"),
    ("lazy-eval-only-without-weights", run(LAZY, eval_only=True, finished=False), r"ValueError: --eval-only with train\.init_checkpoint empty would evaluate an untrained model"),
    ("num-classes-below-dataset", run(YAML, "MODEL.RETINANET.NUM_CLASSES", "2", finished=False), r"ValueError: MODEL\.RETINANET\.NUM_CLASSES=2, but the training set 'synth_shapes_train' has 3 classes: set MODEL\.RETINANET\.NUM_CLASSES 3"),
    ("unconverted-backbone-weights", unconverted_weights, r"0 of \d+ backbone tensors loaded from the checkpoint: is it converted.*result=loaded"),
    ("yaml-on-several-cpu-processes", yaml_on_cpu_processes, r"ValueError: MODEL\.DEVICE cpu in several processes: .*device_ids.*LazyConfig"),
    # item 3: the checkpoint says which scores its model needs
    ("ce-ohem-checkpoint-evaluated-as-ap", trained_with("ce_ohem", "ap"), r"CheckpointCompatibilityError: The checkpoint was trained with MODEL\.CLS_LOSS\.NAME='ce_ohem', whose inference scores \(CEOHEMLoss\.scores\) differ from those of this model's loss 'ap' .*set MODEL\.CLS_LOSS\.NAME ce_ohem"),
    ("ap-checkpoint-into-ce-ohem", trained_with("ap", "ce_ohem"), r"CheckpointCompatibilityError: .*NAME='ap'.*set MODEL\.CLS_LOSS\.NAME ap"),
    # items 14, 15: files that are not weights
    ("plain-pickle-pth-calling-os-system", plain_pickle_pth, r"UnsafeCheckpointError: \S*evil\.pth: refusing to load posix\.system"),
    ("dict-without-weights", not_weights, r"CorruptCheckpointError: \S*foo\.pth is not a checkpoint of weights: 'foo' holds a int, not a tensor"),
]


# Not errors: continuing, overwriting on purpose, evaluating; a loss with the same scores.
ALLOWED = [
    ("resume-in-finished-output-dir-starts", run(YAML, resume=True), r"^started; files: model_final\.pth$"),
    ("overwrite-on-purpose-starts", run(YAML, "AP_LOSS_OUTPUT.OVERWRITE", "True"), r"^started; files: model_final\.pth$"),
    ("lazy-overwrite-on-purpose-starts", run(LAZY, "train.overwrite_output=True"), r"^started; files: model_final\.pth$"),
    ("eval-only-in-finished-output-dir-starts", run(YAML, "MODEL.WEIGHTS", "w.pth", eval_only=True), r"^started; files: model_final\.pth$"),
    ("ap-checkpoint-into-auc-shares-scores", trained_with("ap", "auc"), r"^\s*result=loaded$"),
    ("ap-checkpoint-into-focal-shares-scores", trained_with("ap", "focal"), r"^\s*result=loaded$"),
]




@pytest.mark.parametrize("case,call,pattern", [pytest.param(*r, id=r[0]) for r in ROWS + ALLOWED])
def test_bad_input(case, call, pattern, tmp_path, synth_dataset_dir):
    text = message(call, tmp_path)
    assert re.search(pattern, text, re.S), f"{case}: {pattern!r} not found in:\n{text}"
    assert "weights_only=False" not in text
