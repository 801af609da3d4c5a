"""studies.common: the one home of the studies' shared helpers, and the same flags
on every study command."""
import importlib
import json
import math

import pytest

from studies import common


def test_scaled_schedule():
    assert common.scaled_schedule((450, 550), 600, 600) == (450, 550)
    assert common.scaled_schedule((450, 550), 600, 60) == (45, 55)
    assert common.scaled_schedule((450, 550), 600, 3) == (2,)  # increasing, inside (0, iters)
    assert common.scaled_schedule((450, 550), 600, 1) == ()
    assert common.scale_iter(100, 1000, 200) == 20


def test_write_json_atomic_and_strict(tmp_path):
    path = tmp_path / "sub" / "a.json"
    common.write_json(path, {"x": float("nan"), "y": (1, 2.5), "z": math.inf})
    assert json.loads(path.read_text()) == {"x": None, "y": [1, 2.5], "z": None}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temporary file left


def test_check_run_settings(tmp_path):
    run = tmp_path / "run"
    assert common.check_run_settings(run, {"a": 1, "b": (1, 2)}) is False  # new: written
    assert common.check_run_settings(run, {"a": 1, "b": [1, 2]}) is True  # same: resume
    with pytest.raises(SystemExit, match="other settings"):
        common.check_run_settings(run, {"a": 2, "b": [1, 2]})
    with pytest.raises(RuntimeError, match="other settings"):
        common.check_run_settings(run, {"a": 2}, error=RuntimeError)


def test_last_bbox_metrics(tmp_path):
    path = tmp_path / "metrics.json"
    rows = [{"iteration": 4, "bbox/AP": 1.0, "bbox/AP50": 2.0},
            {"iteration": 9, "bbox/AP": 3.0, "bbox/AP-circle": 4.0, "val2/bbox/AP": 5.0},
            {"iteration": 10, "total_loss": 1.0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{cut")
    assert common.last_bbox_metrics(path) == {
        "": {"AP": 3.0, "AP50": 2.0, "iteration": 9}, "val2": {"AP": 5.0, "iteration": 9}}
    assert common.last_bbox_metrics(path, None)[""]["AP-circle"] == 4.0
    assert common.last_bbox_metrics(tmp_path / "missing.json") == {}


STUDIES = ["a2_example", "cost", "lr_sweep", "main_job", "optimization", "report", "robustness",
           "roi_sampling", "score_distribution", "training_curves", "visualize"]


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_takes_output_dir(name, capsys):
    pytest.importorskip("detectron2")
    pytest.importorskip("matplotlib")
    module = importlib.import_module(f"studies.{name}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"python -m studies.{name}" in text
    assert "--output-dir" in text and f"(default: output/{name})" in text
    if name in ("lr_sweep", "main_job", "optimization", "roi_sampling", "training_curves"):
        assert "--config-file" in text
    if name in ("lr_sweep", "roi_sampling"):  # they launch training processes
        assert "--num-gpus" in text


def _parser_with_opts():
    p = common.study_argument_parser("x", "a study", runs=common.RUN_SPEC)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--flag", action="store_true")
    return p


@pytest.mark.parametrize("argv,seeds,opts", [
    (["--run", "r", "--seeds", "0", "1", "SOLVER.MAX_ITER", "10"], [0, 1], ["SOLVER.MAX_ITER", "10"]),
    (["--run", "r", "--seeds", "0", "--", "SEED", "3"], [0], ["SEED", "3"]),
    (["--run", "r", "--", "--seeds", "2"], [0], ["--seeds", "2"]),
    (["--run", "SOLVER.X", "--flag", "MODEL.DEVICE", "cpu"], [0], ["MODEL.DEVICE", "cpu"]),
    (["--run", "r", "--seeds", "4"], [4], []),
])
def test_trailing_overrides_after_any_option(argv, seeds, opts):
    """As Detectron2's default_argument_parser: KEY VALUE pairs after the options (here also
    after a multi-value option and after --); the value of a one-value option is never one."""
    args = _parser_with_opts().parse_args(argv)
    assert (args.seeds, args.opts, args.output_dir) == (seeds, opts, "output/x")


def test_odd_overrides_are_refused(capsys):
    with pytest.raises(SystemExit):
        _parser_with_opts().parse_args(["--run", "r", "SOLVER.MAX_ITER"])
    assert "KEY VALUE pairs" in capsys.readouterr().err


def test_studies_share_helpers_through_public_names():
    """No study module imports another's private name."""
    import ast
    from pathlib import Path

    private = []
    for path in sorted(Path(common.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("ap_loss_d2")):
                private += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []
