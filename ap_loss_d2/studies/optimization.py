"""Comparison of AP-loss optimisation methods (paper Sec. 4.2.3, Fig. 8).

The classification branch of RetinaNet is trained alone (box regression off:
``MODEL.CLS_LOSS.BOX_REG_WEIGHT 0``) with each method of ``--methods``:

* ``ap``        -- AP-loss, error-driven update (the paper's method);
* ``ap_approx`` -- AP-loss by the approximate gradient (sigmoid-smoothed AP, ``-log(AP + eps)``);
* ``ap_hinge``  -- AP-loss by the structured hinge-loss upper bound (SVM-AP);
* ``focal``     -- optional reference (stock RetinaNet focal loss).

Every ``--record-period`` iterations a hook writes the *exact* AP-loss of the training batch
(``1 - AP`` with the Heaviside step, not interpolated: ``ap_loss(..., step="heaviside",
interpolate=False)`` on the batch's detached logits and ranking labels, all images and classes
ranked together) to Detectron2's event storage as ``optim_study/ap_loss``; the run's
``metrics.json`` (Detectron2's ``JSONWriter``, same period) therefore holds every recorded value.

Part ``a`` (Fig. 8a): AP-loss vs iteration, one curve per method, all negatives kept.
Part ``b`` (Fig. 8b): the imbalance is varied by keeping only ``--negatives`` random background
anchors per image in the loss (re-drawn every iteration; the other background anchors are
ignored, label -1, as the paper's RPN proposals keep only some anchors). Each background anchor
is ``K`` negative entries of the ranking (one per class); the entries of the other classes of
positive anchors stay negatives. The final AP-loss of each method is plotted against the mean
number of background anchors kept per image. The level ``all`` is part ``a``'s run. With
subsampling, the recorded AP-loss ranks the entries the loss sees; the AP-loss over all
negatives is recorded too (``optim_study/ap_loss_all_negatives``).

Training goes through the project's :class:`ap_loss_d2.engine.Trainer` (Detectron2's
``DefaultTrainer``) with a study model :class:`OptimizationStudyRetinaNet` (an
``APLossRetinaNet`` that subsamples negatives and keeps the last batch for the hook) and the
hook :class:`ExactAPLossHook`. Runs are executed one after the other in this process.

Outputs in ``--output-dir``::

    fig8a.png / fig8a.md / fig8a.json    AP-loss curves and final values (part a)
    fig8b.png / fig8b.md / fig8b.json    final AP-loss vs negatives per image (part b)
    runs/<method>_neg<N|all>/            one Detectron2 output dir per run: config.yaml,
                                         metrics.json, study_run.json (settings),
                                         study_result.json (the recorded curve)

Resuming: a run whose ``study_result.json`` exists (same settings) is skipped; an interrupted
run continues from its last checkpoint (``SOLVER.CHECKPOINT_PERIOD`` = ``--checkpoint-period``);
checkpoints are deleted when a run finishes unless ``--keep-checkpoints``. A run directory with
other settings is refused.

"Final AP-loss" = mean of the last ``--final-fraction`` (default 20%) of the recorded values
(the per-batch value is noisy); the last value is reported too.

Default setting (CPU, minutes per run on 2 cores): the quick config
``configs/quick/retinanet_R_18_FPN_1000it_synth_ap.yaml`` (ResNet-18-FPN from scratch,
``synth_shapes_train``, 192 px, batch 8, about 4.5k anchors per image) for ``--iters 200``
(``SOLVER.STEPS``/``WARMUP_ITERS`` scaled from the config's schedule). Example::

    python -m ap_loss_d2.studies.optimization --output-dir output/optimization_study \\
        --iters 200 --methods ap ap_approx ap_hinge --negatives 100 300 1000 all

Trailing ``KEY VALUE`` pairs are config overrides applied to every run, after the study's own.
"""
import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.engine import HookBase, hooks
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, get_event_storage
from detectron2.utils.logger import setup_logger

from ..losses import cls_loss_names
from ..engine import Trainer, get_ap_loss_cfg, validate_cfg
from ..losses import ap_loss
from ..modeling import APLossRetinaNet, ranking_targets
from .common import metrics_by_iteration

__all__ = [
    "AP_LOSS_KEY",
    "ExactAPLossHook",
    "OptimizationStudyRetinaNet",
    "StudyTrainer",
    "add_optimization_study_config",
    "build_run_cfg",
    "main",
    "read_metrics",
    "run_one",
    "run_study",
]

