"""Fig. 8 of the AP-loss paper: AP-loss optimised by the error-driven update, the approximate
gradient and the structured hinge loss, the classification branch of RetinaNet trained alone.

Details: docs/studies.md#fig-8-the-optimisation-methods-studiesoptimization."""
import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.engine import HookBase, hooks
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, get_event_storage
from detectron2.utils.logger import setup_logger

from ap_loss_d2.engine import SafeDetectionCheckpointer, Trainer, get_ap_loss_cfg, validate_cfg
from ap_loss_d2.losses import ap_loss
from ap_loss_d2.losses.ranking_sets import ranking_targets
from ap_loss_d2.losses.registry import cls_loss_names
from ap_loss_d2.modeling import APLossRetinaNet
from .common import (
    REPO, check_run_settings, cls_loss_label, metrics_by_iteration, read_json, save_figure, subplots,
    scale_iter, scaled_schedule, study_argument_parser, write_json
)

logger = logging.getLogger("ap_loss_d2.optimization_study")

#: Event-storage keys written by :class:`ExactAPLossHook`.
AP_LOSS_KEY = "optim_study/ap_loss"
AP_LOSS_ALL_KEY = "optim_study/ap_loss_all_negatives"
NEG_KEY = "optim_study/neg_anchors_per_image"
ANCHORS_KEY = "optim_study/anchors_per_image"
NEGATIVE_MODES = ("proposals", "random")
CONFIG_REL = "quick/retinanet_R_18_FPN_1000it_synth_ap.yaml"
DEFAULT_CONFIG = REPO / "configs" / CONFIG_REL
DEFAULT_METHODS = ("ap", "ap_approx", "ap_hinge")
DEFAULT_NEGATIVES = ("100", "300", "1000", "3000", "all")
SNAPSHOT_METHOD = "ap"  # trains the snapshot of the dashed lines (the paper's: AP-loss)
RUN_FILE = "study_run.json"
RESULT_FILE = "study_result.json"
PROPOSAL_WEIGHTS_HINT = (
    "give a checkpoint of a RetinaNet trained with the same config, e.g. "
    "output/main_job/<run>/model_final.pth written by `make main` (python -m studies.main_job; "
    "any run of the study's config works too), or use --negative-mode random"
)


def file_fingerprint(path) -> dict:
    """``{"path", "size", "sha256"}`` of a file (the run fingerprint of weights it depends on)."""
    path, h = Path(path), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return dict(path=str(path.resolve()), size=path.stat().st_size, sha256=h.hexdigest())


def load_proposer(cfg, weights):
    """The frozen RetinaNet proposer of the "proposals" mode, ``weights`` loaded strictly."""
    if not weights:
        raise ValueError("OPTIMIZATION_STUDY.NEGATIVE_MODE 'proposals' needs proposal weights "
                         f"(OPTIMIZATION_STUDY.PROPOSAL_WEIGHTS / --proposal-weights): {PROPOSAL_WEIGHTS_HINT}")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"proposal weights {str(weights)!r}: no such file; {PROPOSAL_WEIGHTS_HINT}")
    proposer = RetinaNet(cfg)
    try:  # weights only, named errors for an empty, foreign or NaN file
        state = SafeDetectionCheckpointer(proposer).read(str(weights))["model"]
    except ValueError as e:
        raise ValueError(f"proposal weights: {e}; {PROPOSAL_WEIGHTS_HINT}") from e
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    own = proposer.state_dict()
    missing = sorted(set(own) - set(state))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or shapes:
        def few(items):
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        raise ValueError(
            f"proposal weights {str(weights)!r} are not a RetinaNet of this config "
            f"(MODEL.RETINANET.NUM_CLASSES={cfg.MODEL.RETINANET.NUM_CLASSES}, "
            f"backbone {cfg.MODEL.BACKBONE.NAME}, anchors {list(cfg.MODEL.ANCHOR_GENERATOR.SIZES)}):"
            + (f" missing {len(missing)} tensors: {few(missing)};" if missing else "")
            + (f" {len(shapes)} of other shapes: {few(shapes)};" if shapes else "")
            + f" {PROPOSAL_WEIGHTS_HINT}")
    proposer.load_state_dict({k: torch.as_tensor(state[k]) for k in own}, strict=True)
    proposer.to(cfg.MODEL.DEVICE).eval().requires_grad_(False)
    return proposer


