"""Bad config values of the models (issue 28 items 6, 7, 10, 11, 12) and moved keys: each fails
when the model is built (before training starts), with a message naming the key and the fix.

Rows ``(id, call, pattern)`` as in tests/test_bad_inputs.py: ``call(tmp_path)`` raises, and
``"<ExceptionType>: <message>"`` must match ``pattern`` (``re.S``).
"""
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, get_cfg, instantiate  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import ap_loss_d2.modeling  # noqa: E402,F401  (registers the models)
from ap_loss_d2.config import add_ap_loss_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SSD512 = "configs/SSD/ssd512_vgg16_160e_voc0712_ap.yaml"
SSD512_LAZY = "configs/lazy/ssd512_vgg16_160e_voc0712_ap.py"
RETINANET = "tests/configs/tiny_synth_retinanet.yaml"
NARROW = ["MODEL.SSD.VGG_WIDTH", "0.0625"]  # the checks do not depend on the width; builds fast


def yaml_model(config, *opts):
    """Build the model of a yaml config with ``opts``, as the Trainer does at start-up."""

    def call(tmp):
        cfg = add_ap_loss_config(get_cfg())
        cfg.merge_from_file(str(REPO / config))
        cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
        return build_model(cfg)

    return call


def lazy_model(config, **overrides):
    """Instantiate the model of a LazyConfig with ``model.<key> = value`` overrides."""

    def call(tmp):
        cfg = LazyConfig.load(str(REPO / config))
        cfg.model.backbone.width = 0.0625
        for key, value in overrides.items():
            node, _, leaf = key.rpartition(".")
            (cfg.model[node] if node else cfg.model)[leaf] = value
        return instantiate(cfg.model)

    return call