logger = logging.getLogger("ap_loss_d2.optimization_study")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "quick" / "retinanet_R_18_FPN_1000it_synth_ap.yaml"
DEFAULT_METHODS = ("ap", "ap_approx", "ap_hinge")
DEFAULT_NEGATIVES = ("100", "300", "1000", "all")
METHOD_LABELS = {
    "ap": "AP-loss, error-driven update",
    "ap_approx": "AP-loss, approximate gradient",
    "ap_hinge": "AP-loss, structured hinge loss",
    "focal": "focal loss (reference)",
    "auc": "AUC-loss, error-driven update",
    "ce_ohem": "CE + OHEM (reference)",
}

#: Event-storage keys written by :class:`ExactAPLossHook`.
AP_LOSS_KEY = "optim_study/ap_loss"
AP_LOSS_ALL_KEY = "optim_study/ap_loss_all_negatives"
NEG_KEY = "optim_study/neg_anchors_per_image"

RUN_FILE = "study_run.json"
RESULT_FILE = "study_result.json"


# ------------------------------------------------------------------------------------------------
# Model, hook, trainer
# ------------------------------------------------------------------------------------------------


def add_optimization_study_config(cfg):
    """Add the study-only ``OPTIMIZATION_STUDY`` keys (read by the study's model and trainer)."""
    cfg.OPTIMIZATION_STUDY = CN()
    # Background anchors kept per image in the loss (random, re-drawn every iteration; the rest
    # are ignored); -1 keeps all.
    cfg.OPTIMIZATION_STUDY.NUM_NEGATIVES = -1
    # Record the exact AP-loss (and write metrics.json) every this many iterations.
    cfg.OPTIMIZATION_STUDY.RECORD_PERIOD = 5
    return cfg


@META_ARCH_REGISTRY.register()
class OptimizationStudyRetinaNet(APLossRetinaNet):
    """``APLossRetinaNet`` for the Fig. 8 study (not a training recipe).

    * ``num_negatives >= 0``: in each image only ``num_negatives`` background anchors, drawn at
      random every iteration, stay negatives; the other background anchors get label -1
      (ignored by every loss). Positive and ignored anchors are unchanged.
    * Keeps the last training batch's detached logits and ranking labels in ``last_batch``
      (``logits`` (N, R, K), ``targets`` used by the loss, ``targets_all`` before subsampling,
      ``neg_anchors_per_image``) for :class:`ExactAPLossHook`.
    """

    @configurable
    def __init__(self, *, num_negatives: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.num_negatives = int(num_negatives)
        self.last_batch = None

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["num_negatives"] = cfg.OPTIMIZATION_STUDY.NUM_NEGATIVES
        return ret

    def subsample_negatives(self, labels: torch.Tensor) -> torch.Tensor:
        """One image's anchor labels (R,) with all but ``num_negatives`` random background
        anchors set to -1."""
        background = torch.nonzero(labels == self.num_classes).squeeze(1)
        if self.num_negatives < 0 or background.numel() <= self.num_negatives:
            return labels
        drop = background[
            torch.randperm(background.numel(), device=labels.device)[self.num_negatives :]
        ]
        labels = labels.clone()
        labels[drop] = -1
        return labels

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        with torch.no_grad():
            targets_all = ranking_targets(torch.stack(gt_labels), self.num_classes)
            if self.num_negatives >= 0:
                gt_labels = [self.subsample_negatives(x) for x in gt_labels]
            stacked = torch.stack(gt_labels)
            self.last_batch = dict(
                logits=cat(pred_logits, dim=1).detach(),
                targets=ranking_targets(stacked, self.num_classes),
                targets_all=targets_all,
                neg_anchors_per_image=float((stacked == self.num_classes).sum()) / len(gt_labels),
            )
        return super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)


