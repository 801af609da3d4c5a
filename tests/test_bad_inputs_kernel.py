"""Bad inputs of the ranking kernel choice (issue 26), in the ``(id, call, pattern)`` convention
of tests/test_bad_inputs.py: ``call(tmp_path)`` raises and ``pattern`` (a regular expression)
must be found in ``"<ExceptionType>: <message>"``."""
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import LazyCall as L  # noqa: E402
from detectron2.config import instantiate  # noqa: E402

from tests.bad_input import message  # noqa: E402
from ap_loss_d2.engine import get_ap_loss_cfg, validate_cfg  # noqa: E402
from ap_loss_d2.losses import ap_loss, auc_loss  # noqa: E402
from ap_loss_d2.losses.cls_losses import APLoss  # noqa: E402

YAML = str(Path(__file__).resolve().parents[1] / "tests/configs/tiny_synth_retinanet.yaml")
X, T = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0]), torch.tensor([1, 0, 1, -1, 1])


def _yaml(*opts):
    def call(tmp):
        cfg = get_ap_loss_cfg()
        cfg.merge_from_file(YAML)
        cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
        return validate_cfg(cfg)
    return call


ROWS = [
    ("unknown-kernel", lambda tmp: ap_loss(X, T, kernel="gpu"),
     r"ValueError: ranking kernel 'gpu' is unknown; choose one of \('auto', 'grid', 'sync_free'\)"),
    ("bad-max-positives", lambda tmp: auc_loss(X, T, max_positives=0),
     r"max_positives must be an integer >= 1, got 0"),
    ("sync-free-bound-exceeded", lambda tmp: ap_loss(X, T, kernel="sync_free", max_positives=2),
     r"3 positives exceed its static bound max_positives=2; pass max_positives=3 or more, use "
     r"kernel='grid', or rank fewer images together \(MODEL\.CLS_LOSS\.KERNEL, "
     r"MODEL\.CLS_LOSS\.IMAGES_PER_RANKING_SET\)"),
    ("yaml-unknown-kernel", _yaml("MODEL.CLS_LOSS.KERNEL", "cuda"),
     r"MODEL\.CLS_LOSS \(NAME='ap'\): ranking kernel 'cuda' is unknown; choose one of"),
    ("lazy-unknown-kernel", lambda tmp: instantiate(L(APLoss)(kernel="sorted")),
     r"ranking kernel 'sorted' is unknown; choose one of \('auto', 'grid', 'sync_free'\)"),
]




@pytest.mark.parametrize("case,call,pattern", [pytest.param(*r, id=r[0]) for r in ROWS])
def test_bad_input(case, call, pattern, tmp_path):
    text = message(call, tmp_path)
    assert re.search(pattern, text, re.S), f"{case}: {pattern!r} not found in:\n{text}"
