"""Ranking labels of the paper's Fig. 3, shared by the one- and two-stage models."""
import torch


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