@META_ARCH_REGISTRY.register()
class OptimizationStudyRetinaNet(APLossRetinaNet):
    """``APLossRetinaNet`` whose loss sees only the positives and N selected negatives (docs/studies.md)."""

    @configurable
    def __init__(self, *, num_negatives: int = -1, negative_mode: str = "proposals",
                 proposer=None, **kwargs):
        super().__init__(**kwargs)
        if negative_mode not in NEGATIVE_MODES:
            raise ValueError(f"negative_mode={negative_mode!r} (OPTIMIZATION_STUDY.NEGATIVE_MODE); "
                             f"valid: {', '.join(NEGATIVE_MODES)}")
        self.num_negatives, self.negative_mode = int(num_negatives), negative_mode
        if negative_mode == "proposals" and self.num_negatives == 0:
            raise ValueError("proposals per image (OPTIMIZATION_STUDY.NUM_NEGATIVES) must be > 0 or -1 (all)")
        if self.uses_proposals and proposer is None:
            raise ValueError("negative_mode 'proposals' needs a proposer "
                             "(OPTIMIZATION_STUDY.PROPOSAL_WEIGHTS): " + PROPOSAL_WEIGHTS_HINT)
        object.__setattr__(self, "proposer", proposer)  # not a submodule: frozen, not saved
        self.last_batch = None
        self._proposal_scores = None

    @classmethod
    def from_config(cls, cfg):
        ret, c = super().from_config(cfg), cfg.OPTIMIZATION_STUDY
        ret.update(num_negatives=c.NUM_NEGATIVES, negative_mode=c.NEGATIVE_MODE)
        if c.NEGATIVE_MODE == "proposals" and c.NUM_NEGATIVES > 0:
            ret["proposer"] = load_proposer(cfg, c.PROPOSAL_WEIGHTS)
        return ret

    @property
    def uses_proposals(self) -> bool:
        return self.negative_mode == "proposals" and self.num_negatives > 0

    @torch.no_grad()
    def proposal_scores(self, images) -> torch.Tensor:
        """(N, R) objectness ``max_k sigmoid(logit_k)`` of every anchor by the proposer."""
        proposer = self.proposer.to(self.device).eval()
        features = proposer.backbone(images.tensor)
        logits, _ = proposer.head([features[f] for f in proposer.head_in_features])
        logits = cat([permute_to_N_HWA_K(x, proposer.num_classes) for x in logits], dim=1)
        return logits.sigmoid().amax(dim=2)

    def forward_training(self, images, features, predictions, gt_instances):
        self._proposal_scores = self.proposal_scores(images) if self.uses_proposals else None
        try:
            return super().forward_training(images, features, predictions, gt_instances)
        finally:
            self._proposal_scores = None

    def select_proposals(self, labels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """One image's labels with every anchor neither positive nor in the top-N set to -1."""
        if scores.shape != labels.shape:
            raise ValueError(f"proposer scores {tuple(scores.shape)} do not match the anchors "
                             f"{tuple(labels.shape)}: the proposer must have the study model's anchors")
        if self.num_negatives >= labels.numel():
            return labels
        keep = (labels >= 0) & (labels != self.num_classes)
        keep[torch.topk(scores, self.num_negatives, sorted=False).indices] = True
        return torch.where(keep, labels, torch.full_like(labels, -1))

    def subsample_negatives(self, labels: torch.Tensor) -> torch.Tensor:
        """One image's labels with all but N random background anchors set to -1."""
        background = torch.nonzero(labels == self.num_classes).squeeze(1)
        if self.num_negatives < 0 or background.numel() <= self.num_negatives:
            return labels
        perm = torch.randperm(background.numel(), device=labels.device)
        labels = labels.clone()
        labels[background[perm[self.num_negatives:]]] = -1
        return labels

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        with torch.no_grad():
            targets_all = ranking_targets(torch.stack(gt_labels), self.num_classes)
            scores = self._proposal_scores
            if self.uses_proposals:
                if scores is None:
                    raise RuntimeError("proposal scores missing: call the model, not losses() alone")
                gt_labels = [self.select_proposals(x, s) for x, s in zip(gt_labels, scores)]
            elif self.num_negatives >= 0:
                gt_labels = [self.subsample_negatives(x) for x in gt_labels]
            stacked = torch.stack(gt_labels)
            self.last_batch = dict(
                logits=cat(pred_logits, dim=1).detach(), targets=ranking_targets(stacked, self.num_classes),
                targets_all=targets_all, labels=stacked, proposal_scores=scores,
                neg_anchors_per_image=float((stacked == self.num_classes).sum()) / len(gt_labels),
                anchors_per_image=float(stacked.shape[1]))
        return super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)


