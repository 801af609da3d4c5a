"""VGG-16 backbone of SSD (Liu et al., ECCV 2016; paper Sec. 4.1.1).

Layout (SSD512): conv1_1 .. conv5_3 of VGG-16 (``features``, numbered as torchvision's
``vgg16().features``, pool3 with ``ceil_mode`` as SSD), pool5 3x3 / stride 1 / pad 1, fc6 as a
3x3 convolution with dilation 6, fc7 as 1x1, then the extra layers conv8_1/conv8_2 ..
conv12_1/conv12_2. An L2 normalisation with a learned per-channel scale (initialised at 20)
rescales conv4_3 (the paper's "additional layer ... to scale the feature"). Outputs at 512x512:
conv4_3 64, conv7 32, conv8_2 16, conv9_2 8, conv10_2 4, conv11_2 2, conv12_2 1 cells.

Convert ImageNet weights once (the user downloads torchvision's ``vgg16-397923af.pth``)::

    python tools/convert_vgg16_to_d2.py vgg16-397923af.pth vgg16_ssd_d2.pth

and set ``MODEL.WEIGHTS vgg16_ssd_d2.pth``.
"""
import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["L2Norm", "VGG16SSD", "build_vgg16_ssd_backbone", "OUTPUT_NAMES"]

#: VGG-16 conv widths per stage (conv1 .. conv5), 2-2-3-3-3 convolutions.
_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
#: SSD512's extra layers after fc7: (name, 1x1 width, 3x3/4x4 width, kernel, stride, padding).
_EXTRAS = (
    ("conv8", 256, 512, 3, 2, 1),
    ("conv9", 128, 256, 3, 2, 1),
    ("conv10", 128, 256, 3, 2, 1),
    ("conv11", 128, 256, 3, 2, 1),
    ("conv12", 128, 256, 4, 1, 1),
)
#: Output names in order, with their strides (input side / cells).
OUTPUT_NAMES = ("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2", "conv12_2")
_STRIDES = dict(zip(OUTPUT_NAMES, (8, 16, 32, 64, 128, 256, 512)))
#: Detectron2 norms (``get_norm`` names) offered in the message of an unknown ``norm``.
_NORMS = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "LN")
#: Index of conv4_3's ReLU in ``features`` (torchvision's ``vgg16().features[:23]`` ends there).
CONV4_3_END = 23


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _is_norm(name: str) -> bool:
    try:
        get_norm(name, 32)
    except KeyError:
        return False
    return True


class L2Norm(nn.Module):
    """Per-position L2 normalisation over channels times a learned per-channel scale (ParseNet,
    as SSD applies to conv4_3).

    ``(N, C, H, W) -> (N, C, H, W)``: ``x / max(||x||_2 over C, eps) * weight[C]``.
    """

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))
        self.eps = eps

    def forward(self, x):
        return F.normalize(x, p=2.0, dim=1, eps=self.eps) * self.weight.view(1, -1, 1, 1)