class ExactAPLossHook(HookBase):
    """Every ``period`` iterations (and at the last one): the exact AP-loss of the batch just
    trained on, ``ap_loss(logits, targets, step="heaviside", interpolate=False)`` on the
    detached logits, written to the event storage as ``optim_study/ap_loss`` (not smoothed).

    Also writes ``optim_study/neg_anchors_per_image`` and, when negatives are subsampled,
    ``optim_study/ap_loss_all_negatives`` (the same batch ranked with all its negatives). A
    batch without positives has no AP: nothing is written for it.
    """

    def __init__(self, period: int):
        self.period = int(period)

    def _due(self):
        it = self.trainer.iter
        return (it + 1) % self.period == 0 or it == self.trainer.max_iter - 1

    def after_step(self):
        if not self._due():
            return
        model = getattr(self.trainer.model, "module", self.trainer.model)
        batch = getattr(model, "last_batch", None)
        if batch is None:
            raise RuntimeError(
                "ExactAPLossHook needs a model that keeps `last_batch` (OptimizationStudyRetinaNet)"
            )
        if not bool((batch["targets"] == 1).any()):
            return
        storage = get_event_storage()
        logits = batch["logits"].double()  # the value in float64, not rounded to the logits' dtype
        value = ap_loss(logits, batch["targets"], step="heaviside", interpolate=False)
        storage.put_scalar(AP_LOSS_KEY, float(value), smoothing_hint=False)
        storage.put_scalar(NEG_KEY, batch["neg_anchors_per_image"], smoothing_hint=False)
        if model.num_negatives >= 0:
            value_all = ap_loss(logits, batch["targets_all"], step="heaviside", interpolate=False)
            storage.put_scalar(AP_LOSS_ALL_KEY, float(value_all), smoothing_hint=False)


class StudyTrainer(Trainer):
    """The project's Trainer with the study's hooks: no evaluation, :class:`ExactAPLossHook`
    right before the writers, and the writers (console + ``metrics.json``) every
    ``OPTIMIZATION_STUDY.RECORD_PERIOD`` iterations so each recorded value reaches the file."""

    def build_hooks(self):
        period = self.cfg.OPTIMIZATION_STUDY.RECORD_PERIOD
        ret = [
            h
            for h in super().build_hooks()
            if not isinstance(h, (hooks.EvalHook, hooks.PeriodicWriter))
        ]
        ret.append(ExactAPLossHook(period))
        ret.append(hooks.PeriodicWriter(self.build_writers(), period=period))
        return ret

    def build_writers(self):
        return [
            CommonMetricPrinter(self.max_iter),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
        ]


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------


def parse_negatives(values: Sequence) -> List[int]:
    """``["100", "all"]`` -> ``[100, -1]`` (``all`` or ``-1``: keep all)."""
    out = []
    for v in values:
        n = -1 if str(v).lower() == "all" else int(v)
        if n < -1:
            raise ValueError(f"negatives per image must be >= 0 or 'all', got {v!r}")
        out.append(n)
    return out


def negatives_label(n: int) -> str:
    return "all" if n < 0 else str(n)


def run_name(method: str, num_negatives: int) -> str:
    return f"{method}_neg{negatives_label(num_negatives)}"


def _scaled(value, max_iter, iters):
    return int(round(value * iters / max_iter))


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
    steps = []
    for s in cfg.SOLVER.STEPS:
        s = _scaled(s, base_iter, iters)
        if 0 < s < iters and (not steps or s > steps[-1]):
            steps.append(s)
    cfg.merge_from_list(
        [
            "MODEL.META_ARCHITECTURE",
            "OptimizationStudyRetinaNet",
            "MODEL.CLS_LOSS.NAME",
            method,
            "MODEL.CLS_LOSS.BOX_REG_WEIGHT",
            0.0,
            "OPTIMIZATION_STUDY.NUM_NEGATIVES",
            int(num_negatives),
            "OPTIMIZATION_STUDY.RECORD_PERIOD",
            int(record_period),
            "SOLVER.MAX_ITER",
            int(iters),
            "SOLVER.STEPS",
            tuple(steps),
            "SOLVER.WARMUP_ITERS",
            min(_scaled(cfg.SOLVER.WARMUP_ITERS, base_iter, iters), max(iters - 1, 0)),
            "SOLVER.CHECKPOINT_PERIOD",
            int(checkpoint_period),
            "TEST.EVAL_PERIOD",
            0,
            "SEED",
            int(seed),
            "OUTPUT_DIR",
            str(output_dir),
        ]
    )
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


def _write_json(path, data):
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


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
    result_path, run_path = run_dir / RESULT_FILE, run_dir / RUN_FILE
    if run_path.exists():
        previous = json.loads(run_path.read_text())
        if previous != settings:
            raise RuntimeError(
                f"{run_dir} holds a run with other settings ({previous}); use another --output-dir "
                f"or remove it"
            )
        if result_path.exists():
            logger.info("%s: finished before, skipped (%s)", run_dir.name, result_path)
            return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_path, settings)

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
    _write_json(result_path, result)
    if not keep_checkpoints:
        for p in run_dir.glob("model_*.pth"):
            p.unlink()
        if (run_dir / "last_checkpoint").exists():
            (run_dir / "last_checkpoint").unlink()
    del trainer
    return result


