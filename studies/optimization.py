"""Fig. 8 of the AP-loss paper: AP-loss optimised by the error-driven update, the approximate
gradient and the structured hinge loss, the classification branch of RetinaNet trained alone
(``python -m studies.optimization``; what it does, its outputs and resuming: docs/studies.md).

:class:`OptimizationStudyRetinaNet` keeps only the top-N anchors of a frozen proposer (or N random
background anchors) as valid samples and keeps the last batch; :class:`ExactAPLossHook` records
the exact AP-loss of that batch; :class:`StudyTrainer` (the project's ``Trainer``) runs the hook;
:func:`run_study` trains every (method, N) run in this process and writes ``fig8a`` / ``fig8b``.
"""
import hashlib
import logging
import math
import os
import pickle
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

from ap_loss_d2.engine import Trainer, get_ap_loss_cfg, validate_cfg
from ap_loss_d2.losses import ap_loss
from ap_loss_d2.losses.ranking_sets import ranking_targets
from ap_loss_d2.losses.registry import cls_loss_names
from ap_loss_d2.modeling import APLossRetinaNet
from .common import (
    REPO, check_run_settings, cls_loss_label, default_config, metrics_by_iteration, pyplot,
    read_json, scale_iter, scaled_schedule, study_argument_parser, write_json
)

#: Event-storage keys written by :class:`ExactAPLossHook`.
AP_LOSS_KEY = "optim_study/ap_loss"
AP_LOSS_ALL_KEY = "optim_study/ap_loss_all_negatives"
NEG_KEY = "optim_study/neg_anchors_per_image"
ANCHORS_KEY = "optim_study/anchors_per_image"

#: How the negatives of part b are chosen (``OPTIMIZATION_STUDY.NEGATIVE_MODE``).
NEGATIVE_MODES = ("proposals", "random")

#: How to obtain proposal weights (quoted by the errors).
PROPOSAL_WEIGHTS_HINT = (
    "give a checkpoint of a RetinaNet trained with the same config, e.g. "
    "output/main_job/model_final.pth written by `make main` (python -m studies.main_job; "
    "any run of the study's config works too), or use --negative-mode random"
)


def add_optimization_study_config(cfg):
    """Add the study-only ``OPTIMIZATION_STUDY`` keys (read by the study's model and trainer)."""
    cfg.OPTIMIZATION_STUDY = CN()
    # N of part b; -1 keeps all anchors. "proposals": the N anchors per image scored highest by
    # the frozen proposer, with the positives, are the valid samples; "random": N background
    # anchors per image drawn at random every iteration stay negatives. Other anchors: label -1.
    cfg.OPTIMIZATION_STUDY.NUM_NEGATIVES = -1
    # "proposals" (the paper's Fig. 8b: a pre-trained detector proposes anchors) or "random".
    cfg.OPTIMIZATION_STUDY.NEGATIVE_MODE = "proposals"
    # Checkpoint (.pth) of a RetinaNet of the same config: the frozen proposer of "proposals".
    cfg.OPTIMIZATION_STUDY.PROPOSAL_WEIGHTS = ""
    # Record the exact AP-loss (and write metrics.json) every this many iterations.
    cfg.OPTIMIZATION_STUDY.RECORD_PERIOD = 5
    return cfg


