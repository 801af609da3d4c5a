"""The Fig. 8 optimisation study (studies.optimization) on a tiny setting: the numbers
it reports are the ones Detectron2's event storage / metrics.json recorded, the recorded value
is the exact (Heaviside, not interpolated) AP-loss of the batch, subsampling keeps the requested
negatives, finished runs are skipped and interrupted runs resume."""
import json
import math

import pytest

pytest.importorskip("detectron2")
pytest.importorskip("matplotlib")

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from studies import optimization as study  # noqa: E402

# tiny: 64 px images, batch 2, narrow FPN/head, small anchors so that objects get matched
TINY_OPTS = [
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "64",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "DATALOADER.NUM_WORKERS",
    "0",
    "MODEL.ANCHOR_GENERATOR.SIZES",
    "[[8, 11.3], [16, 22.6], [32, 45.3]]",
    "MODEL.FPN.OUT_CHANNELS",
    "32",
    "MODEL.RETINANET.NUM_CONVS",
    "1",
]
METHODS = ("ap", "ap_approx")
ITERS, PERIOD = 6, 2


@pytest.fixture(autouse=True)
def _few_threads(one_thread):
    """Every test of this module runs torch on one thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, synth_dataset_dir):
    out = tmp_path_factory.mktemp("optimization_study")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        study.run_study(
            out,
            methods=METHODS,
            parts=("a", "b"),
            negatives=["50", "all"],
            negative_mode="random",
            iters=ITERS,
            record_period=PERIOD,
            checkpoint_period=1000,
            opts=TINY_OPTS,
        )
    finally:
        torch.set_num_threads(n)
    return out


def _check_unit_interval(values):
    assert values and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), values


@pytest.mark.slow  # trains
def test_fig8a_numbers_are_the_recorded_ones(study_dir):
    report = json.loads((study_dir / "fig8a.json").read_text())
    assert (
        report["study"] == "optimization"
        and report["part"] == "a"
        and report["figures"] == ["fig8a.png"]
    )
    assert report["settings"]["iters"] == ITERS and report["settings"]["record_period"] == PERIOD
    data = report["methods"]
    assert set(data) == set(METHODS)
    for method, d in data.items():
        run_dir = study_dir / "runs" / f"{method}_negall"
        metrics = study.read_metrics(run_dir / "metrics.json")
        result = json.loads((run_dir / study.RESULT_FILE).read_text())
        # recorded at iterations 1, 3, 5 (every PERIOD, and the last one)
        assert d["iterations"] == [1, 3, 5] == result["iterations"]
        _check_unit_interval(d["ap_loss"])
        assert d["ap_loss"] == [metrics[it][study.AP_LOSS_KEY] for it in d["iterations"]]
        assert d["ap_loss"] == result["ap_loss"]
        # final = mean of the last 20% of the records (here: the last one)
        assert d["final_window"] == 1
        assert d["final_ap_loss"] == d["ap_loss"][-1]
        assert d["last_ap_loss"] == metrics[ITERS - 1][study.AP_LOSS_KEY]
        assert d["min_ap_loss"] == min(d["ap_loss"])
        # classification branch only
        assert all(metrics[it]["loss_box_reg"] == 0.0 for it in d["iterations"])
        assert metrics[ITERS - 1]["loss_cls"] > 0
        md = (study_dir / "fig8a.md").read_text()
        assert f"{d['final_ap_loss']:.4f}" in md and f"`{method}`" in md
    assert (study_dir / "fig8a.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # trains
def test_fig8b_numbers_are_the_recorded_ones(study_dir):
    report = json.loads((study_dir / "fig8b.json").read_text())
    assert report["study"] == "optimization" and report["part"] == "b"
    data = report["methods"]
    fig8a = json.loads((study_dir / "fig8a.json").read_text())["methods"]
    assert set(data) == set(METHODS)
    for method, per_level in data.items():
        assert list(per_level) == ["50", "all"]
        sub, full = per_level["50"], per_level["all"]
        assert sub["num_negatives"] == 50 and full["num_negatives"] == -1
        metrics = study.read_metrics(study_dir / "runs" / f"{method}_neg50" / "metrics.json")
        assert sub["final_ap_loss"] == metrics[ITERS - 1][study.AP_LOSS_KEY]
        assert sub["final_ap_loss_all_negatives"] == metrics[ITERS - 1][study.AP_LOSS_ALL_KEY]
        assert sub["neg_anchors_per_image"] == 50.0
        assert all(metrics[it][study.NEG_KEY] == 50.0 for it in (1, 3, 5))
        assert full["neg_anchors_per_image"] > 50
        # the level "all" is part a's run
        assert full["final_ap_loss"] == fig8a[method]["final_ap_loss"]
        assert full["final_ap_loss_all_negatives"] == full["final_ap_loss"]
        _check_unit_interval(
            [sub["final_ap_loss"], sub["final_ap_loss_all_negatives"], full["final_ap_loss"]]
        )
        # fewer negatives in the ranking: a lower (or equal) AP-loss on the same scores
        assert sub["final_ap_loss"] <= sub["final_ap_loss_all_negatives"]
    assert (study_dir / "fig8b.png").read_bytes()[:4] == b"\x89PNG"
    assert "| method | 50 (50) |" in (study_dir / "fig8b.md").read_text()


@pytest.mark.slow  # trains
def test_finished_runs_are_skipped_and_other_settings_refused(study_dir, monkeypatch):
    before = (study_dir / "fig8a.json").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study, "StudyTrainer", no_training)
    study.run_study(
        study_dir,
        methods=METHODS,
        parts=("a",),
        iters=ITERS,
        record_period=PERIOD,
        checkpoint_period=1000,
        opts=TINY_OPTS,
    )
    assert (study_dir / "fig8a.json").read_text() == before
    with pytest.raises(RuntimeError, match="other settings"):
        study.run_study(
            study_dir,
            methods=METHODS[:1],
            parts=("a",),
            iters=ITERS + 1,
            record_period=PERIOD,
            opts=TINY_OPTS,
        )


@pytest.mark.slow  # trains
def test_interrupted_run_resumes_from_checkpoint(tmp_path, synth_dataset_dir):
    kw = dict(record_period=PERIOD, checkpoint_period=2, opts=TINY_OPTS, keep_checkpoints=True)
    run_dir = tmp_path / "run"
    full = study.run_one(study.DEFAULT_CONFIG, "ap", -1, ITERS, run_dir, **kw)
    assert full["iterations"] == [1, 3, 5]
    # simulate an interruption after iteration 1: no result, last checkpoint = iteration 1
    (run_dir / study.RESULT_FILE).unlink()
    (run_dir / "last_checkpoint").write_text("model_0000001.pth")
    resumed = study.run_one(study.DEFAULT_CONFIG, "ap", -1, ITERS, run_dir, **kw)
    assert resumed["iterations"] == [1, 3, 5]
    # iteration 1 comes from the interrupted run's metrics.json, 3 and 5 from the resumed training
    assert resumed["ap_loss"][0] == full["ap_loss"][0]
    metrics = study.read_metrics(run_dir / "metrics.json")
    assert resumed["ap_loss"] == [metrics[it][study.AP_LOSS_KEY] for it in (1, 3, 5)]
    _check_unit_interval(resumed["ap_loss"])


# ------------------------------------------------------------------------------------------------
# The study model and the hook, on one hand-made batch
# ------------------------------------------------------------------------------------------------


def _model(num_negatives):
    cfg = study.build_run_cfg(
        study.DEFAULT_CONFIG, "ap", num_negatives, 10, "/nonexistent", negative_mode="random",
        opts=TINY_OPTS,
    )
    torch.manual_seed(0)
    return build_model(cfg)


def _batch():
    g = torch.Generator().manual_seed(0)
    batch = []
    for n in (3, 2):
        xy = torch.rand(n, 2, generator=g) * 40
        wh = 8 + torch.rand(n, 2, generator=g) * 14
        inst = Instances((64, 64))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 3, (n,), generator=g)
        batch.append(
            {"image": torch.randint(0, 256, (3, 64, 64), generator=g).float(), "instances": inst}
        )
    return batch


def _naive_ap_loss(scores, labels):
    """1 - AP by sorting (Heaviside: ties count against the positive), no interpolation."""
    s, t = scores.reshape(-1).double(), labels.reshape(-1)
    keep = t >= 0
    s, t = s[keep], t[keep]
    pos = s[t == 1]
    precisions = []
    for p in pos:
        above = s >= p
        precisions.append(float((above & (t == 1)).sum()) / float(above.sum()))
    return 1 - sum(precisions) / len(precisions)


def test_subsampling_keeps_the_requested_negatives():
    model = _model(7)
    labels = torch.full((100,), model.num_classes)
    labels[:5] = 1
    labels[5:10] = -1
    out = model.subsample_negatives(labels)
    assert int((out == model.num_classes).sum()) == 7
    assert torch.equal(out[:10], labels[:10])
    assert set(out[10:].tolist()) <= {-1, model.num_classes}
    assert torch.equal(_model(-1).subsample_negatives(labels), labels)
    assert torch.equal(_model(1000).subsample_negatives(labels), labels)


@pytest.mark.parametrize("num_negatives", [-1, 20])
def test_hook_writes_the_exact_ap_loss_of_the_batch(num_negatives):
    model = _model(num_negatives)
    model.train()

    class _Trainer:
        iter, max_iter = 3, 10

    _Trainer.model = model
    hook = study.ExactAPLossHook(period=2)
    hook.trainer = _Trainer()
    with EventStorage(3) as storage:
        sum(model(_batch()).values()).backward()
        hook.after_step()
        batch = model.last_batch
        assert int((batch["targets"] == 1).sum()) > 0
        value = storage.history(study.AP_LOSS_KEY).latest()
        assert value == pytest.approx(_naive_ap_loss(batch["logits"], batch["targets"]), abs=1e-12)
        assert 0 <= value <= 1
        negs = storage.history(study.NEG_KEY).latest()
        if num_negatives >= 0:
            assert negs == num_negatives
            value_all = storage.history(study.AP_LOSS_ALL_KEY).latest()
            assert value_all == pytest.approx(
                _naive_ap_loss(batch["logits"], batch["targets_all"]), abs=1e-12
            )
            # the negatives the loss did not see are ignored (-1) in its targets
            dropped = (batch["targets_all"] == 0) & (batch["targets"] == -1)
            assert int(dropped.sum()) > 0
        else:
            assert study.AP_LOSS_ALL_KEY not in storage.histories()
            assert torch.equal(batch["targets"], batch["targets_all"])
    # not due at iteration 4 with period 2
    _Trainer.iter = 4
    with EventStorage(4) as storage:
        hook.after_step()
        assert study.AP_LOSS_KEY not in storage.histories()


def test_parse_negatives_and_bad_arguments(tmp_path):
    assert study.parse_negatives(["100", "all", "-1", "0"]) == [100, -1, -1, 0]
    with pytest.raises(ValueError):
        study.parse_negatives(["-5"])
    with pytest.raises(ValueError):
        study.run_study(tmp_path, methods=["nope"])
    with pytest.raises(ValueError):
        study.run_study(tmp_path, parts=("c",))