class ExactAPLossHook(HookBase):
    """Every ``period`` iterations: the exact AP-loss of the batch just trained on (``optim_study/*``)."""

    def __init__(self, period: int):
        self.period = int(period)

    def after_step(self):
        it = self.trainer.iter
        if (it + 1) % self.period and it != self.trainer.max_iter - 1:
            return
        model = getattr(self.trainer.model, "module", self.trainer.model)
        batch = getattr(model, "last_batch", None)
        if batch is None:
            raise RuntimeError("ExactAPLossHook needs a model that keeps `last_batch` (OptimizationStudyRetinaNet)")
        if not bool((batch["targets"] == 1).any()):
            return
        storage = get_event_storage()
        logits = batch["logits"].double()  # the value in float64, not rounded to the logits' dtype
        put = lambda key, v: storage.put_scalar(key, float(v), smoothing_hint=False)  # noqa: E731
        put(AP_LOSS_KEY, ap_loss(logits, batch["targets"], step="heaviside", interpolate=False))
        put(NEG_KEY, batch["neg_anchors_per_image"])
        put(ANCHORS_KEY, batch["anchors_per_image"])
        if model.num_negatives >= 0:
            put(AP_LOSS_ALL_KEY, ap_loss(logits, batch["targets_all"], step="heaviside", interpolate=False))


class StudyTrainer(Trainer):
    """The project's Trainer without evaluation, with :class:`ExactAPLossHook` and its writers."""

    def build_hooks(self):
        period = self.cfg.OPTIMIZATION_STUDY.RECORD_PERIOD
        ret = [h for h in super().build_hooks() if not isinstance(h, (hooks.EvalHook, hooks.PeriodicWriter))]
        return ret + [ExactAPLossHook(period), hooks.PeriodicWriter(self.build_writers(), period=period)]

    def build_writers(self):
        return [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))]


def negatives_label(n: int) -> str:
    return "all" if n < 0 else str(n)


def run_name(method: str, num_negatives: int, negative_mode: str = "random",
             from_snapshot: bool = False) -> str:
    """``<method>_neg<N>`` (random), ``_prop<N>`` (proposals), ``_negall``; ``_snap`` appended."""
    kind = "prop" if negative_mode == "proposals" and num_negatives >= 0 else "neg"
    return f"{method}_{kind}{negatives_label(num_negatives)}" + ("_snap" if from_snapshot else "")


def parse_negatives(values: Sequence, negative_mode: str = "random") -> List[int]:
    """``["100", "all"]`` -> ``[100, -1]``; >= 0 ("random") or > 0 ("proposals"), or all."""
    out, low = [], 1 if negative_mode == "proposals" else 0
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


