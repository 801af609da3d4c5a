"""Fig. 8b as in the paper (studies.optimization, ``negative_mode="proposals"``) on a
tiny setting: the valid samples are the top-N anchors of a frozen proposer united with the
positives (checked against scores computed here from the proposer's weights), the proposer is
never trained, fig8b reports the recorded numbers, snapshot runs start from the snapshot's
weights, the fingerprint holds the weights, and bad input is refused clearly."""
import json
import shutil

import pytest

pytest.importorskip("detectron2")
pytest.importorskip("matplotlib")

import torch  # noqa: E402
from detectron2.modeling import RetinaNet, build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from studies import optimization as study  # noqa: E402

from tests.test_optimization_study import TINY_OPTS, _batch  # noqa: E402

N = 30
ITERS, PERIOD = 4, 2
# 64 px images, P3-P5 (strides 8, 16, 32), 2 sizes x 3 ratios = 6 anchors per location
ANCHORS_PER_IMAGE = (8 * 8 + 4 * 4 + 2 * 2) * 6


@pytest.fixture(autouse=True)
def _few_threads(one_thread):
    """Every test of this module runs torch on one thread (tests/conftest.py)."""


def _cfg(num_negatives=-1, weights="", mode="proposals", output_dir="/nonexistent", iters=10,
         opts=()):
    return study.build_run_cfg(
        study.DEFAULT_CONFIG, "ap", num_negatives, iters, output_dir, negative_mode=mode,
        proposal_weights=weights, opts=list(TINY_OPTS) + list(opts),
    )


