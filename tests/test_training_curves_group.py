"""``training_curves --group``: runs with the same label are seeds of one setting; the table and
JSON give mean and [min, max] per iteration (checked against values computed here by hand)."""
import json

import pytest

pytest.importorskip("detectron2")
import torch  # noqa: E402

from .test_train_net import TINY_YAML  # noqa: E402


def test_group_points_mean_min_max():
    from studies.training_curves import group_points

    runs = [
        {"label": "A", "points": [{"iteration": 10, "AP": 1.0, "AP50": 2.0, "AP75": 0.5},
                                  {"iteration": 20, "AP": 4.0, "AP50": 8.0, "AP75": 1.0}]},
        {"label": "B", "points": [{"iteration": 10, "AP": 7.0, "AP50": 7.0, "AP75": 7.0}]},
        # no detections counts as 0; iteration 30 is missing from the first A run: dropped
        {"label": "A", "points": [{"iteration": 10, "AP": None, "AP50": None, "AP75": None, "note": "no detections"},
                                  {"iteration": 20, "AP": 2.0, "AP50": 4.0, "AP75": 3.0},
                                  {"iteration": 30, "AP": 9.0, "AP50": 9.0, "AP75": 9.0}]},
    ]
    groups = group_points(runs)
    assert [(g["label"], g["num_runs"]) for g in groups] == [("A", 2), ("B", 1)]
    a10, a20 = groups[0]["points"]
    assert (a10["iteration"], a10["AP"], a10["AP_min"], a10["AP_max"]) == (10, 0.5, 0.0, 1.0)
    assert (a20["AP50"], a20["AP50_min"], a20["AP50_max"]) == (6.0, 4.0, 8.0)
    assert (a20["AP75"], a20["AP75_min"], a20["AP75_max"]) == (2.0, 1.0, 3.0)
    assert groups[1]["points"] == [{"iteration": 10, "AP": 7.0, "AP_min": 7.0, "AP_max": 7.0,
                                    "AP50": 7.0, "AP50_min": 7.0, "AP50_max": 7.0,
                                    "AP75": 7.0, "AP75_min": 7.0, "AP75_max": 7.0}]


def test_group_flag_end_to_end(tmp_path, monkeypatch):
    from studies import training_curves as tc

    values = {}
    for seed, aps in enumerate([(1.0, 3.0), (5.0, 9.0)]):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        for i, ap in zip((4, 9), aps):
            path = run / f"model_{i:07d}.pth"
            torch.save({"model": {}, "iteration": i}, path)
            values[str(path)] = ap
    monkeypatch.setattr(tc, "evaluate_checkpoint",
                        lambda cfg, w: {"AP": values[w], "AP50": 2 * values[w], "AP75": values[w] / 2})
    out = tmp_path / "fig6"
    report = tc.main(["--run", f"{tmp_path / 'run0'}:AP-loss", "--run", f"{tmp_path / 'run1'}:AP-loss",
                      "--group", "--config-file", TINY_YAML, "--output-dir", str(out)])
    (g,) = report["groups"]
    assert g["num_runs"] == 2 and [q["iteration"] for q in g["points"]] == [5, 10]
    assert (g["points"][1]["AP"], g["points"][1]["AP_min"], g["points"][1]["AP_max"]) == (6.0, 3.0, 9.0)
    assert "| AP-loss | 2 | 10 | 6.0 [3.0, 9.0] | 12.0 [6.0, 18.0] | 3.0 [1.5, 4.5] |" in (out / "training_curves.md").read_text()
    assert json.loads((out / "training_curves.json").read_text())["groups"] == report["groups"]
    assert [r["label"] for r in report["runs"]] == ["AP-loss", "AP-loss"]
    assert (out / "training_curves.png").stat().st_size > 0