def build_run_cfg(config_file, method, num_negatives, iters, output_dir, *, negative_mode="proposals",
                  proposal_weights="", init_weights="", record_period=5, checkpoint_period=100,
                  seed=0, opts=()):
    """The frozen config of one run: ``config_file``, the study's settings, ``opts``, ``init_weights``."""
    cfg = get_ap_loss_cfg()
    cfg.OPTIMIZATION_STUDY = CN()  # the study model's and trainer's keys
    cfg.OPTIMIZATION_STUDY.NUM_NEGATIVES = -1
    cfg.OPTIMIZATION_STUDY.NEGATIVE_MODE = "proposals"
    cfg.OPTIMIZATION_STUDY.PROPOSAL_WEIGHTS = ""
    cfg.OPTIMIZATION_STUDY.RECORD_PERIOD = 5
    cfg.merge_from_file(str(config_file))
    base = cfg.SOLVER.MAX_ITER
    warmup = min(scale_iter(cfg.SOLVER.WARMUP_ITERS, base, iters), max(iters - 1, 0))
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "OptimizationStudyRetinaNet", "MODEL.CLS_LOSS.NAME", method,
        "MODEL.AP_LOSS_RETINANET.BOX_REG_WEIGHT", 0.0, "OPTIMIZATION_STUDY.NUM_NEGATIVES", int(num_negatives),
        "OPTIMIZATION_STUDY.NEGATIVE_MODE", negative_mode,
        "OPTIMIZATION_STUDY.PROPOSAL_WEIGHTS", str(proposal_weights or ""),
        "OPTIMIZATION_STUDY.RECORD_PERIOD", int(record_period), "SOLVER.MAX_ITER", int(iters),
        "SOLVER.STEPS", scaled_schedule(cfg.SOLVER.STEPS, base, iters), "SOLVER.WARMUP_ITERS", warmup,
        "SOLVER.CHECKPOINT_PERIOD", int(checkpoint_period), "TEST.EVAL_PERIOD", 0, "SEED", int(seed),
        "OUTPUT_DIR", str(output_dir)])
    cfg.merge_from_list(list(opts))
    if init_weights:
        cfg.MODEL.WEIGHTS = str(init_weights)
    if cfg.MODEL.CLS_LOSS.NAME not in cls_loss_names("retinanet"):
        raise ValueError(f"method {cfg.MODEL.CLS_LOSS.NAME!r} is not one of {cls_loss_names('retinanet')}")
    validate_cfg(cfg)
    cfg.freeze()
    return cfg


def read_metrics(path) -> Dict[int, dict]:
    """``metrics.json`` as ``{iteration: record}``; empty when there is none."""
    return metrics_by_iteration(path)[0] if Path(path).exists() else {}


def _final(values, fraction):
    if not values:
        return None, 0
    k = max(1, int(math.ceil(len(values) * fraction)))
    return sum(values[-k:]) / k, k


def run_one(config_file, method, num_negatives, iters, run_dir, *, negative_mode="proposals",
            proposal_weights=None, init_weights=None, record_period=5, checkpoint_period=100, seed=0,
            opts=(), final_fraction=0.2, keep_checkpoints=False, keep_final=False):
    """Train, resume or load one (method, N) run; returns ``study_result.json``'s dict."""
    run_dir, num_negatives = Path(run_dir), int(num_negatives)
    uses_proposals = negative_mode == "proposals" and num_negatives >= 0
    settings = dict(
        config_file=str(Path(config_file).resolve()), method=method, num_negatives=num_negatives,
        negative_mode=negative_mode if num_negatives >= 0 else "all",  # part a's run in both modes
        proposal_weights=file_fingerprint(proposal_weights) if uses_proposals else None,
        init_weights=file_fingerprint(init_weights) if init_weights else None, iters=int(iters),
        record_period=int(record_period), seed=int(seed), opts=[str(o) for o in opts],
        final_fraction=float(final_fraction))
    result_path = run_dir / RESULT_FILE
    if check_run_settings(run_dir, settings, RUN_FILE, error=RuntimeError) and result_path.exists():
        logger.info("%s: finished before, skipped (%s)", run_dir.name, result_path)
        return read_json(result_path)
    cfg = build_run_cfg(
        config_file, method, num_negatives, iters, run_dir, negative_mode=negative_mode,
        proposal_weights=str(Path(proposal_weights).resolve()) if uses_proposals else "",
        init_weights=str(Path(init_weights).resolve()) if init_weights else "",
        record_period=record_period, checkpoint_period=checkpoint_period, seed=seed, opts=opts)
    (run_dir / "config.yaml").write_text(cfg.dump())
    metrics_path = run_dir / "metrics.json"
    previous = read_metrics(metrics_path)
    if not (run_dir / "last_checkpoint").exists() and metrics_path.exists():
        metrics_path.unlink()  # a stale file of a run interrupted before its first checkpoint
    seed_all_rng(seed)
    trainer = StudyTrainer(cfg)
    trainer.resume_or_load(resume=True)
    prior = {it: rec for it, rec in previous.items() if it < trainer.start_iter}
    if trainer.start_iter > 0:
        logger.info("%s: resuming at iteration %d", run_dir.name, trainer.start_iter)
    trainer.train()
    histories = trainer.storage.histories()

    def curve(key):
        points = {it: rec[key] for it, rec in prior.items() if key in rec}
        if key in histories:
            points.update((int(it), float(v)) for v, it in histories[key].values())
        return sorted(points.items())

    points = curve(AP_LOSS_KEY)
    iterations, values = [it for it, _ in points], [v for _, v in points]
    final, window = _final(values, final_fraction)
    negs, anchors = [v for _, v in curve(NEG_KEY)], [v for _, v in curve(ANCHORS_KEY)]
    result = dict(
        settings=settings, method=method, num_negatives=num_negatives,
        negative_mode=settings["negative_mode"],
        anchors_per_image=sum(anchors) / len(anchors) if anchors else None, iterations=iterations,
        ap_loss=values, final_ap_loss=final, final_window=window, last_ap_loss=values[-1] if values else None,
        neg_anchors_per_image=sum(negs) / len(negs) if negs else None)
    all_negatives = [v for _, v in curve(AP_LOSS_ALL_KEY)]
    if all_negatives:
        result["ap_loss_all_negatives"] = all_negatives
        result["final_ap_loss_all_negatives"] = _final(all_negatives, final_fraction)[0]
    write_json(result_path, result)
    if not keep_checkpoints:
        for p in run_dir.glob("model_*.pth"):
            if not (keep_final and p.name == "model_final.pth"):
                p.unlink()
        (run_dir / "last_checkpoint").unlink(missing_ok=True)
    return result