class VGG16SSD(Backbone):
    """SSD's VGG-16 (see the module doc) as a Detectron2 ``Backbone``.

    Only the layers up to the last of ``out_features`` are built, so inputs smaller than 512 can
    stop earlier (conv12_2's 4x4 kernel needs conv11_2 to be at least 2x2).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_features: Sequence[str] = OUTPUT_NAMES,
        width: float = 1.0,
        norm: str = "",
        l2norm_scale: float = 20.0,
    ):
        """
        Args:
            in_channels: image channels.
            out_features: outputs to return, a subset of :data:`OUTPUT_NAMES`.
            width: multiplier of every layer's width (1.0: VGG-16; smaller for a narrow CPU
                variant trained from scratch).
            norm: Detectron2 norm after each VGG convolution ("" as VGG-16, "BN" to train a
                narrow variant from scratch).
            l2norm_scale: initial scale of the L2 normalisation of conv4_3 (SSD: 20).
        """
        super().__init__()
        unknown = [f for f in out_features if f not in OUTPUT_NAMES]
        if unknown or not out_features:
            raise ValueError(
                f"VGG16SSD out_features={list(out_features)}: each must be one of {', '.join(OUTPUT_NAMES)}"
            )
        if not width > 0:
            raise ValueError(f"VGG16SSD width={width!r} must be > 0 (MODEL.SSD.VGG_WIDTH)")
        if norm and not _is_norm(norm):
            valid = ", ".join(repr(n) for n in ("",) + tuple(n for n in _NORMS if _is_norm(n)))
            raise ValueError(f"VGG16SSD norm (MODEL.SSD.VGG_NORM)={norm!r} is not a Detectron2 norm; valid values: {valid}")
        self._out_features = [f for f in OUTPUT_NAMES if f in out_features]
        last = OUTPUT_NAMES.index(self._out_features[-1])

        layers: List[nn.Module] = []
        c = in_channels
        for stage, (channels, convs) in enumerate(_STAGES):
            out = _scaled(channels, width)
            for _ in range(convs):
                layers += [Conv2d(c, out, 3, padding=1, bias=not norm, norm=get_norm(norm, out)), nn.ReLU(inplace=True)]
                c = out
            if stage < 4:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=stage == 2))
        # features[0:23]: conv1_1 .. relu4_3; [23]: pool4; [24:30]: conv5_1 .. relu5_3
        self.features = nn.Sequential(*layers)
        self.conv4_3_norm = L2Norm(_scaled(512, width), l2norm_scale)
        self.pool5 = nn.MaxPool2d(3, stride=1, padding=1)
        fc = _scaled(1024, width)
        self.fc6 = Conv2d(c, fc, 3, padding=6, dilation=6)
        self.fc7 = Conv2d(fc, fc, 1)
        self._out_feature_channels = {"conv4_3": _scaled(512, width), "conv7": fc}
        self.extras = nn.ModuleDict()
        c = fc
        for name, mid, out, kernel, stride, pad in _EXTRAS[: max(0, last - 1)]:
            mid, out = _scaled(mid, width), _scaled(out, width)
            self.extras[name] = nn.Sequential(
                Conv2d(c, mid, 1), nn.ReLU(inplace=True), Conv2d(mid, out, kernel, stride=stride, padding=pad),
                nn.ReLU(inplace=True),
            )
            self._out_feature_channels[f"{name}_2"] = out
            c = out
        self._out_feature_strides = {k: _STRIDES[k] for k in self._out_feature_channels}
        self._init_weights()

    def _init_weights(self):
        # VGG layers: Kaiming (trained from scratch or replaced by ImageNet weights);
        # fc6/fc7 and the extra layers: Xavier-uniform, zero bias, as SSD.
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in [self.fc6, self.fc7, *self.extras.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def min_input_size(self) -> int:
        """The smallest square input side for which every layer has at least one output cell."""
        layers = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]  # in forward order
        first = lambda v: v if isinstance(v, int) else v[0]  # noqa: E731
        n = 1
        while True:
            side = n
            for m in layers:
                k, s, p, d = (first(getattr(m, a)) for a in ("kernel_size", "stride", "padding", "dilation"))
                side = (math.ceil if getattr(m, "ceil_mode", False) else math.floor)((side + 2 * p - d * (k - 1) - 1) / s) + 1
                if side < 1:
                    break
            else:
                return n
            n += 1

    def forward(self, x) -> Dict[str, torch.Tensor]:
        """``(N, C, H, W)`` images -> ``{name: (N, C_name, H_name, W_name)}`` of ``out_features``."""
        outputs = {}
        x = self.features[:CONV4_3_END](x)
        outputs["conv4_3"] = self.conv4_3_norm(x)
        x = self.features[CONV4_3_END:](x)
        x = F.relu(self.fc7(F.relu(self.fc6(self.pool5(x)))))
        outputs["conv7"] = x
        for name, block in self.extras.items():
            x = block(x)
            outputs[f"{name}_2"] = x
        return {k: outputs[k] for k in self._out_features}


@BACKBONE_REGISTRY.register()
def build_vgg16_ssd_backbone(cfg, input_shape: ShapeSpec) -> VGG16SSD:
    """SSD's VGG-16 from ``MODEL.SSD.IN_FEATURES`` / ``VGG_WIDTH`` / ``VGG_NORM`` /
    ``L2NORM_SCALE`` (``MODEL.BACKBONE.NAME: build_vgg16_ssd_backbone``)."""
    s = cfg.MODEL.SSD
    return VGG16SSD(
        in_channels=input_shape.channels,
        out_features=s.IN_FEATURES,
        width=s.VGG_WIDTH,
        norm=s.VGG_NORM,
        l2norm_scale=s.L2NORM_SCALE,
    )