def file_fingerprint(path) -> dict:
    """``{"path", "size", "sha256"}`` of a file (the run fingerprint of weights it depends on)."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return dict(path=str(path.resolve()), size=path.stat().st_size, sha256=h.hexdigest())


def _checkpoint_state(path):
    """The ``model`` state dict of a ``.pth`` checkpoint (Detectron2's format, or a bare state
    dict), read with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"proposal weights {str(path)!r}: no such file; {PROPOSAL_WEIGHTS_HINT}")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(
            f"proposal weights {str(path)!r} cannot be read as a PyTorch checkpoint "
            f"({type(e).__name__}: {e}); {PROPOSAL_WEIGHTS_HINT}"
        ) from e
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"proposal weights {str(path)!r} hold no model state dict (expected a Detectron2 "
            f"checkpoint with a 'model' entry); {PROPOSAL_WEIGHTS_HINT}"
        )
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_proposer(cfg, weights):
    """The frozen proposer of ``NEGATIVE_MODE = "proposals"``: Detectron2's ``RetinaNet`` built
    from ``cfg`` (same backbone, head and anchors as the study model) with the checkpoint
    ``weights`` loaded strictly (every tensor present with the same shape, else ValueError
    listing the differences), in eval mode, ``requires_grad`` off, on ``cfg.MODEL.DEVICE``."""
    if not weights:
        raise ValueError(
            "OPTIMIZATION_STUDY.NEGATIVE_MODE 'proposals' needs proposal weights "
            f"(OPTIMIZATION_STUDY.PROPOSAL_WEIGHTS / --proposal-weights): {PROPOSAL_WEIGHTS_HINT}"
        )
    state = _checkpoint_state(weights)
    proposer = RetinaNet(cfg)
    own = proposer.state_dict()
    missing = sorted(set(own) - set(state))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or shapes:
        def _few(items):
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        raise ValueError(
            f"proposal weights {str(weights)!r} are not a RetinaNet of this config "
            f"(MODEL.RETINANET.NUM_CLASSES={cfg.MODEL.RETINANET.NUM_CLASSES}, "
            f"backbone {cfg.MODEL.BACKBONE.NAME}, anchors {list(cfg.MODEL.ANCHOR_GENERATOR.SIZES)}):"
            + (f" missing {len(missing)} tensors: {_few(missing)};" if missing else "")
            + (f" {len(shapes)} of other shapes: {_few(shapes)};" if shapes else "")
            + f" {PROPOSAL_WEIGHTS_HINT}"
        )
    proposer.load_state_dict({k: state[k] for k in own}, strict=True)
    proposer.to(cfg.MODEL.DEVICE)
    proposer.eval()
    proposer.requires_grad_(False)
    return proposer