def _label(method):
    label = cls_loss_label(method)
    return f"{label}, error-driven update" if method in ("ap", "auc") else label


def fmt_loss(v):
    return "n/a" if v is None else f"{v:.4f}"


def _plot(series, path, title, xlabel, ylabel, log_x=False):
    """The Fig. 8 plot of ``[(xs, ys, style, label, color key)]``, AP-loss axis in [0, 1]."""
    fig, ax = subplots(figsize=(6.4, 4.2))
    colors = {}
    for xs, ys, style, label, key in series:
        kw = {"color": colors[key]} if key in colors else {}
        (line,) = ax.plot(xs, ys, style, marker="o" if log_x else ".", ms=None if log_x else 3,
                          label=label, **kw)
        colors.setdefault(key, line.get_color())
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def _settings(result):
    keys = ("config_file", "iters", "record_period", "seed", "opts", "final_fraction")
    return {k: result["settings"][k] for k in keys}


def report_fig8a(results: Dict[str, dict], output_dir: Path):
    """fig8a.json / .md / .png from ``{method: result}`` (all negatives kept)."""
    methods = {m: dict(iterations=r["iterations"], ap_loss=r["ap_loss"], final_ap_loss=r["final_ap_loss"],
                       final_window=r["final_window"], last_ap_loss=r["last_ap_loss"],
                       min_ap_loss=min(r["ap_loss"]) if r["ap_loss"] else None, run=run_name(m, -1))
               for m, r in results.items()}
    s = next(iter(results.values()))["settings"]
    data = dict(study="optimization", part="a", figures=["fig8a.png"], settings=_settings({"settings": s}),
                methods=methods)
    write_json(output_dir / "fig8a.json", data)
    lines = ["# Fig. 8a: exact AP-loss (1 - AP, Heaviside, not interpolated) of the training batch", "",
             f"Box regression off; {s['iters']} iterations, recorded every {s['record_period']}; config "
             f"`{s['config_file']}`. Final = mean of the last {int(s['final_fraction'] * 100)}% of the records.",
             "", "| method | final AP-loss | last | min | records |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {_label(m)} (`{m}`) | {fmt_loss(d['final_ap_loss'])} | {fmt_loss(d['last_ap_loss'])} | "
              f"{fmt_loss(d['min_ap_loss'])} | {len(d['ap_loss'])} |" for m, d in methods.items()]
    (output_dir / "fig8a.md").write_text("\n".join(lines) + "\n")
    _plot([([i + 1 for i in d["iterations"]], d["ap_loss"], "-", _label(m), m) for m, d in methods.items()],
          output_dir / "fig8a.png", "Fig. 8a: convergence (classification only)", "iteration",
          "AP-loss of the training batch")
    return data


