"""Ranking sets: which anchors/RoIs x classes are ranked together by AP-/AUC-loss. Needs only
PyTorch.

* :func:`ranking_targets` replicates every anchor/RoI per class (paper Fig. 3);
* :class:`RankingSets` splits a batch into sets of images ranked separately, or ranks the
  images of several processes together (exact, through :mod:`.distributed`), and averages the
  sets' losses so that DistributedDataParallel's update is the mean over every set of the
  global batch of the single-process gradient of that set.
"""
from typing import Callable, Optional, Sequence

import torch

from .distributed import group_size, ranking_set_group, ranking_set_layout, resolve_group, scale_gradient

__all__ = ["RankingSets", "ranking_targets"]


def ranking_targets(gt_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Replicate each anchor/RoI per class and label it for ranking (paper Fig. 3).

    Args:
        gt_labels: (..., R) int labels, -1 ignored, 0..K-1 foreground class, K background.
        num_classes: K.

    Returns:
        (..., R, K) int8 tensor: 1 for the matched class, 0 for the other classes and for
        background, -1 for every class of an ignored entry.
    """
    classes = torch.arange(num_classes, device=gt_labels.device)
    targets = (gt_labels[..., None] == classes).to(torch.int8)  # no boolean indexing: no host sync
    return torch.where((gt_labels < 0)[..., None], torch.full_like(targets, -1), targets)


class RankingSets:
    """The ranking sets of a batch.

    * ``images_per_set=0`` and ``rank_across_processes=False``: one set = this process's images;
    * ``rank_across_processes=True``: one set = the images of every process;
    * ``images_per_set=S``: sets of ``S`` consecutive images. A process holding ``n`` images
      splits them into ``n / S`` sets if ``S`` divides ``n``; if ``n`` divides ``S``, each
      ``S / n`` consecutive ranks rank their images together. Anything else raises a ValueError
      listing the valid sizes, at the first call (when the images per process are known).

    The loss is the mean over this process's sets of each set's loss. When ``G > 1`` processes
    rank a set together, each backpropagates its slice of the set's gradient and DDP averages
    over all processes, so the gradient (not the value) is scaled by ``G``.
    """

    def __init__(
        self,
        images_per_set: int = 0,
        rank_across_processes: bool = False,
        images_per_process: Optional[int] = None,
        num_processes: Optional[int] = None,
    ):
        """
        Args:
            images_per_set, rank_across_processes: the ranking set (see the class docstring).
            images_per_process: images each process holds per iteration, when known (yaml:
                ``SOLVER.IMS_PER_BATCH`` / processes): the set is then checked here, once,
                against it and ``num_processes`` (the current world when None); otherwise at
                the first call.
        """
        if isinstance(images_per_set, bool) or not isinstance(images_per_set, int) or images_per_set < 0:
            raise ValueError(
                f"images_per_ranking_set={images_per_set!r} must be an integer >= 0 (images ranked "
                "together; 0 = each process ranks its own images)"
            )
        if not isinstance(rank_across_processes, bool):
            raise ValueError(f"rank_across_processes={rank_across_processes!r} must be True or False")
        if rank_across_processes and images_per_set:
            raise ValueError(
                f"rank_across_processes=True (one ranking set = the whole global batch) and "
                f"images_per_ranking_set={images_per_set} both choose the ranking set; set only one "
                "of them (images_per_ranking_set=0 to rank the global batch, or "
                "rank_across_processes=False)"
            )
        self.images_per_set = images_per_set
        self.rank_across_processes = rank_across_processes
        if images_per_process is not None:
            self.check(images_per_process, num_processes)

    def check(self, images_per_process: int, num_processes: Optional[int] = None):
        """``(sets in a process, processes per set)``; ValueError saying why and listing the
        valid set sizes when ``images_per_set`` does not fit the layout."""
        world = group_size(resolve_group(True)) if num_processes is None else num_processes
        if not self.images_per_set:
            return 1, 1
        try:
            return ranking_set_layout(self.images_per_set, images_per_process, world)
        except ValueError as e:
            raise ValueError(
                f"images_per_ranking_set={self.images_per_set} (MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET) "
                f"with {images_per_process} image(s) per process on {world} process(es): {e}"
            ) from None

    def layout(self, num_images: int):
        """``(process group or None, sets in this process)`` for ``num_images`` per process."""
        if self.rank_across_processes:
            return resolve_group(True), 1
        if not self.images_per_set:
            return None, 1
        sets, processes = self.check(num_images)
        return ranking_set_group(processes), sets

    def __call__(
        self,
        fn: Callable,
        logits: torch.Tensor,
        targets: torch.Tensor,
        *,
        entries_per_image: Optional[Sequence[int]] = None,
        stats: Optional[dict] = None,
        **options,
    ) -> torch.Tensor:
        """``fn(logits, targets, stats=..., process_group=..., **options)`` per set, averaged.

        Args:
            fn: :func:`~ap_loss_d2.losses.ap_loss` or :func:`~ap_loss_d2.losses.auc_loss`.
            logits: (N, R, K) scores of N images, or (sum_i R_i, K) with ``entries_per_image``.
            targets: ranking targets of the same shape (:func:`ranking_targets`).
            entries_per_image: [R_1, ..., R_N] when the images' entries are concatenated.
            stats: optional dict, filled with the sums over the sets of ``num_pos`` and
                ``num_neg_nontrivial``.
        """
        sizes = [1] * logits.shape[0] if entries_per_image is None else [int(r) for r in entries_per_image]
        group, sets = self.layout(len(sizes))
        if sets == 1:
            parts = [(logits, targets)]
        else:
            per_set = len(sizes) // sets
            rows = [sum(sizes[k * per_set : (k + 1) * per_set]) for k in range(sets)]
            parts = list(zip(logits.split(rows, dim=0), targets.split(rows, dim=0)))
        losses, totals = [], {}
        for x, t in parts:
            part = {}
            losses.append(fn(x, t, stats=part, process_group=group, **options))
            for k in ("num_pos", "num_neg_nontrivial"):
                totals[k] = totals.get(k, 0) + part[k]
        if stats is not None:
            stats.update(totals)
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        return scale_gradient(loss, group_size(group))
