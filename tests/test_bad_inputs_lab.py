"""Bad inputs of the lab commands (``studies/``, ``tools/``), as tests/test_bad_inputs.py: one row
``(id, call, pattern)`` per case; ``call(tmp_path)`` returns the text (argparse's error after
``SystemExit:``) that ``pattern`` must match."""
import contextlib
import io
import re

import pytest

pytest.importorskip("detectron2")


def lr_sweep_args(*argv):
    def call(tmp):
        from studies import lr_sweep

        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                lr_sweep.parse_args(list(argv))
        except SystemExit as e:
            return f"SystemExit: {e.code}: {err.getvalue().strip()}"
        return "parsed"

    return call


ROWS = [
    # issue 28 item 17: a loss registered by the user's module, which the training processes never imported
    ("lr-sweep-unregistered-loss-names-import", lr_sweep_args("--losses", "toy_brier"),
     r"SystemExit: 2: .*--losses toy_brier: not a registered classification loss; registered: ap, .*"
     r"needs --import MODULE, which this command and its training processes import first"),
    ("lr-sweep-import-missing-module", lr_sweep_args("--import", "no_such_loss_module", "--losses", "ap"),
     r"SystemExit: 2: .*--import no_such_loss_module: cannot import it \(No module named 'no_such_loss_module'\)"),
    ("lr-sweep-import-with-several-gpus", lr_sweep_args("--import", "json", "--num-gpus", "2"),
     r"SystemExit: 2: .*--import runs each training in one process: use --num-gpus 1"),
]


@pytest.mark.parametrize("case,call,pattern", [pytest.param(*r, id=r[0]) for r in ROWS])
def test_bad_input(case, call, pattern, tmp_path):
    text = call(tmp_path)
    assert re.search(pattern, text, re.S), f"{case}: {pattern!r} not found in:\n{text}"