def _level_data(method, n, r, negative_mode, from_snapshot):
    anchors = r.get("anchors_per_image")
    proposals = None
    if negative_mode == "proposals":
        proposals = anchors if n < 0 else (min(n, anchors) if anchors else n)
    return dict(num_negatives=n, proposals_per_image=proposals, anchors_per_image=anchors,
                neg_anchors_per_image=r["neg_anchors_per_image"], final_ap_loss=r["final_ap_loss"],
                final_ap_loss_all_negatives=r.get("final_ap_loss_all_negatives", r["final_ap_loss"]),
                last_ap_loss=r["last_ap_loss"], run=run_name(method, n, negative_mode, from_snapshot))


def report_fig8b(results: Dict[str, Dict[int, dict]], output_dir: Path, *, negative_mode: str = "random",
                 from_snapshot: Optional[Dict[str, Dict[int, dict]]] = None, snapshot: Optional[dict] = None):
    """fig8b.json / .md / .png from ``{method: {N: result}}`` (and the snapshot runs); docs/studies.md."""
    proposals = negative_mode == "proposals"

    def table(res, snap):
        return {m: {negatives_label(n): _level_data(m, n, r, negative_mode, snap) for n, r in per.items()}
                for m, per in res.items()}

    methods = table(results, False)
    methods_snap = table(from_snapshot, True) if from_snapshot is not None else None
    runs = [r for per in results.values() for r in per.values()]
    x_key = "proposals_per_image" if proposals else "neg_anchors_per_image"
    settings = dict(_settings(runs[0]), negative_mode=negative_mode, proposal_weights=next(
        (r["settings"]["proposal_weights"] for r in runs if r["settings"].get("proposal_weights")), None))
    data = dict(study="optimization", part="b", figures=["fig8b.png"], negative_mode=negative_mode,
                x_axis=x_key, settings=settings, snapshot=snapshot, methods=methods,
                methods_from_snapshot=methods_snap)
    write_json(output_dir / "fig8b.json", data)
    first = next(iter(methods.values()))
    if proposals:
        w = settings["proposal_weights"]
        lines = ["# Fig. 8b: final AP-loss vs proposals per image", "",
                 "Valid samples: the top-N anchors of a frozen RetinaNet and the positives (docs/studies.md)."
                 + (f" Proposer: `{w['path']}` (sha256 {w['sha256'][:12]})." if w else "")]
    else:
        lines = ["# Fig. 8b (random mode): final AP-loss vs background anchors kept per image", "",
                 "RANDOM negatives (not the paper's Fig. 8b, which uses RPN proposals): N per image (docs/studies.md)."]
    lines[-1] += (" Final AP-loss of the training batch (in parentheses: with all negatives); header: N (mean "
                  "background anchors kept per image).")
    if snapshot is not None:
        lines += ["", f"Rows \"from snapshot\" (dashed): initialised from `{snapshot['run']}` (final AP-loss "
                      f"{fmt_loss(snapshot.get('final_ap_loss'))})."]
    count = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    lines += ["", "| method | " + " | ".join(f"{lv} ({count(d['neg_anchors_per_image'])})" for lv, d in first.items())
              + " |", "|---|" + "---:|" * len(first)]
    series = []
    for table_, suffix, style in ((methods, "", "-"), (methods_snap or {}, ", from snapshot", "--")):
        for m, per in table_.items():
            cells = [f"{fmt_loss(per[lv]['final_ap_loss'])} ({fmt_loss(per[lv]['final_ap_loss_all_negatives'])})"
                     if lv in per else "not run" for lv in first]
            lines.append(f"| {_label(m)} (`{m}`){suffix} | " + " | ".join(cells) + " |")
            pts = sorted((d[x_key], d["final_ap_loss"]) for d in per.values()
                         if d["final_ap_loss"] is not None and d[x_key])
            series.append(([p[0] for p in pts], [p[1] for p in pts], style,
                           _label(m) + (" (from snapshot)" if suffix else ""), m))
    (output_dir / "fig8b.md").write_text("\n".join(lines) + "\n")
    title = "Fig. 8b: imbalance" + (" (top-N proposals of a frozen RetinaNet)" if proposals else " (RANDOM negatives)")
    _plot(series, output_dir / "fig8b.png", title,
          "proposals per image" if proposals else "random background anchors kept per image",
          "final AP-loss", log_x=True)
    return data