TILE = r"MODEL.SSD.PRIOR_STEPS \['8', '16', '32', '64', '128', '256', '512'\] do not tile a {0}x{0} input"
ROWS = [
    # item 6: the SSD512 priors at another input size
    ("ssd512-fixed-size-300", yaml_model(SSD512, *NARROW, "AP_LOSS_INPUT.FIXED_SIZE", "300"),
     r"ValueError: AP_LOSS_INPUT.FIXED_SIZE=300: " + TILE.format(300) + r".*\[38, 19, 10, 5, 3, 2, 1\] cells.*"
     r"Use the input size the priors were made for \(SSD512's: 512\), or set PRIOR_STEPS to \[7.8947, "),
    ("ssd512-fixed-size-500", yaml_model(SSD512, *NARROW, "AP_LOSS_INPUT.FIXED_SIZE", "500"),
     r"ValueError: AP_LOSS_INPUT.FIXED_SIZE=500: " + TILE.format(500)),
    ("ssd512-fixed-size-16", yaml_model(SSD512, *NARROW, "AP_LOSS_INPUT.FIXED_SIZE", "16"),
     r"ValueError: AP_LOSS_INPUT.FIXED_SIZE=16: a 16x16 input is too small for the backbone outputs "
     r"MODEL.SSD.IN_FEATURES .*use a larger input or fewer features"),
    ("ssd512-test-fixed-size-300", yaml_model(SSD512, *NARROW, "MODEL.SSD.FIXED_SIZE", "300"),
     r"ValueError: fixed_size \(MODEL.SSD.FIXED_SIZE\)=300: " + TILE.format(300)),
    ("ssd512-lazy-test-fixed-size-300", lazy_model(SSD512_LAZY, fixed_size=300),
     r"ValueError: fixed_size \(MODEL.SSD.FIXED_SIZE\)=300: " + TILE.format(300)),
    # item 7
    ("ssd-bbox-reg-weights-zero", yaml_model(SSD512, *NARROW, "MODEL.SSD.BBOX_REG_WEIGHTS", "(0, 0, 0, 0)"),
     r"ValueError: box2box_transform weights \(MODEL.SSD.BBOX_REG_WEIGHTS\)=\(0, 0, 0, 0\) must be 4 finite "
     r"numbers > 0 .*SSD: \(10, 10, 5, 5\)"),
    ("ssd-lazy-bbox-reg-weights-zero", lazy_model(SSD512_LAZY, **{"box2box_transform.weights": (10.0, 0.0, 5.0, 5.0)}),
     r"ValueError: box2box_transform weights \(MODEL.SSD.BBOX_REG_WEIGHTS\)=\(10.0, 0.0, 5.0, 5.0\) must be"),
    # item 10
    ("retinanet-num-classes-0", yaml_model(RETINANET, "MODEL.RETINANET.NUM_CLASSES", "0"),
     r"ValueError: num_classes \(MODEL.RETINANET.NUM_CLASSES\)=0: set it to the dataset's number of classes"),
    ("ssd-num-classes-0", yaml_model(SSD512, *NARROW, "MODEL.SSD.NUM_CLASSES", "0"),
     r"ValueError: num_classes \(MODEL.SSD.NUM_CLASSES\)=0: set it to the dataset's number of classes"),
    # item 11
    ("ssd-vgg-norm-bn", yaml_model(SSD512, *NARROW, "MODEL.SSD.VGG_NORM", "bn"),
     r"ValueError: VGG16SSD norm \(MODEL.SSD.VGG_NORM\)='bn' is not a Detectron2 norm; valid values: '', 'BN', "),
    # item 12
    ("ssd-cls-prior-prob-1", yaml_model(SSD512, *NARROW, "MODEL.SSD.CLS_PRIOR_PROB", "1.0"),
     r"ValueError: prior_prob \(MODEL.SSD.CLS_PRIOR_PROB\)=1.0 must be a number in \[0, 1\)"),
    ("ssd-lazy-cls-prior-prob-1", lazy_model(SSD512_LAZY, **{"head.prior_prob": 1.0}),
     r"ValueError: prior_prob \(MODEL.SSD.CLS_PRIOR_PROB\)=1.0 must be a number in \[0, 1\)"),
    # keys moved to their model's namespace (issue 29)
    ("moved-box-reg-weight", yaml_model(SSD512, "MODEL.CLS_LOSS.BOX_REG_WEIGHT", "0.0"),
     r"KeyError: .*MODEL.CLS_LOSS.BOX_REG_WEIGHT was renamed to MODEL.AP_LOSS_RETINANET.BOX_REG_WEIGHT.*"
     r"APLossSSD reads MODEL.SSD.BOX_REG_WEIGHT"),
    ("moved-box-reg-normalizer", yaml_model(RETINANET, "MODEL.CLS_LOSS.BOX_REG_NORMALIZER", "ema"),
     r"KeyError: .*MODEL.CLS_LOSS.BOX_REG_NORMALIZER was renamed to MODEL.AP_LOSS_RETINANET.BOX_REG_NORMALIZER"),
]


def _message(call, tmp):
    try:
        call(tmp)
    except Exception as e:  # the row's text is whatever was raised
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.mark.parametrize("case,call,pattern", [pytest.param(*r, id=r[0]) for r in ROWS])
def test_bad_input(case, call, pattern, tmp_path):
    text = _message(call, tmp_path)
    assert re.search(pattern, text, re.S), f"{case}: {pattern!r} not found in:\n{text}"


@pytest.mark.parametrize("size, in_features", [(512, 7), (192, 4)])
def test_prior_layout_accepts_the_shipped_sizes(size, in_features):
    """The shipped layouts pass at their own size: SSD512 at 512, the CPU config at 192."""
    config = SSD512 if size == 512 else "configs/SSD/ssd192_vgg16n_240it_synth.yaml"
    model = yaml_model(config, *NARROW)(None)
    cells = [f.shape[-2] for f in model.backbone(torch.zeros(1, 3, size, size)).values()]
    assert len(cells) == in_features
    assert [s * c for s, c in zip(model.anchor_generator.strides, cells)] == [size] * in_features
