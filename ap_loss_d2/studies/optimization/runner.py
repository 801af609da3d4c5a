"""Runs of the Fig. 8 study: one (method, N) run trained in this process with
:class:`~.model.StudyTrainer`, resumed or skipped by its settings (``study_run.json``: config,
method, N, negative mode, the proposal weights' and the initial weights' size and sha256, ...),
and the whole study (:func:`run_study`: default-init runs, the optional snapshot and the runs
initialised from it) writing the reports of :mod:`.report`."""
import logging
import math
from pathlib import Path
from typing import Dict, List, Sequence

from detectron2.utils.env import seed_all_rng

from ...engine import get_ap_loss_cfg, validate_cfg
from ...losses.registry import cls_loss_names
from ..common import (
    REPO,
    check_run_settings,
    metrics_by_iteration,
    read_json,
    scale_iter,
    scaled_schedule,
    write_json,
)
from .model import (
    ANCHORS_KEY,
    AP_LOSS_ALL_KEY,
    AP_LOSS_KEY,
    NEG_KEY,
    NEGATIVE_MODES,
    PROPOSAL_WEIGHTS_HINT,
    StudyTrainer,
    add_optimization_study_config,
    file_fingerprint,
    load_proposer,
)
from .report import fmt_loss, negatives_label, report_fig8a, report_fig8b, run_name, snapshot_name

logger = logging.getLogger("ap_loss_d2.optimization_study")

CONFIG_REL = "quick/retinanet_R_18_FPN_1000it_synth_ap.yaml"
#: The default config in a source checkout (``cli`` says where it is expected when missing).
DEFAULT_CONFIG = REPO / "configs" / CONFIG_REL
DEFAULT_METHODS = ("ap", "ap_approx", "ap_hinge")
DEFAULT_NEGATIVES = ("100", "300", "1000", "3000", "all")
DEFAULT_NEGATIVE_MODE = "proposals"
#: The method that trains the snapshot of the dashed lines (the paper's: AP-loss).
SNAPSHOT_METHOD = "ap"

RUN_FILE = "study_run.json"
RESULT_FILE = "study_result.json"



def parse_negatives(values: Sequence, negative_mode: str = "random") -> List[int]:
    """``["100", "all"]`` -> ``[100, -1]`` (``all`` or ``-1``: keep all). ``"random"``: background
    anchors per image, >= 0; ``"proposals"``: proposals per image, > 0."""
    out = []
    low = 1 if negative_mode == "proposals" else 0
    what = "proposals per image" if negative_mode == "proposals" else "negatives per image"
    for v in values:
        try:
            n = -1 if str(v).lower() == "all" else int(v)
        except ValueError:
            raise ValueError(f"{what} must be an integer >= {low} or 'all', got {v!r}") from None
        if n < -1 or (n != -1 and n < low):
            raise ValueError(f"{what} must be >= {low} or 'all', got {v!r}")
        out.append(n)
    return out


def _check_mode(negative_mode):
    if negative_mode not in NEGATIVE_MODES:
        raise ValueError(f"negative_mode={negative_mode!r}; valid: {', '.join(NEGATIVE_MODES)}")


def build_run_cfg(
    config_file,
    method,
    num_negatives,
    iters,
    output_dir,
    *,
    negative_mode=DEFAULT_NEGATIVE_MODE,
    proposal_weights="",
    init_weights="",
    record_period=5,
    checkpoint_period=100,
    seed=0,
    opts=(),
):
    """The frozen config of one run: ``config_file``, then the study's settings (study model,
    ``CLS_LOSS.NAME = method``, ``BOX_REG_WEIGHT = 0``, N and the negative mode, the proposal
    weights, ``iters`` with the schedule scaled, no evaluation), then ``opts``, then
    ``MODEL.WEIGHTS = init_weights`` when given (a snapshot run's initialisation)."""
    _check_mode(negative_mode)
    cfg = get_ap_loss_cfg()
    add_optimization_study_config(cfg)
    cfg.merge_from_file(str(config_file))
    base_iter = cfg.SOLVER.MAX_ITER
    steps = scaled_schedule(cfg.SOLVER.STEPS, base_iter, iters)
    warmup = min(scale_iter(cfg.SOLVER.WARMUP_ITERS, base_iter, iters), max(iters - 1, 0))
    # fmt: off
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "OptimizationStudyRetinaNet",
        "MODEL.CLS_LOSS.NAME", method,
        "MODEL.AP_LOSS_RETINANET.BOX_REG_WEIGHT", 0.0,
        "OPTIMIZATION_STUDY.NUM_NEGATIVES", int(num_negatives),
        "OPTIMIZATION_STUDY.NEGATIVE_MODE", negative_mode,
        "OPTIMIZATION_STUDY.PROPOSAL_WEIGHTS", str(proposal_weights or ""),
        "OPTIMIZATION_STUDY.RECORD_PERIOD", int(record_period),
        "SOLVER.MAX_ITER", int(iters),
        "SOLVER.STEPS", tuple(steps),
        "SOLVER.WARMUP_ITERS", warmup,
        "SOLVER.CHECKPOINT_PERIOD", int(checkpoint_period),
        "TEST.EVAL_PERIOD", 0,
        "SEED", int(seed),
        "OUTPUT_DIR", str(output_dir),
    ])
    # fmt: on
    cfg.merge_from_list(list(opts))
    if init_weights:
        cfg.MODEL.WEIGHTS = str(init_weights)
    if cfg.MODEL.CLS_LOSS.NAME not in cls_loss_names("retinanet"):
        raise ValueError(f"method {cfg.MODEL.CLS_LOSS.NAME!r} is not one of {cls_loss_names('retinanet')}")
    validate_cfg(cfg)
    cfg.freeze()
    return cfg