def run_study(output_dir, *, config_file=DEFAULT_CONFIG, methods=DEFAULT_METHODS, parts=("a", "b"),
              negatives=DEFAULT_NEGATIVES, negative_mode="proposals", proposal_weights=None,
              snapshot_proposals=None, snapshot_iters=None, snapshot_negatives=None, iters=200,
              record_period=5, checkpoint_period=100, seed=0, opts=(), final_fraction=0.2,
              keep_checkpoints=False):
    """Run parts ``a`` and/or ``b`` and write their reports; returns ``{"a": ..., "b": ...}``."""
    output_dir = Path(output_dir)
    for m in methods:
        if m not in cls_loss_names("retinanet"):
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(cls_loss_names('retinanet'))}")
    if not set(parts) <= {"a", "b"} or not parts:
        raise ValueError(f"parts must be a non-empty subset of ('a', 'b'), got {parts!r}")
    if negative_mode not in NEGATIVE_MODES:
        raise ValueError(f"negative_mode={negative_mode!r}; valid: {', '.join(NEGATIVE_MODES)}")
    requested = list(dict.fromkeys(parse_negatives(negatives, negative_mode))) if "b" in parts else []
    levels = requested + ([-1] if "a" in parts and -1 not in requested else [])
    snapshot, snap_levels = None, requested
    if snapshot_proposals is not None:
        if "b" not in parts:
            raise ValueError("snapshot runs (--snapshot-proposals) belong to part b; add 'b' to the parts")
        snap_n = parse_negatives([snapshot_proposals], negative_mode)[0]
        snap_iters = int(iters if snapshot_iters is None else snapshot_iters)
        if snap_iters <= 0:
            raise ValueError(f"snapshot iterations must be > 0, got {snapshot_iters!r}")
        if snapshot_negatives is not None:
            snap_levels = list(dict.fromkeys(parse_negatives(snapshot_negatives, negative_mode)))
            extra = [negatives_label(n) for n in snap_levels if n not in requested]
            if extra or not snap_levels:
                raise ValueError(
                    f"--snapshot-negatives must be a non-empty subset of --negatives "
                    f"({', '.join(negatives_label(n) for n in requested)}); not in it: {', '.join(extra)}")
        snapshot = dict(method=SNAPSHOT_METHOD, num_negatives=snap_n, iters=snap_iters,
                        run=f"snapshot_{run_name(SNAPSHOT_METHOD, snap_n, negative_mode)}_{snap_iters}it")
    elif snapshot_iters is not None or snapshot_negatives is not None:
        raise ValueError("--snapshot-iters / --snapshot-negatives need --snapshot-proposals "
                         "(the N of the snapshot run)")
    if negative_mode == "proposals" and (any(n >= 0 for n in levels) or (snapshot or {}).get("num_negatives", -1) >= 0):
        if not proposal_weights:
            raise ValueError(f"--negative-mode proposals needs --proposal-weights: {PROPOSAL_WEIGHTS_HINT}")
        # fail before any training on a missing file or another architecture
        load_proposer(build_run_cfg(config_file, methods[0], -1, iters, output_dir, negative_mode="random",
                                    seed=seed, opts=opts), proposal_weights)
    else:
        proposal_weights = None
    output_dir.mkdir(parents=True, exist_ok=True)
    common = dict(negative_mode=negative_mode, proposal_weights=proposal_weights, record_period=record_period,
                  checkpoint_period=checkpoint_period, seed=seed, opts=opts, final_fraction=final_fraction,
                  keep_checkpoints=keep_checkpoints)
    todo = [(m, n, False) for m in methods for n in levels]
    todo += [(m, n, True) for m in methods for n in snap_levels] if snapshot else []
    total = len(todo) + (snapshot is not None)
    what = "proposals" if negative_mode == "proposals" else "random background anchors"
    results = {False: {m: {} for m in methods}, True: {m: {} for m in methods}}
    done = 0
    for m, n, snap in todo:
        if snap and "weights" not in snapshot:
            done += 1
            logger.info("[%d/%d] %s: snapshot, method %s, %s per image %s, %d iterations", done, total,
                        snapshot["run"], SNAPSHOT_METHOD, what, negatives_label(snapshot["num_negatives"]),
                        snapshot["iters"])
            run_dir = output_dir / "runs" / snapshot["run"]
            r = run_one(config_file, SNAPSHOT_METHOD, snapshot["num_negatives"], snapshot["iters"], run_dir,
                        **common, keep_final=True)
            if not (run_dir / "model_final.pth").is_file():
                raise RuntimeError(f"snapshot run {run_dir} finished but has no model_final.pth (deleted?); "
                                   "delete that directory to train the snapshot again")
            snapshot.update(weights=str(run_dir / "model_final.pth"), final_ap_loss=r["final_ap_loss"])
        done += 1
        name = run_name(m, n, negative_mode, from_snapshot=snap)
        logger.info("[%d/%d] %s: method %s, %s per image %s, %d iterations%s", done, total, name, m, what,
                    negatives_label(n), iters, " from the snapshot" if snap else "")
        r = run_one(config_file, m, n, iters, output_dir / "runs" / name,
                    init_weights=snapshot["weights"] if snap else None, **common)
        results[snap][m][n] = r
        logger.info("[%d/%d] %s: final AP-loss %s (last %s)", done, total, name, fmt_loss(r["final_ap_loss"]),
                    fmt_loss(r["last_ap_loss"]))
    out = {}
    if "a" in parts:
        out["a"] = report_fig8a({m: results[False][m][-1] for m in methods}, output_dir)
    if "b" in parts:
        pick = lambda res, ns: {m: {n: res[m][n] for n in ns} for m in methods}  # noqa: E731
        out["b"] = report_fig8b(pick(results[False], requested), output_dir, negative_mode=negative_mode,
                                from_snapshot=pick(results[True], snap_levels) if snapshot else None,
                                snapshot=snapshot)
    return out


