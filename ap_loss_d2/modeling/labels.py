"""Ranking labels of the paper's Fig. 3 and the ranking-loss call shared by the one-stage
(RetinaNet) and two-stage (Faster R-CNN box head) models."""
import torch

from detectron2.utils.events import get_event_storage

from ..losses import ap_loss, auc_loss
from ..losses.distributed import resolve_group


def ranking_targets(gt_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Replicate each anchor/RoI per class and label it for ranking.

    Args:
        gt_labels: (..., R) int labels, -1 ignored, 0..K-1 foreground class, K background.
        num_classes: K.

    Returns:
        (..., R, K) int8 tensor: 1 for the matched class, 0 for the other classes and for
        background, -1 for every class of an ignored entry.
    """
    fg = (gt_labels >= 0) & (gt_labels < num_classes)
    targets = torch.zeros((*gt_labels.shape, num_classes), dtype=torch.int8, device=gt_labels.device)
    targets[gt_labels < 0] = -1
    targets[fg, gt_labels[fg]] = 1
    return targets


def ranking_loss(name, logits, gt_labels, num_classes, *, rank_across_processes=False, **options):
    """AP-loss (``name="ap"``) or AUC-loss (``"auc"``) of per-class scores, every entry of the
    batch (all images, anchors/RoIs and classes) ranked together.

    Args:
        logits: (..., R, K) scores.
        gt_labels: (..., R) labels as for :func:`ranking_targets`.
        num_classes: K.
        rank_across_processes: rank the entries of all processes together (exact).
        options: ``delta``, ``step``, ``sigmoid_k`` (and ``interpolate`` for AP), see
            :func:`ap_loss_d2.losses.ap_loss`.

    Returns:
        The scalar loss. Writes ``cls_loss/num_pos`` and ``cls_loss/num_neg_nontrivial`` to the
        event storage.
    """
    stats = {}
    fn = {"ap": ap_loss, "auc": auc_loss}[name]
    loss = fn(
        logits,
        ranking_targets(gt_labels, num_classes),
        stats=stats,
        process_group=resolve_group(rank_across_processes),
        **options,
    )
    storage = get_event_storage()
    storage.put_scalar("cls_loss/num_pos", stats["num_pos"])
    storage.put_scalar("cls_loss/num_neg_nontrivial", stats["num_neg_nontrivial"])
    return loss