def read_metrics(path) -> Dict[int, dict]:
    """``metrics.json`` as ``{iteration: record}`` (a later line for the same iteration wins,
    e.g. after a resumed run); empty when there is none."""
    return metrics_by_iteration(path)[0] if Path(path).exists() else {}


def _history(storage, key):
    if key not in storage.histories():
        return []
    return [(int(it), float(v)) for v, it in storage.history(key).values()]


def _final(values, fraction):
    if not values:
        return None, 0
    k = max(1, int(math.ceil(len(values) * fraction)))
    return sum(values[-k:]) / k, k


def run_one(
    config_file,
    method,
    num_negatives,
    iters,
    run_dir,
    *,
    negative_mode=DEFAULT_NEGATIVE_MODE,
    proposal_weights=None,
    init_weights=None,
    record_period=5,
    checkpoint_period=100,
    seed=0,
    opts=(),
    final_fraction=0.2,
    keep_checkpoints=False,
    keep_final=False,
):
    """Train one (method, N) run, or load it when already finished. Returns its result
    (the dict written to ``study_result.json``).

    ``num_negatives``: N (-1: all anchors); ``negative_mode``: ``"proposals"`` (top-N anchors of
    the proposer ``proposal_weights`` united with the positives) or ``"random"``;
    ``init_weights``: a checkpoint to start from (the snapshot), else the config's
    ``MODEL.WEIGHTS``. The fingerprint holds the size and sha256 of both weight files.
    ``keep_final``: keep ``model_final.pth`` even without ``keep_checkpoints`` (the snapshot)."""
    _check_mode(negative_mode)
    run_dir = Path(run_dir)
    num_negatives = int(num_negatives)
    uses_proposals = negative_mode == "proposals" and num_negatives >= 0
    if uses_proposals and num_negatives == 0:
        raise ValueError("proposals per image must be > 0 or -1 (all), got 0")
    if uses_proposals and not proposal_weights:
        raise ValueError(f"negative mode 'proposals' needs proposal weights: {PROPOSAL_WEIGHTS_HINT}")
    if uses_proposals and not Path(proposal_weights).is_file():
        raise FileNotFoundError(
            f"proposal weights {str(proposal_weights)!r}: no such file; {PROPOSAL_WEIGHTS_HINT}"
        )
    if init_weights and not Path(init_weights).is_file():
        raise FileNotFoundError(f"initial weights {str(init_weights)!r}: no such file")
    settings = dict(
        config_file=str(Path(config_file).resolve()),
        method=method,
        num_negatives=num_negatives,
        # "all" when every anchor is kept (the same run in both modes: part a's)
        negative_mode=negative_mode if num_negatives >= 0 else "all",
        proposal_weights=file_fingerprint(proposal_weights) if uses_proposals else None,
        init_weights=file_fingerprint(init_weights) if init_weights else None,
        iters=int(iters),
        record_period=int(record_period),
        seed=int(seed),
        opts=[str(o) for o in opts],
        final_fraction=float(final_fraction),
    )
    result_path = run_dir / RESULT_FILE
    if check_run_settings(run_dir, settings, RUN_FILE, error=RuntimeError) and result_path.exists():
        logger.info("%s: finished before, skipped (%s)", run_dir.name, result_path)
        return read_json(result_path)

    cfg = build_run_cfg(
        config_file,
        method,
        num_negatives,
        iters,
        run_dir,
        negative_mode=negative_mode,
        proposal_weights=str(Path(proposal_weights).resolve()) if uses_proposals else "",
        init_weights=str(Path(init_weights).resolve()) if init_weights else "",
        record_period=record_period,
        checkpoint_period=checkpoint_period,
        seed=seed,
        opts=opts,
    )
    (run_dir / "config.yaml").write_text(cfg.dump())
    metrics_path = run_dir / "metrics.json"
    # Detectron2's checkpointer resumes when "last_checkpoint" exists; otherwise a metrics.json
    # here is a stale file of an interrupted run (removed before the JSONWriter opens it).
    previous_metrics = read_metrics(metrics_path)
    if not (run_dir / "last_checkpoint").exists() and metrics_path.exists():
        metrics_path.unlink()
    seed_all_rng(seed)
    trainer = StudyTrainer(cfg)
    trainer.resume_or_load(resume=True)
    start_iter = trainer.start_iter
    prior = {it: rec for it, rec in previous_metrics.items() if it < start_iter}
    if start_iter > 0:
        logger.info("%s: resuming at iteration %d", run_dir.name, start_iter)
    trainer.train()

    def curve(key):
        points = {it: rec[key] for it, rec in prior.items() if key in rec}
        points.update(dict(_history(trainer.storage, key)))
        return sorted(points.items())

    points = curve(AP_LOSS_KEY)
    values = [v for _, v in points]
    final, window = _final(values, final_fraction)
    negs = [v for _, v in curve(NEG_KEY)]
    anchors = [v for _, v in curve(ANCHORS_KEY)]
    result = dict(
        settings=settings,
        method=method,
        num_negatives=num_negatives,
        negative_mode=settings["negative_mode"],
        anchors_per_image=sum(anchors) / len(anchors) if anchors else None,
        iterations=[it for it, _ in points],
        ap_loss=values,
        final_ap_loss=final,
        final_window=window,
        last_ap_loss=values[-1] if values else None,
        neg_anchors_per_image=sum(negs) / len(negs) if negs else None,
    )
    all_points = curve(AP_LOSS_ALL_KEY)
    if all_points:
        result["ap_loss_all_negatives"] = [v for _, v in all_points]
        result["final_ap_loss_all_negatives"] = _final(
            result["ap_loss_all_negatives"], final_fraction
        )[0]
    write_json(result_path, result)
    if not keep_checkpoints:
        for p in run_dir.glob("model_*.pth"):
            if not (keep_final and p.name == "model_final.pth"):
                p.unlink()
        if (run_dir / "last_checkpoint").exists():
            (run_dir / "last_checkpoint").unlink()
    del trainer
    return result


