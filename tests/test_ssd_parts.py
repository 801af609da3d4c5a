"""SSD parts against independent oracles: the VGG-16 backbone and its ImageNet conversion
(torchvision's own network), SSD512's priors (the SSD paper's formulas), SSD matching."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")
torchvision = pytest.importorskip("torchvision")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY  # noqa: E402
from detectron2.modeling.anchor_generator import ANCHOR_GENERATOR_REGISTRY, build_anchor_generator  # noqa: E402

from ap_loss_d2.engine import get_ap_loss_cfg  # noqa: E402
from ap_loss_d2.modeling.priors import SSDPriorGenerator  # noqa: E402
from ap_loss_d2.modeling.ssd import ssd_match  # noqa: E402
from ap_loss_d2.modeling.vgg import CONV4_3_END, VGG16SSD  # noqa: E402
from tools.convert_vgg16_to_d2 import convert_torchvision_vgg16  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def test_backbone_output_shapes_at_512():
    cfg = get_ap_loss_cfg()
    cfg.MODEL.SSD.VGG_WIDTH = 0.125  # narrow: the layout is the same at any width
    backbone = BACKBONE_REGISTRY.get("build_vgg16_ssd_backbone")(cfg, ShapeSpec(channels=3))
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, 512, 512))
    assert [o.shape[-1] for o in out.values()] == [64, 32, 16, 8, 4, 2, 1]
    shapes = backbone.output_shape()
    assert [shapes[k].stride for k in out] == [8, 16, 32, 64, 128, 256, 512]
    assert all(shapes[k].channels == v.shape[1] for k, v in out.items())
    assert torch.equal(backbone.conv4_3_norm.weight, torch.full_like(backbone.conv4_3_norm.weight, 20.0))


@pytest.mark.parametrize("last", ["conv4_3", "conv11_2", "conv12_2"])
def test_min_input_size_is_the_smallest_input_torch_runs(last):
    backbone = VGG16SSD(width=1 / 16, out_features=(last,)).eval()
    n = backbone.min_input_size
    assert n == (268 if last == "conv12_2" else 12)
    with torch.no_grad():
        assert backbone(torch.zeros(1, 3, n, n))[last].shape[-1] >= 1
        with pytest.raises(RuntimeError):
            backbone(torch.zeros(1, 3, n - 1, n - 1))


def test_l2norm_scales_unit_vectors():
    backbone = VGG16SSD(width=0.125, out_features=("conv4_3",))
    x = torch.randn(2, 64, 3, 5)
    y = backbone.conv4_3_norm(x)
    torch.testing.assert_close(y.norm(dim=1), torch.full((2, 3, 5), 20.0))


class _Holder(torch.nn.Module):
    """A model whose ``backbone`` is SSD's VGG-16: the names the converted checkpoint has."""

    def __init__(self):
        super().__init__()
        self.backbone = VGG16SSD()


@pytest.fixture(scope="module")
def torchvision_vgg16():
    """torchvision's ``vgg16(weights=None)``, built on the meta device and filled cheaply (its
    random initialisation of 138 M parameters takes seconds): random convolutions, and fc
    layers holding a ramp, so that every entry differs."""
    with torch.device("meta"):
        tv = torchvision.models.vgg16(weights=None)
    tv = tv.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / m.weight[0].numel()))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.linspace(-1, 1, m.weight.numel()).view_as(m.weight))
                m.bias.copy_(torch.linspace(-1, 1, m.bias.numel()))
    return tv


def test_conversion_matches_torchvision_conv4_3_and_fc_subsampling(torchvision_vgg16, tmp_path):
    tv = torchvision_vgg16
    path = tmp_path / "vgg16_ssd_d2.pth"
    torch.save({"model": convert_torchvision_vgg16(tv.state_dict()), "matching_heuristics": False}, path)
    model = _Holder().eval()
    DetectionCheckpointer(model).load(str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.features[:CONV4_3_END](x), tv.features[:23](x))
    fc6 = tv.classifier[0].weight.view(4096, 512, 7, 7)
    for o in (0, 4, 1020):
        for i, j in ((0, 0), (1, 2), (2, 1)):
            assert torch.equal(model.backbone.fc6.weight[o, :, i, j], fc6[4 * o, :, 3 * i, 3 * j])
    assert torch.equal(model.backbone.fc6.bias, tv.classifier[0].bias[::4])
    assert torch.equal(model.backbone.fc7.weight[5, 7, 0, 0], tv.classifier[3].weight[20, 28])
    assert torch.equal(model.backbone.fc7.bias, tv.classifier[3].bias[::4])