@META_ARCH_REGISTRY.register()
class OptimizationStudyRetinaNet(APLossRetinaNet):
    """``APLossRetinaNet`` for the Fig. 8 study (not a training recipe).

    ``num_negatives = N >= 0`` selects the anchors of each image the loss sees (the others get
    label -1, ignored by every loss):

    * ``negative_mode="proposals"`` (paper Fig. 8b): the frozen ``proposer`` (a trained RetinaNet
      of the same config, eval mode, never updated: not a submodule, so not in the optimizer,
      the checkpoints or ``state_dict``) scores every anchor of the image by its objectness
      ``max_k sigmoid(logit_k)``; its top-N anchors (the proposals; box regression off, so the
      proposals are the anchors) united with the positive anchors are the valid samples. Anchors
      the matcher ignores (-1) stay ignored; a proposal that is background stays a negative.
    * ``negative_mode="random"``: only N background anchors, drawn at random every iteration,
      stay negatives (the paper's Table 8 "random sampling", not Fig. 8b).

    Positive anchors are always kept. ``num_negatives = -1`` keeps all anchors. Keeps the last
    training batch's detached logits and ranking labels in ``last_batch`` (``logits`` (N, R, K),
    ``targets`` used by the loss, ``targets_all`` before the selection, ``labels`` (N, R) anchor
    labels after the selection, ``proposal_scores`` (N, R) or None, ``neg_anchors_per_image``,
    ``anchors_per_image``) for :class:`ExactAPLossHook`.
    """

    @configurable
    def __init__(
        self,
        *,
        num_negatives: int = -1,
        negative_mode: str = "proposals",
        proposer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if negative_mode not in NEGATIVE_MODES:
            raise ValueError(
                f"negative_mode={negative_mode!r} (OPTIMIZATION_STUDY.NEGATIVE_MODE); valid: "
                f"{', '.join(NEGATIVE_MODES)}"
            )
        self.num_negatives = int(num_negatives)
        if negative_mode == "proposals" and self.num_negatives == 0:
            raise ValueError("proposals per image (OPTIMIZATION_STUDY.NUM_NEGATIVES) must be > 0 or -1 (all)")
        if negative_mode == "proposals" and self.num_negatives > 0 and proposer is None:
            raise ValueError(
                "negative_mode 'proposals' needs a proposer (OPTIMIZATION_STUDY.PROPOSAL_WEIGHTS): "
                + PROPOSAL_WEIGHTS_HINT
            )
        self.negative_mode = negative_mode
        # a plain attribute, not a registered submodule: frozen, outside the optimizer/checkpoints
        object.__setattr__(self, "proposer", proposer)
        self.last_batch = None
        self._proposal_scores = None

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        c = cfg.OPTIMIZATION_STUDY
        ret["num_negatives"] = c.NUM_NEGATIVES
        ret["negative_mode"] = c.NEGATIVE_MODE
        if c.NEGATIVE_MODE == "proposals" and c.NUM_NEGATIVES > 0:
            ret["proposer"] = load_proposer(cfg, c.PROPOSAL_WEIGHTS)
        return ret

    @property
    def uses_proposals(self) -> bool:
        return self.negative_mode == "proposals" and self.num_negatives > 0

    @torch.no_grad()
    def proposal_scores(self, images) -> torch.Tensor:
        """(N, R) objectness of every anchor by the frozen proposer: ``max_k sigmoid`` of its
        class logits on the same (normalised, padded) images, anchors in Detectron2's order."""
        proposer = self.proposer
        if proposer.device != self.device:
            proposer.to(self.device)
        proposer.eval()
        features = proposer.backbone(images.tensor)
        features = [features[f] for f in proposer.head_in_features]
        logits, _ = proposer.head(features)
        logits = cat([permute_to_N_HWA_K(x, proposer.num_classes) for x in logits], dim=1)
        return logits.sigmoid().amax(dim=2)

    def forward_training(self, images, features, predictions, gt_instances):
        self._proposal_scores = self.proposal_scores(images) if self.uses_proposals else None
        try:
            return super().forward_training(images, features, predictions, gt_instances)
        finally:
            self._proposal_scores = None

    def select_proposals(self, labels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """One image's anchor labels (R,) with every anchor that is neither among the top
        ``num_negatives`` of ``scores`` (R,) nor positive set to -1."""
        if scores.shape != labels.shape:
            raise ValueError(
                f"proposer scores {tuple(scores.shape)} do not match the anchors {tuple(labels.shape)}: "
                "the proposer must have the study model's anchors"
            )
        if self.num_negatives >= labels.numel():
            return labels
        keep = (labels >= 0) & (labels != self.num_classes)
        keep[torch.topk(scores, self.num_negatives, sorted=False).indices] = True
        labels = labels.clone()
        labels[~keep] = -1
        return labels

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
            scores = self._proposal_scores
            if self.uses_proposals:
                if scores is None:
                    raise RuntimeError("proposal scores missing: call the model, not losses() alone")
                gt_labels = [self.select_proposals(x, s) for x, s in zip(gt_labels, scores)]
            elif self.num_negatives >= 0:
                gt_labels = [self.subsample_negatives(x) for x in gt_labels]
            stacked = torch.stack(gt_labels)
            self.last_batch = dict(
                logits=cat(pred_logits, dim=1).detach(),
                targets=ranking_targets(stacked, self.num_classes), targets_all=targets_all,
                labels=stacked, proposal_scores=scores,
                neg_anchors_per_image=float((stacked == self.num_classes).sum()) / len(gt_labels),
                anchors_per_image=float(stacked.shape[1])
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
        storage.put_scalar(ANCHORS_KEY, batch["anchors_per_image"], smoothing_hint=False)
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


def negatives_label(n: int) -> str:
    return "all" if n < 0 else str(n)


def run_name(method: str, num_negatives: int, negative_mode: str = "random",
             from_snapshot: bool = False) -> str:
    """``<method>_neg<N>`` (random), ``<method>_prop<N>`` (proposals), ``<method>_negall`` (all
    anchors, either mode: part a's run); ``_snap`` appended for a run from the snapshot."""
    kind = "prop" if negative_mode == "proposals" and num_negatives >= 0 else "neg"
    return f"{method}_{kind}{negatives_label(num_negatives)}" + ("_snap" if from_snapshot else "")


def snapshot_name(method: str, num_negatives: int, iters: int, negative_mode: str) -> str:
    """The snapshot run's folder: ``snapshot_<method>_<prop|neg><N>_<iters>it``."""
    return f"snapshot_{run_name(method, num_negatives, negative_mode)}_{iters}it"


# ------------------------------------------------------------------------------------------------


def _label(method):
    label = cls_loss_label(method)
    return f"{label}, error-driven update" if method in ("ap", "auc") else label


def fmt_loss(v):
    """An AP-loss value with 4 decimals ("n/a" for None)."""
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
        study="optimization", part="a", figures=["fig8a.png"], settings=_common_settings(any_r),
        methods=methods
    )
    write_json(output_dir / "fig8a.json", data)
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
            f"| {_label(m)} (`{m}`) | {fmt_loss(d['final_ap_loss'])} | {fmt_loss(d['last_ap_loss'])} | "
            f"{fmt_loss(d['min_ap_loss'])} | {len(d['ap_loss'])} |"
        )
    (output_dir / "fig8a.md").write_text("\n".join(lines) + "\n")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, d in methods.items():
        ax.plot([i + 1 for i in d["iterations"]], d["ap_loss"], marker=".", ms=3, label=_label(m))
    ax.set_xlabel("iteration")
    ax.set_ylabel("AP-loss of the training batch")
    _finish_plot(plt, fig, ax, "Fig. 8a: convergence (classification only)", output_dir / "fig8a.png")
    return data


def _level_data(method, n, r, negative_mode, from_snapshot):
    anchors = r.get("anchors_per_image")
    proposals = None
    if negative_mode == "proposals":
        proposals = anchors if n < 0 else (min(n, anchors) if anchors else n)
    return dict(
        num_negatives=n, proposals_per_image=proposals, anchors_per_image=anchors,
        neg_anchors_per_image=r["neg_anchors_per_image"], final_ap_loss=r["final_ap_loss"],
        final_ap_loss_all_negatives=r.get("final_ap_loss_all_negatives", r["final_ap_loss"]),
        last_ap_loss=r["last_ap_loss"], run=run_name(method, n, negative_mode, from_snapshot)
    )


def report_fig8b(
    results: Dict[str, Dict[int, dict]],
    output_dir: Path,
    *,
    negative_mode: str = "random",
    from_snapshot: Optional[Dict[str, Dict[int, dict]]] = None,
    snapshot: Optional[dict] = None,
):
    """fig8b.json / .md / .png from ``{method: {N: result}}`` (default initialisation) and
    optionally ``from_snapshot`` (same shape: the runs initialised from ``snapshot``). The JSON
    is ``{"study": "optimization", "part": "b", "figures": [...], "negative_mode", "x_axis",
    "settings": {...}, "snapshot": {...} | null, "methods": {method: {"100" | ... | "all":
    {num_negatives, proposals_per_image, anchors_per_image, neg_anchors_per_image,
    final_ap_loss, final_ap_loss_all_negatives, last_ap_loss, run}}}, "methods_from_snapshot":
    same | null}``. x of the plot: ``proposals_per_image`` (proposals; ``all`` = every anchor)
    or ``neg_anchors_per_image`` (random)."""
    proposals = negative_mode == "proposals"

    def table(res, snap):
        return {
            m: {negatives_label(n): _level_data(m, n, r, negative_mode, snap) for n, r in per.items()}
            for m, per in res.items()
        }

    methods = table(results, False)
    methods_snap = table(from_snapshot, True) if from_snapshot is not None else None
    any_r = next(iter(next(iter(results.values())).values()))
    x_key = "proposals_per_image" if proposals else "neg_anchors_per_image"
    x_label = "proposals per image" if proposals else "random background anchors kept per image"
    settings = _common_settings(any_r)
    settings["negative_mode"] = negative_mode
    settings["proposal_weights"] = next(
        (r["settings"].get("proposal_weights") for per in results.values() for r in per.values()
         if r["settings"].get("proposal_weights")),
        None,
    )
    data = dict(
        study="optimization", part="b", figures=["fig8b.png"], negative_mode=negative_mode,
        x_axis=x_key, settings=settings, snapshot=snapshot, methods=methods,
        methods_from_snapshot=methods_snap
    )
    write_json(output_dir / "fig8b.json", data)
    first = next(iter(methods.values()))
    levels = list(first.keys())
    if proposals:
        lines = [
            "# Fig. 8b: final AP-loss vs proposals per image",
            "",
            "Valid samples of each image: the top-N anchors by the objectness of a frozen, "
            "pre-trained RetinaNet (regression off: the proposals are anchors) united with the "
            "positive anchors; the other anchors are ignored. Final AP-loss of the training "
            "batch over the valid samples (in parentheses: with all negatives). Header: N (mean "
            "background anchors among the valid samples per image).",
        ]
        weights = settings["proposal_weights"]
        if weights:
            lines += ["", f"Proposer: `{weights['path']}` (sha256 {weights['sha256'][:12]})."]
    else:
        lines = [
            "# Fig. 8b (random mode): final AP-loss vs background anchors kept per image",
            "",
            "RANDOM negatives (not the paper's Fig. 8b, which uses RPN proposals): N background "
            "anchors per image drawn at random every iteration. Final AP-loss of the training "
            "batch, ranked with the negatives the loss sees (in parentheses: with all negatives). "
            "The mean number of background anchors kept per image is in the header.",
        ]
    if snapshot is not None:
        lines += [
            "",
            f"Rows \"from snapshot\" (dashed in the plot): initialised from `{snapshot['run']}`, "
            f"trained from the default initialisation with `{snapshot['method']}` and "
            f"N = {negatives_label(snapshot['num_negatives'])} for {snapshot['iters']} iterations "
            "(its final AP-loss: "
            f"{fmt_loss(snapshot.get('final_ap_loss'))}).",
        ]
    lines += [
        "",
        "| method | "
        + " | ".join(f"{lv} ({_fmt_count(first[lv]['neg_anchors_per_image'])})" for lv in levels)
        + " |",
        "|---|" + "---:|" * len(levels),
    ]
    for table_, suffix in ((methods, ""), (methods_snap or {}, ", from snapshot")):
        for m, per_level in table_.items():
            cells = [
                f"{fmt_loss(per_level[lv]['final_ap_loss'])} "
                f"({fmt_loss(per_level[lv]['final_ap_loss_all_negatives'])})"
                if lv in per_level else "not run"
                for lv in levels
            ]
            lines.append(f"| {_label(m)} (`{m}`){suffix} | " + " | ".join(cells) + " |")
    (output_dir / "fig8b.md").write_text("\n".join(lines) + "\n")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {}
    for table_, style, suffix in ((methods, "-", ""), (methods_snap or {}, "--", " (from snapshot)")):
        for m, per_level in table_.items():
            pts = sorted(
                (d[x_key], d["final_ap_loss"])
                for d in per_level.values()
                if d["final_ap_loss"] is not None and d[x_key]
            )
            kw = {"color": colors[m]} if m in colors else {}
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                              label=_label(m) + suffix, **kw)
            colors.setdefault(m, line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("final AP-loss")
    title = "Fig. 8b: imbalance" + (
        " (top-N proposals of a frozen RetinaNet)" if proposals else " (RANDOM negatives)"
    )
    _finish_plot(plt, fig, ax, title, output_dir / "fig8b.png")
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
    ``CLS_LOSS.NAME = method``, ``AP_LOSS_RETINANET.BOX_REG_WEIGHT = 0``, N and the negative mode, the proposal
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
        config_file, method, num_negatives, iters, run_dir, negative_mode=negative_mode,
        proposal_weights=str(Path(proposal_weights).resolve()) if uses_proposals else "",
        init_weights=str(Path(init_weights).resolve()) if init_weights else "",
        record_period=record_period, checkpoint_period=checkpoint_period, seed=seed, opts=opts
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
        settings=settings, method=method, num_negatives=num_negatives,
        negative_mode=settings["negative_mode"],
        anchors_per_image=sum(anchors) / len(anchors) if anchors else None,
        iterations=[it for it, _ in points], ap_loss=values, final_ap_loss=final,
        final_window=window, last_ap_loss=values[-1] if values else None,
        neg_anchors_per_image=sum(negs) / len(negs) if negs else None
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
        negative_mode=negative_mode, proposal_weights=proposal_weights, record_period=record_period,
        checkpoint_period=checkpoint_period, seed=seed, opts=opts, final_fraction=final_fraction,
        keep_checkpoints=keep_checkpoints
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


def build_parser():
    p = study_argument_parser(
        "optimization",
        "Fig. 8 of the AP-loss paper: AP-loss optimised by the error-driven update, the "
        "approximate gradient and the structured hinge loss (classification branch only).",
        config=f"configs/{CONFIG_REL}, an APLossRetinaNet",
    )
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=cls_loss_names("retinanet"))
    p.add_argument("--parts", nargs="+", default=["a", "b"], choices=["a", "b"])
    p.add_argument(
        "--negatives",
        nargs="+",
        default=list(DEFAULT_NEGATIVES),
        help="part b: N per image, proposals (--negative-mode proposals) or random background "
        "anchors (random); 'all' keeps every anchor (part a's run)",
    )
    p.add_argument(
        "--negative-mode",
        default=DEFAULT_NEGATIVE_MODE,
        choices=NEGATIVE_MODES,
        help="part b: 'proposals' (the paper's Fig. 8b: the top-N anchors of a frozen pre-trained "
        "RetinaNet, --proposal-weights, united with the positives are the valid samples) or "
        "'random' (N random background anchors per image, re-drawn every iteration; Table 8's "
        "random sampling, not Fig. 8b)",
    )
    p.add_argument(
        "--proposal-weights",
        default=None,
        help="checkpoint of a RetinaNet trained with the same config, the frozen proposer "
        "(e.g. output/main_job/model_final.pth written by `make main`)",
    )
    p.add_argument(
        "--snapshot-proposals",
        default=None,
        help="the dashed lines: first train AP-loss with this N for --snapshot-iters, then run "
        "every (method, N) again initialised from that snapshot",
    )
    p.add_argument(
        "--snapshot-iters", type=int, default=None,
        help="iterations of the snapshot run (default: --iters)",
    )
    p.add_argument(
        "--snapshot-negatives", nargs="+", default=None,
        help="the N of --negatives run again from the snapshot (default: all of them)",
    )
    p.add_argument("--iters", type=int, default=200, help="SOLVER.MAX_ITER of each run")
    p.add_argument(
        "--record-period", type=int, default=5, help="record the exact AP-loss every N iterations"
    )
    p.add_argument("--checkpoint-period", type=int, default=100)
    p.add_argument(
        "--final-fraction", type=float, default=0.2,
        help="final AP-loss = mean of this last fraction of the records"
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
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    setup_logger(args.output_dir, name="detectron2")
    setup_logger(args.output_dir, name="ap_loss_d2")
    out = run_study(
        args.output_dir, config_file=args.config_file or default_config(CONFIG_REL),
        methods=args.methods, parts=args.parts, negatives=args.negatives,
        negative_mode=args.negative_mode, proposal_weights=args.proposal_weights,
        snapshot_proposals=args.snapshot_proposals, snapshot_iters=args.snapshot_iters,
        snapshot_negatives=args.snapshot_negatives, iters=args.iters,
        record_period=args.record_period, checkpoint_period=args.checkpoint_period, seed=args.seed,
        opts=args.opts, final_fraction=args.final_fraction, keep_checkpoints=args.keep_checkpoints
    )
    for part in sorted(out):
        print((Path(args.output_dir) / f"fig8{part}.md").read_text())
    return out


if __name__ == "__main__":
    main()