def _save_retinanet(path, seed, opts=()):
    """A RetinaNet of the tiny config with seeded random weights, saved as a Detectron2-format
    checkpoint (``{"model": state_dict}``)."""
    torch.manual_seed(seed)
    model = RetinaNet(_cfg(opts=opts))
    # a non-zero classification bias spread so that the objectness is not near-uniform
    with torch.no_grad():
        model.head.cls_score.bias.normal_(0, 2)
    torch.save({"model": model.state_dict(), "iteration": 0}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def proposer_weights(tmp_path_factory):
    return _save_retinanet(tmp_path_factory.mktemp("proposer") / "proposer.pth", seed=123)


def _reference_scores(weights, batch):
    """Objectness of every anchor computed here: a RetinaNet with the checkpoint loaded, eval
    mode, logits (N, A*K, H, W) per level reshaped by hand to (N, H*W*A, K), max sigmoid."""
    ref = RetinaNet(_cfg())
    ref.load_state_dict(torch.load(weights, weights_only=True)["model"])
    ref.eval()
    mean = ref.pixel_mean.clone().view(-1, 1, 1)
    std = ref.pixel_std.clone().view(-1, 1, 1)
    x = torch.stack([(b["image"] - mean) / std for b in batch])  # 64 px: no padding needed
    with torch.no_grad():
        feats = ref.backbone(x)
        logits, _ = ref.head([feats[f] for f in ("p3", "p4", "p5")])
    per_level = []
    for t in logits:
        n, ak, h, w = t.shape
        k = ref.num_classes
        per_level.append(t.view(n, ak // k, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k))
    return torch.cat(per_level, dim=1).sigmoid().max(dim=2).values


def test_valid_set_is_top_n_proposals_union_positives(proposer_weights):
    model = build_model(_cfg(N, proposer_weights))
    model.train()
    batch = _batch()
    with EventStorage(0):
        model(batch)
    last = model.last_batch
    scores = _reference_scores(proposer_weights, batch)
    assert scores.shape == (2, ANCHORS_PER_IMAGE)
    assert torch.allclose(last["proposal_scores"], scores, atol=1e-6)
    positive = (last["targets_all"] == 1).any(dim=2)
    ignored = (last["targets_all"] == -1).all(dim=2)
    assert int(positive.sum()) > 0
    valid = last["labels"] >= 0
    for i in range(len(batch)):
        top = torch.zeros(ANCHORS_PER_IMAGE, dtype=torch.bool)
        top[torch.argsort(scores[i], descending=True)[:N]] = True
        expected = (top | positive[i]) & ~ignored[i]
        assert torch.equal(valid[i], expected)
        # non-trivial: proposals that are not positives exist, most anchors are left out
        assert int((top & ~positive[i]).sum()) > 0 and int(expected.sum()) < ANCHORS_PER_IMAGE // 4
    # the loss's ranking targets: valid anchors keep their entries, the others are all -1
    assert torch.equal((last["targets"] != -1).all(dim=2), valid)
    assert torch.equal(last["targets"][valid], last["targets_all"][valid])
    assert last["neg_anchors_per_image"] <= N
    # a proposer with other weights selects another set (the check above can fail)
    other = _reference_scores(_save_retinanet(proposer_weights + ".other.pth", seed=7), batch)
    assert not torch.equal(
        torch.argsort(other[0], descending=True)[:N].sort().values,
        torch.argsort(scores[0], descending=True)[:N].sort().values,
    )


def test_n_at_least_anchors_keeps_everything(proposer_weights):
    model = build_model(_cfg(10 * ANCHORS_PER_IMAGE, proposer_weights))
    model.train()
    with EventStorage(0):
        model(_batch())
    assert torch.equal(model.last_batch["targets"], model.last_batch["targets_all"])


@pytest.mark.slow  # trains
def test_proposer_is_frozen_and_not_in_the_optimizer(proposer_weights, tmp_path, synth_dataset_dir):
    cfg = _cfg(N, proposer_weights, output_dir=str(tmp_path), iters=3,
               opts=["SOLVER.CHECKPOINT_PERIOD", "1000"])
    trainer = study.StudyTrainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    proposer = model.proposer
    student_before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    saved = torch.load(proposer_weights, weights_only=True)["model"]
    state = proposer.state_dict()
    assert set(state) == set(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)  # BN statistics included
    assert not proposer.training
    assert not any(p.requires_grad for p in proposer.parameters())
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in proposer.parameters()}
    assert all(m is not proposer for m in model.modules())
    assert not any(k.startswith("proposer") for k in model.state_dict())
    # the student did train
    after = model.state_dict()
    assert any(not torch.equal(after[k], student_before[k]) for k in student_before)


# ------------------------------------------------------------------------------------------------
# The study in proposal mode with snapshot runs
# ------------------------------------------------------------------------------------------------

METHODS = ("ap", "ap_approx")
SNAP_N, SNAP_ITERS = 20, 3


def _run(out, weights, **kw):
    args = dict(
        methods=METHODS, parts=("b",), negatives=[str(N), "all"], negative_mode="proposals",
        proposal_weights=weights, snapshot_proposals=str(SNAP_N), snapshot_iters=SNAP_ITERS,
        snapshot_negatives=[str(N)], iters=ITERS, record_period=PERIOD, checkpoint_period=1000, opts=TINY_OPTS,
    )
    args.update(kw)
    return study.run_study(out, **args)


@pytest.fixture(scope="module")
def proposal_study(tmp_path_factory, synth_dataset_dir, proposer_weights):
    out = tmp_path_factory.mktemp("fig8b_proposals")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(out, proposer_weights)
    finally:
        torch.set_num_threads(n)
    return out


@pytest.mark.slow  # trains
def test_fig8b_numbers_are_the_recorded_ones(proposal_study, proposer_weights):
    report = json.loads((proposal_study / "fig8b.json").read_text())
    assert report["part"] == "b" and report["negative_mode"] == "proposals"
    assert report["x_axis"] == "proposals_per_image"
    assert report["settings"]["proposal_weights"] == study.file_fingerprint(proposer_weights)
    snap = report["snapshot"]
    assert snap["run"] == f"snapshot_ap_prop{SNAP_N}_{SNAP_ITERS}it"
    for key, snapshot_run, levels in (
        ("methods", False, [str(N), "all"]),
        ("methods_from_snapshot", True, [str(N)]),  # snapshot_negatives: N only
    ):
        data = report[key]
        assert set(data) == set(METHODS)
        for method, per_level in data.items():
            assert list(per_level) == levels
            for level, d in per_level.items():
                name = study.run_name(method, -1 if level == "all" else N, "proposals", snapshot_run)
                assert d["run"] == name == (f"{method}_{'negall' if level == 'all' else f'prop{N}'}"
                                            + ("_snap" if snapshot_run else ""))
                run_dir = proposal_study / "runs" / name
                metrics = study.read_metrics(run_dir / "metrics.json")
                result = json.loads((run_dir / study.RESULT_FILE).read_text())
                assert result["iterations"] == [1, 3]
                # final = mean of the last 20% of 2 records = the last record
                assert d["final_ap_loss"] == result["final_ap_loss"] == metrics[3][study.AP_LOSS_KEY]
                assert d["last_ap_loss"] == metrics[3][study.AP_LOSS_KEY]
                assert d["anchors_per_image"] == ANCHORS_PER_IMAGE
                assert d["neg_anchors_per_image"] == pytest.approx(
                    (metrics[1][study.NEG_KEY] + metrics[3][study.NEG_KEY]) / 2
                )
                if level == "all":
                    assert d["proposals_per_image"] == ANCHORS_PER_IMAGE
                    assert d["final_ap_loss_all_negatives"] == d["final_ap_loss"]
                else:
                    assert d["proposals_per_image"] == N and d["num_negatives"] == N
                    assert d["neg_anchors_per_image"] <= N
                    assert d["final_ap_loss_all_negatives"] == metrics[3][study.AP_LOSS_ALL_KEY]
                    assert result["settings"]["negative_mode"] == "proposals"
                md = (proposal_study / "fig8b.md").read_text()
                assert f"{d['final_ap_loss']:.4f}" in md
    md = (proposal_study / "fig8b.md").read_text()
    assert "proposals per image" in md and "(`ap_approx`), from snapshot |" in md
    row = next(line for line in md.splitlines() if "(`ap`), from snapshot |" in line)
    assert row.endswith("| not run |")  # level "all" was not run from the snapshot
    assert not (proposal_study / "runs" / "ap_negall_snap").exists()
    assert (proposal_study / "fig8b.png").read_bytes()[:4] == b"\x89PNG"
    assert not (proposal_study / "fig8a.json").exists()


@pytest.mark.slow  # trains
def test_snapshot_runs_start_from_the_snapshot(proposal_study, tmp_path):
    snap_dir = proposal_study / "runs" / f"snapshot_ap_prop{SNAP_N}_{SNAP_ITERS}it"
    weights = snap_dir / "model_final.pth"
    assert weights.is_file()
    snap_result = json.loads((snap_dir / study.RESULT_FILE).read_text())
    assert snap_result["settings"]["iters"] == SNAP_ITERS and snap_result["num_negatives"] == SNAP_N
    assert snap_result["settings"]["init_weights"] is None
    snap_state = torch.load(str(weights), weights_only=True)["model"]
    for method in METHODS:
        run_dir = proposal_study / "runs" / f"{method}_prop{N}_snap"
        settings = json.loads((run_dir / study.RUN_FILE).read_text())
        assert settings["init_weights"] == study.file_fingerprint(weights)
        from detectron2.config import CfgNode

        cfg = CfgNode.load_cfg((run_dir / "config.yaml").read_text())
        assert cfg.MODEL.WEIGHTS == str(weights.resolve())
        # the trainer of that config, in a fresh folder, starts from the snapshot's weights
        cfg.defrost()
        cfg.OUTPUT_DIR = str(tmp_path / method)
        (tmp_path / method).mkdir()
        trainer = study.StudyTrainer(cfg)
        trainer.resume_or_load(resume=True)
        assert trainer.start_iter == 0
        state = trainer.model.state_dict()
        assert all(torch.equal(state[k], snap_state[k]) for k in snap_state)
        # ... which differ from the default initialisation (this check can fail)
        cfg.MODEL.WEIGHTS = ""
        cfg.OUTPUT_DIR = str(tmp_path / (method + "_scratch"))
        (tmp_path / (method + "_scratch")).mkdir()
        scratch = study.StudyTrainer(cfg)
        scratch.resume_or_load(resume=False)
        fresh = scratch.model.state_dict()
        assert any(not torch.equal(fresh[k], snap_state[k]) for k in snap_state)
    # default-init runs have no initial weights
    default = json.loads((proposal_study / "runs" / f"ap_prop{N}" / study.RUN_FILE).read_text())
    assert default["init_weights"] is None


@pytest.mark.slow  # trains
def test_fingerprint_skips_same_and_refuses_other_weights(proposal_study, proposer_weights,
                                                          tmp_path, monkeypatch):
    before = (proposal_study / "fig8b.json").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study, "StudyTrainer", no_training)
    _run(proposal_study, proposer_weights)
    assert (proposal_study / "fig8b.json").read_text() == before
    # same path, other content: refused (the fingerprint holds size and sha256)
    backup = tmp_path / "backup.pth"
    shutil.copy(proposer_weights, backup)
    _save_retinanet(proposer_weights, seed=5)
    try:
        with pytest.raises(RuntimeError, match="other settings"):
            _run(proposal_study, proposer_weights, snapshot_proposals=None, snapshot_iters=None,
                 snapshot_negatives=None)
    finally:
        shutil.copy(backup, proposer_weights)
    # another N is a new run, not a clash
    assert study.run_name("ap", 7, "proposals") != study.run_name("ap", 7, "random")


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_bad_input_is_refused_clearly(proposer_weights, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file.*make main"):
        study.load_proposer(_cfg(), str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        study.run_study(tmp_path / "a", parts=("b",), negatives=["10"], opts=TINY_OPTS,
                        proposal_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="--proposal-weights.*make main"):
        study.run_study(tmp_path / "b", parts=("b",), negatives=["10"], opts=TINY_OPTS)
    with pytest.raises(ValueError, match="needs proposal weights|PROPOSAL_WEIGHTS"):
        build_model(_cfg(N, ""))
    for bad in (["0"], ["-3"], ["x"]):
        with pytest.raises(ValueError, match="proposals per image"):
            study.parse_negatives(bad, "proposals")
        with pytest.raises(ValueError, match="proposals per image"):
            study.run_study(tmp_path / "c", parts=("b",), negatives=bad, opts=TINY_OPTS,
                            proposal_weights=proposer_weights)
    with pytest.raises(ValueError, match="proposals per image"):
        study.run_study(tmp_path / "c", parts=("b",), negatives=["10"], opts=TINY_OPTS,
                        proposal_weights=proposer_weights, snapshot_proposals="0")
    with pytest.raises(ValueError, match="must be > 0"):
        build_model(_cfg(0, proposer_weights))
    with pytest.raises(ValueError, match="negative_mode.*valid: proposals, random"):
        study.run_study(tmp_path / "d", negative_mode="hard", opts=TINY_OPTS)
    with pytest.raises(ValueError, match="subset of --negatives.*not in it: 20"):
        study.run_study(tmp_path / "e", parts=("b",), negatives=["10"], snapshot_proposals="10",
                        snapshot_negatives=["20"], proposal_weights=proposer_weights, opts=TINY_OPTS)
    with pytest.raises(ValueError, match="--snapshot-iters / --snapshot-negatives need --snapshot-proposals"):
        study.run_study(tmp_path / "e", parts=("b",), negatives=["10"], snapshot_iters=5,
                        proposal_weights=proposer_weights, opts=TINY_OPTS)
    # a checkpoint of another architecture: 5 classes; 48 FPN channels
    other = _save_retinanet(tmp_path / "other.pth", seed=0, opts=["MODEL.RETINANET.NUM_CLASSES", "5"])
    with pytest.raises(ValueError, match=r"not a RetinaNet of this config.*2 of other shapes: .*"
                       r"head.cls_score.weight: checkpoint \(30, 32, 3, 3\) vs model \(18, 32, 3, 3\)"):
        study.load_proposer(_cfg(), other)
    fpn = _save_retinanet(tmp_path / "fpn.pth", seed=0, opts=["MODEL.FPN.OUT_CHANNELS", "48"])
    with pytest.raises(ValueError, match="not a RetinaNet of this config.*other shapes: backbone.fpn"):
        study.load_proposer(_cfg(), fpn)
    with pytest.raises(ValueError, match="not a RetinaNet of this config"):
        study.run_study(tmp_path / "f", parts=("b",), negatives=["10"], opts=TINY_OPTS,
                        proposal_weights=other)
    # a checkpoint missing tensors (e.g. a backbone-only file)
    state = torch.load(proposer_weights, weights_only=True)["model"]
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("backbone")}},
               str(tmp_path / "partial.pth"))
    with pytest.raises(ValueError, match="missing .* tensors: head"):
        study.load_proposer(_cfg(), str(tmp_path / "partial.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="proposal weights: .*text.pth is not a PyTorch checkpoint.*make main"):
        study.load_proposer(_cfg(), str(tmp_path / "text.pth"))
    # nothing was trained or written by the refused studies
    assert not (tmp_path / "c" / "runs").exists() and not (tmp_path / "f" / "runs").exists()


def test_random_mode_is_labelled_as_such(tmp_path):
    """fig8b of the random mode says it is random sampling, not the paper's proposals."""
    result = dict(
        settings=dict(config_file="c.yaml", iters=4, record_period=2, seed=0, opts=[],
                      final_fraction=0.2),
        neg_anchors_per_image=10.0, anchors_per_image=504.0, final_ap_loss=0.5, last_ap_loss=0.5,
    )
    data = study.report_fig8b({"ap": {10: result}}, tmp_path, negative_mode="random")
    assert data["x_axis"] == "neg_anchors_per_image" and data["negative_mode"] == "random"
    assert data["methods"]["ap"]["10"]["proposals_per_image"] is None
    md = (tmp_path / "fig8b.md").read_text()
    assert "RANDOM negatives (not the paper's Fig. 8b" in md
    assert (tmp_path / "fig8b.png").read_bytes()[:4] == b"\x89PNG"


def test_command_line_options(tmp_path):
    args = study.build_parser().parse_args(
        ["--negative-mode", "random", "--proposal-weights", "w.pth", "--snapshot-proposals", "300",
         "--snapshot-iters", "50", "--negatives", "100", "all"])
    assert (args.negative_mode, args.proposal_weights, args.snapshot_proposals, args.snapshot_iters,
            args.negatives) == ("random", "w.pth", "300", 50, ["100", "all"])
    defaults = study.build_parser().parse_args([])
    assert defaults.negative_mode == "proposals" and defaults.proposal_weights is None
    with pytest.raises(ValueError, match="--proposal-weights.*make main"):
        study.main(["--output-dir", str(tmp_path), "--parts", "b", "--negatives", "10", "--iters", "4",
                    *TINY_OPTS])
    with pytest.raises(SystemExit):
        study.build_parser().parse_args(["--negative-mode", "hard"])