@pytest.mark.slow  # writes and reads torchvision's 528 MB state dict in a subprocess
def test_conversion_command(torchvision_vgg16, tmp_path):
    src, dst = tmp_path / "vgg16.pth", tmp_path / "vgg16_ssd_d2.pth"
    torch.save(torchvision_vgg16.state_dict(), src)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, str(REPO / "tools" / "convert_vgg16_to_d2.py"), str(src), str(dst)], check=True, env=env)
    saved = torch.load(dst, weights_only=True)
    assert saved["matching_heuristics"] is False and "__author__" in saved
    expected = convert_torchvision_vgg16(torchvision_vgg16.state_dict())
    assert saved["model"].keys() == expected.keys()
    assert all(torch.equal(saved["model"][k], v) for k, v in expected.items())


def test_conversion_rejects_other_state_dicts():
    with pytest.raises(ValueError, match=r"state dict is not torchvision's VGG-16: .*first difference: features\.0\.weight missing"):
        convert_torchvision_vgg16({"conv1.weight": torch.zeros(1)})


def _paper_priors_512():
    """SSD512 (VOC) priors written from the SSD paper's formulas (Sec. 2.2) with the scales of
    its 512 model: s_k of 7, 15, 30, 45, 60, 75, 90 % (next: 105 %) of the input, an extra
    square sqrt(s_k s_k+1), w = s sqrt(a), h = s / sqrt(a), centres ((i + 0.5) / |f_k|)."""
    fmaps, ratios = [64, 32, 16, 8, 4, 2, 1], [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]
    pct = [7, 15, 30, 45, 60, 75, 90, 105]
    boxes = []
    for k, f in enumerate(fmaps):
        s, s_next = pct[k] / 100, pct[k + 1] / 100
        for j in range(f):
            for i in range(f):
                cx, cy = (i + 0.5) / f, (j + 0.5) / f
                wh = [(s, s), (math.sqrt(s * s_next), math.sqrt(s * s_next))]
                for a in ratios[k]:
                    wh += [(s * math.sqrt(a), s / math.sqrt(a)), (s / math.sqrt(a), s * math.sqrt(a))]
                boxes += [[512 * (cx - w / 2), 512 * (cy - h / 2), 512 * (cx + w / 2), 512 * (cy + h / 2)] for w, h in wh]
    return torch.tensor(boxes, dtype=torch.float64)


def test_ssd512_priors_count_and_boxes_equal_the_formulas():
    cfg = get_ap_loss_cfg()
    cfg.MODEL.ANCHOR_GENERATOR.NAME = "SSDPriorGenerator"
    gen = build_anchor_generator(cfg, [ShapeSpec(channels=8)] * 7)
    assert isinstance(gen, SSDPriorGenerator) and gen.box_dim == 4
    assert gen.num_cell_anchors == gen.num_anchors == [4, 6, 6, 6, 6, 4, 4]
    feats = [torch.zeros(1, 8, f, f) for f in (64, 32, 16, 8, 4, 2, 1)]
    priors = torch.cat([b.tensor for b in gen(feats)])
    assert priors.shape == (24564, 4)
    torch.testing.assert_close(priors.double(), _paper_priors_512(), rtol=0, atol=1e-3)


def test_priors_clip_to_the_fixed_size():
    cfg = get_ap_loss_cfg()
    cfg.MODEL.SSD.PRIOR_CLIP = True
    gen = ANCHOR_GENERATOR_REGISTRY.get("SSDPriorGenerator")(cfg, [ShapeSpec(channels=8)] * 7)
    priors = torch.cat([b.tensor for b in gen([torch.zeros(1, 8, f, f) for f in (64, 32, 16, 8, 4, 2, 1)])])
    assert priors.min() == 0 and priors.max() == 512
    torch.testing.assert_close(priors.double(), _paper_priors_512().clamp(0, 512), rtol=0, atol=1e-3)


def test_prior_generator_rejects_mismatched_levels():
    with pytest.raises(ValueError, match="one entry per feature level"):
        SSDPriorGenerator(min_sizes=[10, 20], max_sizes=[20], steps=[8, 16], aspect_ratios=[[2]])


def test_ssd_match():
    iou = torch.tensor([
        [0.30, 0.60, 0.10, 0.00, 0.55],   # gt 0: best prior 1
        [0.20, 0.10, 0.40, 0.00, 0.70],   # gt 1: best prior 4 (0.40 at prior 2 is below 0.5)
        [0.35, 0.00, 0.00, 0.00, 0.00],   # gt 2: best prior 0 at 0.35, forced positive
    ])
    assert ssd_match(iou, 0.5).tolist() == [2, 0, -1, -1, 1]
    # two ground truths sharing their best prior: the later one keeps it
    assert ssd_match(torch.tensor([[0.3, 0.1], [0.4, 0.2]]), 0.5).tolist() == [1, -1]
    assert ssd_match(torch.zeros(0, 3), 0.5).tolist() == [-1, -1, -1]