def run_study(
    output_dir,
    *,
    config_file=DEFAULT_CONFIG,
    methods=DEFAULT_METHODS,
    parts=("a", "b"),
    negatives=DEFAULT_NEGATIVES,
    negative_mode=DEFAULT_NEGATIVE_MODE,
    proposal_weights=None,
    snapshot_proposals=None,
    snapshot_iters=None,
    snapshot_negatives=None,
    iters=200,
    record_period=5,
    checkpoint_period=100,
    seed=0,
    opts=(),
    final_fraction=0.2,
    keep_checkpoints=False,
):
    """Run parts ``a`` and/or ``b`` and write their reports. Returns ``{"a": ..., "b": ...}``
    (the data of ``fig8a.json`` / ``fig8b.json``).

    Part b: every (method, N) of ``negatives`` with ``negative_mode`` (``"proposals"``: the
    top-N anchors per image of the frozen proposer ``proposal_weights``, with the positives;
    ``"random"``: N random background anchors). With ``snapshot_proposals`` (the paper's dashed
    lines): a snapshot is trained with AP-loss and that N for ``snapshot_iters`` (default
    ``iters``) from the default initialisation, then every (method, N) -- or only the N of
    ``snapshot_negatives``, a subset of ``negatives`` -- is run again from it."""
    output_dir = Path(output_dir)
    for m in methods:
        if m not in cls_loss_names("retinanet"):
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(cls_loss_names('retinanet'))}")
    if not set(parts) <= {"a", "b"} or not parts:
        raise ValueError(f"parts must be a non-empty subset of ('a', 'b'), got {parts!r}")
    _check_mode(negative_mode)
    requested = list(dict.fromkeys(parse_negatives(negatives, negative_mode))) if "b" in parts else []
    levels = list(requested)
    if "a" in parts and -1 not in levels:
        levels.append(-1)
    snapshot = None
    if snapshot_proposals is not None:
        if "b" not in parts:
            raise ValueError("snapshot runs (--snapshot-proposals) belong to part b; add 'b' to the parts")
        snap_n = parse_negatives([snapshot_proposals], negative_mode)[0]
        snap_iters = int(iters if snapshot_iters is None else snapshot_iters)
        if snap_iters <= 0:
            raise ValueError(f"snapshot iterations must be > 0, got {snapshot_iters!r}")
        snap_levels = requested
        if snapshot_negatives is not None:
            snap_levels = list(dict.fromkeys(parse_negatives(snapshot_negatives, negative_mode)))
            extra = [negatives_label(n) for n in snap_levels if n not in requested]
            if extra or not snap_levels:
                raise ValueError(
                    f"--snapshot-negatives must be a non-empty subset of --negatives "
                    f"({', '.join(negatives_label(n) for n in requested)}); not in it: {', '.join(extra)}"
                )
        snapshot = dict(method=SNAPSHOT_METHOD, num_negatives=snap_n, iters=snap_iters,
                        run=snapshot_name(SNAPSHOT_METHOD, snap_n, snap_iters, negative_mode))
    elif snapshot_iters is not None or snapshot_negatives is not None:
        raise ValueError(
            "--snapshot-iters / --snapshot-negatives need --snapshot-proposals (the N of the snapshot run)"
        )
    needs_proposer = negative_mode == "proposals" and (
        any(n >= 0 for n in levels) or (snapshot is not None and snapshot["num_negatives"] >= 0)
    )
    if needs_proposer:
        if not proposal_weights:
            raise ValueError(f"--negative-mode proposals needs --proposal-weights: {PROPOSAL_WEIGHTS_HINT}")
        # fail before any training on a missing file or another architecture
        cfg = build_run_cfg(config_file, methods[0], -1, iters, output_dir, negative_mode="random",
                            record_period=record_period, seed=seed, opts=opts)
        load_proposer(cfg, proposal_weights)
    else:
        proposal_weights = None
    output_dir.mkdir(parents=True, exist_ok=True)
    common = dict(
        negative_mode=negative_mode,
        proposal_weights=proposal_weights,
        record_period=record_period,
        checkpoint_period=checkpoint_period,
        seed=seed,
        opts=opts,
        final_fraction=final_fraction,
        keep_checkpoints=keep_checkpoints,
    )
    todo = [(m, n, False) for m in methods for n in levels]
    if snapshot is not None:
        todo += [(m, n, True) for m in methods for n in snap_levels]
    total = len(todo) + (snapshot is not None)
    what = "proposals" if negative_mode == "proposals" else "random background anchors"
    results: Dict[str, Dict[int, dict]] = {m: {} for m in methods}
    from_snapshot: Dict[str, Dict[int, dict]] = {m: {} for m in methods}
    done = 0
    for m, n, snap in todo:
        if snap and "weights" not in snapshot:
            done += 1
            logger.info("[%d/%d] %s: snapshot, method %s, %s per image %s, %d iterations", done,
                        total, snapshot["run"], SNAPSHOT_METHOD, what,
                        negatives_label(snapshot["num_negatives"]), snapshot["iters"])
            run_dir = output_dir / "runs" / snapshot["run"]
            r = run_one(config_file, SNAPSHOT_METHOD, snapshot["num_negatives"], snapshot["iters"],
                        run_dir, **{**common, "keep_final": True})
            weights = run_dir / "model_final.pth"
            if not weights.is_file():
                raise RuntimeError(
                    f"snapshot run {run_dir} finished but has no model_final.pth (deleted?); "
                    "delete that directory to train the snapshot again"
                )
            snapshot.update(weights=str(weights), final_ap_loss=r["final_ap_loss"])
        done += 1
        name = run_name(m, n, negative_mode, from_snapshot=snap)
        logger.info("[%d/%d] %s: method %s, %s per image %s, %d iterations%s", done, total, name, m,
                    what, negatives_label(n), iters, " from the snapshot" if snap else "")
        r = run_one(config_file, m, n, iters, output_dir / "runs" / name,
                    init_weights=snapshot["weights"] if snap else None, **common)
        (from_snapshot if snap else results)[m][n] = r
        logger.info("[%d/%d] %s: final AP-loss %s (last %s)", done, total, name,
                    fmt_loss(r["final_ap_loss"]), fmt_loss(r["last_ap_loss"]))
    out = {}
    if "a" in parts:
        out["a"] = report_fig8a({m: results[m][-1] for m in methods}, output_dir)
    if "b" in parts:
        out["b"] = report_fig8b(
            {m: {n: results[m][n] for n in requested} for m in methods},
            output_dir,
            negative_mode=negative_mode,
            from_snapshot=(
                {m: {n: from_snapshot[m][n] for n in snap_levels} for m in methods}
                if snapshot is not None else None
            ),
            snapshot=snapshot,
        )
    return out
