"""Runs of the Fig. 8 study: one (method, negatives) run trained in this process with
:class:`~.model.StudyTrainer`, resumed or skipped by its settings (``study_run.json``), and the
whole study (:func:`run_study`) writing the reports of :mod:`.report`."""
import logging
import math
from pathlib import Path
from typing import Dict, List, Sequence

from detectron2.utils.env import seed_all_rng

from ...engine import get_ap_loss_cfg, validate_cfg
from ...losses import cls_loss_names
from ..common import (
    REPO,
    check_run_settings,
    metrics_by_iteration,
    read_json,
    scale_iter,
    scaled_schedule,
    write_json,
)
from .model import AP_LOSS_ALL_KEY, AP_LOSS_KEY, NEG_KEY, StudyTrainer, add_optimization_study_config
from .report import fmt_loss, negatives_label, report_fig8a, report_fig8b, run_name

logger = logging.getLogger("ap_loss_d2.optimization_study")

CONFIG_REL = "quick/retinanet_R_18_FPN_1000it_synth_ap.yaml"
#: The default config in a source checkout (``cli`` says where it is expected when missing).
DEFAULT_CONFIG = REPO / "configs" / CONFIG_REL
DEFAULT_METHODS = ("ap", "ap_approx", "ap_hinge")
DEFAULT_NEGATIVES = ("100", "300", "1000", "all")

RUN_FILE = "study_run.json"
RESULT_FILE = "study_result.json"



def parse_negatives(values: Sequence) -> List[int]:
    """``["100", "all"]`` -> ``[100, -1]`` (``all`` or ``-1``: keep all)."""
    out = []
    for v in values:
        n = -1 if str(v).lower() == "all" else int(v)
        if n < -1:
            raise ValueError(f"negatives per image must be >= 0 or 'all', got {v!r}")
        out.append(n)
    return out


def build_run_cfg(
    config_file,
    method,
    num_negatives,
    iters,
    output_dir,
    *,
    record_period=5,
    checkpoint_period=100,
    seed=0,
    opts=(),
):
    """The frozen config of one run: ``config_file``, then the study's settings (study model,
    ``CLS_LOSS.NAME = method``, ``BOX_REG_WEIGHT = 0``, ``iters`` with the schedule scaled,
    no evaluation), then ``opts``."""
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
        "MODEL.CLS_LOSS.BOX_REG_WEIGHT", 0.0,
        "OPTIMIZATION_STUDY.NUM_NEGATIVES", int(num_negatives),
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
    record_period=5,
    checkpoint_period=100,
    seed=0,
    opts=(),
    final_fraction=0.2,
    keep_checkpoints=False,
):
    """Train one (method, negatives) run, or load it when already finished. Returns its result
    (the dict written to ``study_result.json``)."""
    run_dir = Path(run_dir)
    settings = dict(
        config_file=str(Path(config_file).resolve()),
        method=method,
        num_negatives=int(num_negatives),
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
    result = dict(
        settings=settings,
        method=method,
        num_negatives=int(num_negatives),
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
    iters=200,
    record_period=5,
    checkpoint_period=100,
    seed=0,
    opts=(),
    final_fraction=0.2,
    keep_checkpoints=False,
):
    """Run parts ``a`` and/or ``b`` and write their reports. Returns ``{"a": ..., "b": ...}``
    (the data of ``fig8a.json`` / ``fig8b.json``)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for m in methods:
        if m not in cls_loss_names("retinanet"):
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(cls_loss_names('retinanet'))}")
    if not set(parts) <= {"a", "b"} or not parts:
        raise ValueError(f"parts must be a non-empty subset of ('a', 'b'), got {parts!r}")
    levels = parse_negatives(negatives) if "b" in parts else []
    if "a" in parts and -1 not in levels:
        levels.append(-1)
    todo = [(m, n) for m in methods for n in levels]
    common = dict(
        record_period=record_period,
        checkpoint_period=checkpoint_period,
        seed=seed,
        opts=opts,
        final_fraction=final_fraction,
        keep_checkpoints=keep_checkpoints,
    )
    results: Dict[str, Dict[int, dict]] = {m: {} for m in methods}
    for i, (m, n) in enumerate(todo):
        name = run_name(m, n)
        logger.info("[%d/%d] %s: method %s, background anchors per image %s, %d iterations",
                    i + 1, len(todo), name, m, negatives_label(n), iters)
        r = run_one(config_file, m, n, iters, output_dir / "runs" / name, **common)
        results[m][n] = r
        logger.info("[%d/%d] %s: final AP-loss %s (last %s)", i + 1, len(todo), name,
                    fmt_loss(r["final_ap_loss"]), fmt_loss(r["last_ap_loss"]))
    out = {}
    if "a" in parts:
        out["a"] = report_fig8a({m: results[m][-1] for m in methods}, output_dir)
    if "b" in parts:
        requested = parse_negatives(negatives)
        out["b"] = report_fig8b(
            {m: {n: results[m][n] for n in requested} for m in methods}, output_dir
        )
    return out
