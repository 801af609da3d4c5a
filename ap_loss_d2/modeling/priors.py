"""SSD's default boxes ("priors", Liu et al., ECCV 2016, Sec. 2.2) as a Detectron2 anchor
generator (``MODEL.ANCHOR_GENERATOR.NAME: SSDPriorGenerator``).

Per level ``l`` with min size ``s_l``, max size ``s'_l`` and step ``t_l``, every cell ``(i, j)``
(column, row) holds, centred at ``((i + 0.5) t_l, (j + 0.5) t_l)`` in input pixels:

* a square of side ``s_l``;
* a square of side ``sqrt(s_l s'_l)``;
* for each aspect ratio ``a`` of the level, boxes ``s_l sqrt(a) x s_l / sqrt(a)`` and
  ``s_l / sqrt(a) x s_l sqrt(a)`` (width x height).

Detectron2's ``DefaultAnchorGenerator`` crosses every size with every ratio and cannot express
the extra square. SSD512 (VOC, ``ap_loss_d2.config.SSD512_PRIORS``): 24,564 priors at 512x512.

Clipping: priors are not clipped to the image by default (``MODEL.SSD.PRIOR_CLIP: False``), as
the original Caffe SSD512 (``clip: false``) and Detectron2's anchors; the box deltas are encoded
against the unclipped box either way.
"""
import math
from typing import List, Sequence

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import ANCHOR_GENERATOR_REGISTRY, BufferList
from detectron2.structures import Boxes

__all__ = ["SSDPriorGenerator", "ssd_cell_priors"]


def ssd_cell_priors(min_size: float, max_size: float, aspect_ratios: Sequence[float]) -> torch.Tensor:
    """``(2 + 2 len(aspect_ratios), 4)`` XYXY priors of one cell centred at (0, 0), in SSD's
    order: ``s``, ``sqrt(s s')``, then ``a``, ``1/a`` for each ratio ``a``."""
    sides = [(min_size, min_size), (math.sqrt(min_size * max_size),) * 2]
    for a in aspect_ratios:
        r = math.sqrt(a)
        sides += [(min_size * r, min_size / r), (min_size / r, min_size * r)]
    return torch.tensor([[-w / 2, -h / 2, w / 2, h / 2] for w, h in sides], dtype=torch.float32)


@ANCHOR_GENERATOR_REGISTRY.register()
class SSDPriorGenerator(nn.Module):
    """SSD's priors (see the module doc); the interface of Detectron2's ``DefaultAnchorGenerator``
    (``forward(features) -> list[Boxes]``, ``num_cell_anchors``, ``num_anchors``, ``box_dim``)."""

    box_dim: torch.jit.Final[int] = 4

    @configurable
    def __init__(
        self,
        *,
        min_sizes: Sequence[float],
        max_sizes: Sequence[float],
        steps: Sequence[float],
        aspect_ratios: Sequence[Sequence[float]],
        offset: float = 0.5,
        clip_size: float = 0.0,
    ):
        """
        Args:
            min_sizes, max_sizes, steps: per level, in input pixels.
            aspect_ratios: per level, the ratios ``a >= 1`` (each adds ``a`` and ``1/a``); one
                list for all levels is repeated.
            offset: cell centres at ``(i + offset) * step`` (SSD: 0.5).
            clip_size: clip the priors to ``[0, clip_size]`` (0: no clipping, as SSD512).
        """
        super().__init__()
        n = len(min_sizes)
        if len(aspect_ratios) == 1:
            aspect_ratios = list(aspect_ratios) * n
        if not n or len(max_sizes) != n or len(steps) != n or len(aspect_ratios) != n:
            raise ValueError(
                f"SSDPriorGenerator: min_sizes ({n}), max_sizes ({len(max_sizes)}), steps ({len(steps)}) "
                f"and aspect_ratios ({len(aspect_ratios)}) must give one entry per feature level "
                "(MODEL.SSD.PRIOR_MIN_SIZES / PRIOR_MAX_SIZES / PRIOR_STEPS / PRIOR_ASPECT_RATIOS)"
            )
        for lo, hi, ratios in zip(min_sizes, max_sizes, aspect_ratios):
            if not 0 < lo <= hi or any(not a >= 1 for a in ratios):
                raise ValueError(
                    f"SSDPriorGenerator: level with min size {lo}, max size {hi}, ratios {list(ratios)}: "
                    "need 0 < min <= max and ratios >= 1 (each adds a and 1/a)"
                )
        self.strides = [float(s) for s in steps]
        self.num_features = n
        self.offset = float(offset)
        self.clip_size = float(clip_size)
        self.cell_anchors = BufferList(
            [ssd_cell_priors(lo, hi, ratios) for lo, hi, ratios in zip(min_sizes, max_sizes, aspect_ratios)]
        )

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        s = cfg.MODEL.SSD
        return {
            "min_sizes": s.PRIOR_MIN_SIZES,
            "max_sizes": s.PRIOR_MAX_SIZES,
            "steps": s.PRIOR_STEPS,
            "aspect_ratios": s.PRIOR_ASPECT_RATIOS,
            "clip_size": float(cfg.AP_LOSS_INPUT.FIXED_SIZE) if s.PRIOR_CLIP else 0.0,
        }

    @property
    def num_cell_anchors(self) -> List[int]:
        """Priors per cell of each level."""
        return [len(c) for c in self.cell_anchors]

    @property
    def num_anchors(self) -> List[int]:
        """Priors per cell of each level (Detectron2's name)."""
        return self.num_cell_anchors

    def forward(self, features: List[torch.Tensor]) -> List[Boxes]:
        """``features``: per level ``(N, C, H_l, W_l)`` -> per level ``Boxes`` of
        ``H_l * W_l * A_l`` priors, cell-major (row, column, then the cell's priors)."""
        if len(features) != self.num_features:
            raise ValueError(
                f"SSDPriorGenerator has {self.num_features} levels but got {len(features)} feature maps; "
                "give MODEL.SSD.PRIOR_* one entry per MODEL.SSD.IN_FEATURES"
            )
        out = []
        for x, stride, cell in zip(features, self.strides, self.cell_anchors):
            h, w = x.shape[-2:]
            ys = (torch.arange(h, device=cell.device, dtype=torch.float32) + self.offset) * stride
            xs = (torch.arange(w, device=cell.device, dtype=torch.float32) + self.offset) * stride
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
            boxes = (centres + cell.view(1, -1, 4)).reshape(-1, 4)
            if self.clip_size > 0:
                boxes = boxes.clamp(0.0, self.clip_size)
            out.append(Boxes(boxes))
        return out
