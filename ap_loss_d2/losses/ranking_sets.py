"""Ranking sets: which anchors/RoIs x classes AP-/AUC-loss rank together (docs/ranking_sets.md).
:func:`ranking_targets` replicates every anchor/RoI per class (paper Fig. 3); :class:`RankingSets`
splits a batch into sets ranked separately, or ranks the images of several processes together
(exact, through :mod:`.distributed`). Needs only PyTorch.
"""
from typing import Callable, Optional, Sequence

import torch

from .distributed import group_size, ranking_set_group, ranking_set_layout, resolve_group, scale_gradient

__all__ = ["RankingSets", "ranking_targets"]


def ranking_targets(gt_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(..., R, K) int8 ranking targets of (..., R) labels (-1 ignored, 0..K-1 class, K
    background): 1 for the matched class, 0 for the others, -1 for every class of an ignored
    entry (paper Fig. 3)."""
    classes = torch.arange(num_classes, device=gt_labels.device)
    targets = (gt_labels[..., None] == classes).to(torch.int8)  # no boolean indexing: no host sync
    return torch.where((gt_labels < 0)[..., None], torch.full_like(targets, -1), targets)


class RankingSets:
    """The ranking sets of a batch: this process's images (``images_per_set=0``), the images of
    every process (``rank_across_processes``), or sets of ``S`` consecutive images (``n / S``
    sets of a process's ``n`` images, or ``S / n`` consecutive ranks together; anything else is a
    ValueError listing the valid sizes). The loss is the mean over this process's sets; a set
    ranked by ``G`` processes has its gradient scaled by ``G`` (:func:`.distributed.scale_gradient`).
    """

    def __init__(self, images_per_set: int = 0, rank_across_processes: bool = False,
                 images_per_process: Optional[int] = None, num_processes: Optional[int] = None):
        """``images_per_process`` (when known, e.g. ``SOLVER.IMS_PER_BATCH`` / processes) checks
        the set here against it and ``num_processes`` (None: the current world), else at the
        first call."""
        if isinstance(images_per_set, bool) or not isinstance(images_per_set, int) or images_per_set < 0:
            raise ValueError(
                f"images_per_ranking_set={images_per_set!r} must be an integer >= 0 (images ranked "
                "together; 0 = each process ranks its own images)"
            )
        if not isinstance(rank_across_processes, bool):
            raise ValueError(f"rank_across_processes={rank_across_processes!r} must be True or False")
        if rank_across_processes and images_per_set:
            raise ValueError(
                f"rank_across_processes=True (one ranking set = the whole global batch) and images_per_ranking_set="
                f"{images_per_set} both choose the ranking set; set only one of them (images_per_ranking_set=0 to "
                "rank the global batch, or rank_across_processes=False)"
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
        """``fn(logits, targets, stats=..., process_group=..., **options)`` (``ap_loss`` /
        ``auc_loss``) per set, averaged. ``logits``: (N, R, K), or (sum_i R_i, K) with
        ``entries_per_image``; ``targets`` of the same shape; ``stats`` gets the sums over the
        sets of ``num_pos`` and ``num_neg_nontrivial``."""
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
