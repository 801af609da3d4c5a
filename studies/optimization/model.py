"""The Fig. 8 study's model, hook and trainer (see :mod:`studies.optimization`):
:class:`OptimizationStudyRetinaNet` keeps only the top-N anchors of a frozen proposer (or N random
background anchors) as valid samples and keeps the last batch, :func:`load_proposer` builds the
frozen proposer from a checkpoint,
:class:`ExactAPLossHook` records the exact AP-loss of that batch, :class:`StudyTrainer` runs the
hook and writes every recorded value to ``metrics.json``."""
import hashlib
import os
import pickle
from pathlib import Path

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.engine import HookBase, hooks
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, get_event_storage

from ap_loss_d2.engine import Trainer
from ap_loss_d2.losses import ap_loss
from ap_loss_d2.losses.ranking_sets import ranking_targets
from ap_loss_d2.modeling import APLossRetinaNet

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
                targets=ranking_targets(stacked, self.num_classes),
                targets_all=targets_all,
                labels=stacked,
                proposal_scores=scores,
                neg_anchors_per_image=float((stacked == self.num_classes).sum()) / len(gt_labels),
                anchors_per_image=float(stacked.shape[1]),
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
