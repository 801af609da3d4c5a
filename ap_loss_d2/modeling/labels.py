"""Ranking labels of the paper's Fig. 3 and the ranking-loss call shared by the one-stage
(RetinaNet) and two-stage (Faster R-CNN box head) models."""
import torch

from detectron2.utils.events import get_event_storage

from ..losses import ap_loss, auc_loss
from ..losses.distributed import (
    group_size,
    ranking_set_group,
    ranking_set_layout,
    resolve_group,
    scale_gradient,
)


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


def ranking_loss(
    name,
    logits,
    gt_labels,
    num_classes,
    *,
    rank_across_processes=False,
    images_per_ranking_set=0,
    entries_per_image=None,
    **options,
):
    """AP-loss (``name="ap"``) or AUC-loss (``"auc"``) of per-class scores, ranked per ranking
    set: the entries (anchors/RoIs x classes) of the images of one set are ranked together.

    Ranking sets:

    * ``images_per_ranking_set=0`` and ``rank_across_processes=False``: one set = the images
      of this process (the default).
    * ``rank_across_processes=True``: one set = the images of all processes (the whole global
      batch).
    * ``images_per_ranking_set=S``: sets of ``S`` images. If a process holds ``n`` images and
      ``S`` divides ``n``, its images are split into ``n / S`` consecutive sets ranked
      separately; if ``n`` divides ``S``, each ``S / n`` consecutive ranks rank their images
      together, exactly (see :mod:`ap_loss_d2.losses.distributed`). Anything else is a
      ValueError.

    The loss is the mean over the sets of this process (1 set unless split) of each set's loss.
    When ``G > 1`` processes rank a set together, each backpropagates its slice of the set's
    gradient and DistributedDataParallel then averages over all ``W`` processes; the gradient
    (not the value) of the loss is therefore scaled by ``G``, so that the parameter update is
    the mean over all ranking sets of the whole batch of the single-process gradient of each
    set.

    Args:
        logits: (N, R, K) scores of N images, or (sum_i R_i, K) with ``entries_per_image``.
        gt_labels: (N, R) or (sum_i R_i,) labels as for :func:`ranking_targets`.
        num_classes: K.
        rank_across_processes: one ranking set = every process's images.
        images_per_ranking_set: images ranked together (0: this process's images).
        entries_per_image: [R_1, ..., R_N] when the images' entries are concatenated along
            dim 0; None when dim 0 indexes the images.
        options: ``delta``, ``step``, ``sigmoid_k`` (and ``interpolate`` for AP), see
            :func:`ap_loss_d2.losses.ap_loss`.

    Returns:
        The scalar loss. Writes ``cls_loss/num_pos`` and ``cls_loss/num_neg_nontrivial`` (of
        this process's ranking set(s)) to the event storage.
    """
    fn = {"ap": ap_loss, "auc": auc_loss}[name]
    targets = ranking_targets(gt_labels, num_classes)
    if rank_across_processes and images_per_ranking_set:
        raise ValueError(
            "rank_across_processes=True (one ranking set = the whole global batch) and "
            f"images_per_ranking_set={images_per_ranking_set} both set the ranking set; use one"
        )
    sizes = [1] * logits.shape[0] if entries_per_image is None else [int(r) for r in entries_per_image]
    if rank_across_processes:
        group = resolve_group(True)
        sets = 1
    elif images_per_ranking_set:
        try:
            sets, processes = ranking_set_layout(images_per_ranking_set, len(sizes), _world_size())
        except ValueError as e:
            raise ValueError(f"images_per_ranking_set={images_per_ranking_set}: {e}") from e
        group = ranking_set_group(processes)
    else:
        group, sets = None, 1

    if sets == 1:
        parts = [(logits, targets)]
    else:
        per_set = len(sizes) // sets
        rows = [sum(sizes[k * per_set : (k + 1) * per_set]) for k in range(sets)]
        parts = list(zip(logits.split(rows, dim=0), targets.split(rows, dim=0)))
    losses, num_pos, num_neg = [], 0, 0
    for x, t in parts:
        stats = {}
        losses.append(fn(x, t, stats=stats, process_group=group, **options))
        num_pos += stats["num_pos"]
        num_neg += stats["num_neg_nontrivial"]
    loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
    loss = scale_gradient(loss, group_size(group))
    storage = get_event_storage()
    storage.put_scalar("cls_loss/num_pos", num_pos)
    storage.put_scalar("cls_loss/num_neg_nontrivial", num_neg)
    return loss


def _world_size():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1