# ------------------------------------------------------------------------------------------------
# Study, report, plots
# ------------------------------------------------------------------------------------------------


def _label(method):
    return METHOD_LABELS.get(method, method)


def _fmt(v):
    return "n/a" if v is None else f"{v:.4f}"


def _common_settings(result):
    keys = ("config_file", "iters", "record_period", "seed", "opts", "final_fraction")
    return {k: result["settings"][k] for k in keys}


def report_fig8a(results: Dict[str, dict], output_dir: Path):
    """fig8a.json / .md / .png from ``{method: result}`` (all negatives kept). The JSON is
    ``{"study": "optimization", "part": "a", "figures": [...], "settings": {...},
    "methods": {method: {iterations, ap_loss, final_ap_loss, ...}}}``."""
    methods = {
        m: dict(
            iterations=r["iterations"],
            ap_loss=r["ap_loss"],
            final_ap_loss=r["final_ap_loss"],
            final_window=r["final_window"],
            last_ap_loss=r["last_ap_loss"],
            min_ap_loss=min(r["ap_loss"]) if r["ap_loss"] else None,
            run=run_name(m, -1),
        )
        for m, r in results.items()
    }
    any_r = next(iter(results.values()))
    data = dict(
        study="optimization",
        part="a",
        figures=["fig8a.png"],
        settings=_common_settings(any_r),
        methods=methods,
    )
    _write_json(output_dir / "fig8a.json", data)
    lines = [
        "# Fig. 8a: exact AP-loss (1 - AP, Heaviside, not interpolated) of the training batch",
        "",
        f"Box regression off; {any_r['settings']['iters']} iterations, recorded every "
        f"{any_r['settings']['record_period']}; config `{any_r['settings']['config_file']}`. "
        f"Final = mean of the last {int(any_r['settings']['final_fraction'] * 100)}% of the "
        "records.",
        "",
        "| method | final AP-loss | last | min | records |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, d in methods.items():
        lines.append(
            f"| {_label(m)} (`{m}`) | {_fmt(d['final_ap_loss'])} | {_fmt(d['last_ap_loss'])} | "
            f"{_fmt(d['min_ap_loss'])} | {len(d['ap_loss'])} |"
        )
    (output_dir / "fig8a.md").write_text("\n".join(lines) + "\n")

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, d in methods.items():
        ax.plot([i + 1 for i in d["iterations"]], d["ap_loss"], marker=".", ms=3, label=_label(m))
    ax.set_xlabel("iteration")
    ax.set_ylabel("AP-loss of the training batch")
    _finish_plot(plt, fig, ax, "Fig. 8a: convergence (classification only)", output_dir / "fig8a.png")
    return data


def report_fig8b(results: Dict[str, Dict[int, dict]], output_dir: Path):
    """fig8b.json / .md / .png from ``{method: {num_negatives: result}}``. The JSON is
    ``{"study": "optimization", "part": "b", "figures": [...], "settings": {...},
    "methods": {method: {"100" | ... | "all": {num_negatives, neg_anchors_per_image,
    final_ap_loss, final_ap_loss_all_negatives, last_ap_loss, run}}}}``."""
    methods = {
        m: {
            negatives_label(n): dict(
                num_negatives=n,
                neg_anchors_per_image=r["neg_anchors_per_image"],
                final_ap_loss=r["final_ap_loss"],
                final_ap_loss_all_negatives=r.get(
                    "final_ap_loss_all_negatives", r["final_ap_loss"]
                ),
                last_ap_loss=r["last_ap_loss"],
                run=run_name(m, n),
            )
            for n, r in per_level.items()
        }
        for m, per_level in results.items()
    }
    any_r = next(iter(next(iter(results.values())).values()))
    data = dict(
        study="optimization",
        part="b",
        figures=["fig8b.png"],
        settings=_common_settings(any_r),
        methods=methods,
    )
    _write_json(output_dir / "fig8b.json", data)
    first = next(iter(methods.values()))
    levels = list(first.keys())
    lines = [
        "# Fig. 8b: final AP-loss vs background anchors kept per image",
        "",
        "Final AP-loss of the training batch, ranked with the negatives the loss sees "
        "(in parentheses: with all negatives). The mean number of background anchors kept per "
        "image is in the header.",
        "",
        "| method | "
        + " | ".join(f"{lv} ({_fmt_count(first[lv]['neg_anchors_per_image'])})" for lv in levels)
        + " |",
        "|---|" + "---:|" * len(levels),
    ]
    for m, per_level in methods.items():
        cells = [
            f"{_fmt(d['final_ap_loss'])} ({_fmt(d['final_ap_loss_all_negatives'])})"
            for d in per_level.values()
        ]
        lines.append(f"| {_label(m)} (`{m}`) | " + " | ".join(cells) + " |")
    (output_dir / "fig8b.md").write_text("\n".join(lines) + "\n")

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, per_level in methods.items():
        pts = sorted(
            (d["neg_anchors_per_image"], d["final_ap_loss"])
            for d in per_level.values()
            if d["final_ap_loss"] is not None and d["neg_anchors_per_image"]
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=_label(m))
    ax.set_xscale("log")
    ax.set_xlabel("background anchors kept per image")
    ax.set_ylabel("final AP-loss")
    _finish_plot(plt, fig, ax, "Fig. 8b: imbalance", output_dir / "fig8b.png")
    return data


def _finish_plot(plt, fig, ax, title, path):
    """Common styling of the Fig. 8 plots (AP-loss axis in [0, 1]), saved to ``path``."""
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt_count(v):
    return "n/a" if v is None else f"{v:.0f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
        logger.info(
            "[%d/%d] %s: method %s, background anchors per image %s, %d iterations",
            i + 1,
            len(todo),
            name,
            m,
            negatives_label(n),
            iters,
        )
        r = run_one(config_file, m, n, iters, output_dir / "runs" / name, **common)
        results[m][n] = r
        logger.info(
            "[%d/%d] %s: final AP-loss %s (last %s)",
            i + 1,
            len(todo),
            name,
            _fmt(r["final_ap_loss"]),
            _fmt(r["last_ap_loss"]),
        )
    out = {}
    if "a" in parts:
        out["a"] = report_fig8a({m: results[m][-1] for m in methods}, output_dir)
    if "b" in parts:
        requested = parse_negatives(negatives)
        out["b"] = report_fig8b(
            {m: {n: results[m][n] for n in requested} for m in methods}, output_dir
        )
    return out


def build_parser():
    p = argparse.ArgumentParser(
        description="Fig. 8 of the AP-loss paper: AP-loss optimised by the error-driven update, "
        "the approximate gradient and the structured hinge loss (classification branch only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="yaml config of an APLossRetinaNet"
    )
    p.add_argument("--output-dir", default="output/optimization_study")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=cls_loss_names("retinanet"))
    p.add_argument("--parts", nargs="+", default=["a", "b"], choices=["a", "b"])
    p.add_argument(
        "--negatives",
        nargs="+",
        default=list(DEFAULT_NEGATIVES),
        help="part b: background anchors kept per image ('all' keeps all)",
    )
    p.add_argument("--iters", type=int, default=200, help="SOLVER.MAX_ITER of each run")
    p.add_argument(
        "--record-period", type=int, default=5, help="record the exact AP-loss every N iterations"
    )
    p.add_argument("--checkpoint-period", type=int, default=100)
    p.add_argument(
        "--final-fraction",
        type=float,
        default=0.2,
        help="final AP-loss = mean of this last fraction of the records",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="same initialisation and data order for every run"
    )
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument(
        "--num-threads",
        type=int,
        default=0,
        help="torch.set_num_threads for the runs (0: PyTorch's default); on a CPU shared "
        "with other jobs, 1 avoids oversubscription",
    )
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ..."
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    setup_logger(args.output_dir, name="detectron2")
    setup_logger(args.output_dir, name="ap_loss_d2")
    out = run_study(
        args.output_dir,
        config_file=args.config,
        methods=args.methods,
        parts=args.parts,
        negatives=args.negatives,
        iters=args.iters,
        record_period=args.record_period,
        checkpoint_period=args.checkpoint_period,
        seed=args.seed,
        opts=args.opts,
        final_fraction=args.final_fraction,
        keep_checkpoints=args.keep_checkpoints,
    )
    for part in sorted(out):
        print((Path(args.output_dir) / f"fig8{part}.md").read_text())
    return out


if __name__ == "__main__":
    main()