def build_parser():
    p = study_argument_parser("optimization", __doc__.split("\n\n")[0],
                              config=f"configs/{CONFIG_REL}, an APLossRetinaNet")
    add = p.add_argument
    add("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=cls_loss_names("retinanet"))
    add("--parts", nargs="+", default=["a", "b"], choices=["a", "b"])
    add("--negatives", nargs="+", default=list(DEFAULT_NEGATIVES),
        help="part b: N per image (proposals or random background anchors); 'all' keeps every anchor")
    add("--negative-mode", default="proposals", choices=NEGATIVE_MODES,
        help="part b: the top-N anchors of a frozen RetinaNet (--proposal-weights; the paper's "
             "Fig. 8b) or N random background anchors (Table 8's random sampling)")
    add("--proposal-weights", default=None,
        help="checkpoint of a RetinaNet of the same config, e.g. output/main_job/<run>/model_final.pth")
    add("--snapshot-proposals", default=None,
        help="the dashed lines: train AP-loss with this N first, then rerun every (method, N) from it")
    add("--snapshot-iters", type=int, default=None, help="iterations of the snapshot run (default: --iters)")
    add("--snapshot-negatives", nargs="+", default=None,
        help="the N of --negatives run again from the snapshot (default: all of them)")
    add("--iters", type=int, default=200, help="SOLVER.MAX_ITER of each run")
    add("--record-period", type=int, default=5, help="record the exact AP-loss every N iterations")
    add("--checkpoint-period", type=int, default=100)
    add("--final-fraction", type=float, default=0.2, help="final AP-loss = mean of this last fraction")
    add("--seed", type=int, default=0, help="same initialisation and data order for every run")
    add("--keep-checkpoints", action="store_true")
    add("--num-threads", type=int, default=0,
        help="torch.set_num_threads for the runs (0: PyTorch's default; 1 on a shared CPU)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    for name in ("detectron2", "ap_loss_d2"):
        setup_logger(args.output_dir, name=name)
    keys = ("methods", "parts", "negatives", "negative_mode", "proposal_weights", "snapshot_proposals",
            "snapshot_iters", "snapshot_negatives", "iters", "record_period", "checkpoint_period", "seed",
            "opts", "final_fraction", "keep_checkpoints")
    out = run_study(args.output_dir, config_file=args.config_file or DEFAULT_CONFIG,
                    **{k: getattr(args, k) for k in keys})
    for part in sorted(out):
        print((Path(args.output_dir) / f"fig8{part}.md").read_text())
    return out


if __name__ == "__main__":
    main()
