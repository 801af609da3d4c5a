"""Score distribution study (Fig. 7) on a tiny random-init RetinaNet (CPU, small)."""
import json

import numpy as np
import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402

from ap_loss_d2.data import SyntheticShapesSpec, register_synthetic_shapes  # noqa: E402
from studies import score_distribution as sd  # noqa: E402
from studies.common import build_model_for_run, cls_loss_label, load_cfg  # noqa: E402
from tests.test_robustness import save_checkpoint  # noqa: E402

QUICK_CONFIG = "configs/quick/retinanet_R_18_FPN_1000it_synth_ap.yaml"
TINY = SyntheticShapesSpec(seed=12, image_size=64, num_train=2, num_val=3, min_objects=2,
                           max_objects=4, max_size=24)
PREFIX = "scoretest_shapes"
OPTS = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96"]
# 96 px input, strides 8/16/32, 6 anchors per position (2 sizes x 3 ratios)
ANCHORS_PER_IMAGE = (12 * 12 + 6 * 6 + 3 * 3) * 6


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """``{loss: checkpoint}``: the same weights saved from an "ap" and a "ce_ohem" model (the
    checkpointer refuses weights of a loss that scores otherwise)."""
    register_synthetic_shapes(TINY, root=tmp_path_factory.mktemp("score_ds"), prefix=PREFIX)
    out = {}
    for loss in ("ap", "ce_ohem"):
        cfg = load_cfg(QUICK_CONFIG, OPTS + ["MODEL.CLS_LOSS.NAME", loss])
        torch.manual_seed(0)
        model = build_model_for_run(cfg, "")
        # spread the scores over (0, 1): a random-init RetinaNet predicts ~0.01 everywhere
        with torch.no_grad():
            model.head.cls_score.bias.zero_()
            model.head.cls_score.weight.mul_(50.0)
        out[loss] = save_checkpoint(model, tmp_path_factory.mktemp("score_ckpt") / f"tiny_{loss}.pth")
    return out


def _recompute_bins(pairs, high_score):
    edges = np.linspace(0, 1, 11)
    out = []
    for i in range(10):
        lo, hi = edges[i], edges[i + 1]
        m = (pairs["iou"] >= lo) & ((pairs["iou"] < hi) if i < 9 else (pairs["iou"] <= hi))
        w, s = pairs["weight"][m], pairs["score"][m].astype(np.float64)
        out.append(dict(count=int(m.sum()), weighted_count=float(w.sum()),
                        mean_score=float((w * s).sum() / w.sum()) if m.any() else None,
                        frac_high=float(w[s >= high_score].sum() / w.sum()) if m.any() else None))
    return out


@pytest.mark.slow  # runs the study end to end
@pytest.mark.parametrize("loss", ["ap", "ce_ohem"])
def test_json_bins_equal_recomputed_from_npz(tiny_ckpts, tmp_path, loss):
    out = tmp_path / "sd"
    ckpt = tiny_ckpts[loss]
    report = sd.main(["--run", f"{QUICK_CONFIG}:{ckpt}", "--dataset", f"{PREFIX}_val",
                      "--max-images", "3", "--zero-iou-samples", "40", "--output-dir", str(out),
                      *OPTS, "MODEL.CLS_LOSS.NAME", loss])
    saved = json.loads((out / "score_distribution.json").read_text())
    assert saved == json.loads(json.dumps(report))  # what main returned is what it wrote
    run = saved["runs"][0]
    assert run["label"] == cls_loss_label(loss)
    assert run["cls_loss"] == loss
    pairs = dict(np.load(out / run["pairs"]))
    totals = run["totals"]
    s = run["summary"]

    # every anchor counted; every IoU>0 anchor recorded; 40 IoU-0 anchors per image
    assert totals["images"] == 3 and totals["images_without_gt"] == 0
    assert totals["anchors"] == 3 * ANCHORS_PER_IMAGE
    n_zero = int((pairs["iou"] == 0).sum())
    assert n_zero == 3 * 40 == s["zero_iou"]["recorded"]
    assert totals["anchors"] == totals["zero_iou_anchors"] + int((pairs["iou"] > 0).sum())
    for i in range(3):
        m = (pairs["image_index"] == i) & (pairs["iou"] == 0)
        assert pairs["weight"][m].sum() == pytest.approx(
            totals["zero_iou_anchors"] / 3, rel=0.5)  # per-image totals, roughly equal images
    assert pairs["weight"].sum() == pytest.approx(totals["anchors"])
    assert np.all((pairs["score"] >= 0) & (pairs["score"] <= pairs["max_score"] + 1e-7))
    assert 0.05 < pairs["score"].mean() < 0.95  # scores spread out

    for got, exp in zip(s["bins"], _recompute_bins(pairs, saved["high_score"])):
        assert got["count"] == exp["count"]
        assert got["weighted_count"] == pytest.approx(exp["weighted_count"], rel=1e-12)
        if exp["mean_score"] is None:
            assert got["mean_score"] is None
        else:
            assert got["mean_score"] == pytest.approx(exp["mean_score"], rel=1e-9)
            assert got["frac_high_score"] == pytest.approx(exp["frac_high"], rel=1e-9)
    low = (pairs["iou"] > 0) & (pairs["iou"] < saved["low_iou"])
    hs = s["high_score_low_iou"]
    assert hs["count_nonzero_iou"] == int((low & (pairs["score"] >= saved["high_score"])).sum())
    assert hs["count"] == hs["count_nonzero_iou"] + totals["zero_iou_high_score"]
    assert hs["low_iou_anchors"] == int(low.sum()) + totals["zero_iou_anchors"]
    fg = pairs["match_label"] == 1
    assert s["positives"]["count"] == int(fg.sum()) > 0
    assert np.all(fg[pairs["iou"] >= 0.5])  # the model's matcher: fg from IoU 0.5 on
    assert np.all(pairs["match_label"][pairs["iou"] < 0.4][pairs["iou"][pairs["iou"] < 0.4] == 0]
                  == 0)  # IoU-0 anchors are background
    assert s["positives"]["mean_score"] == pytest.approx(float(pairs["score"][fg].mean()), rel=1e-6)

    md = (out / "score_distribution.md").read_text()
    assert f"| {run['label']} | " + " | ".join(
        "-" if b["mean_score"] is None else f"{b['mean_score']:.3f}" for b in s["bins"]) in md
    for fig in saved["figures"]:
        assert (out / fig).is_file()


def test_scores_are_the_models_own(tiny_ckpts):
    """The same weights: sigmoids under "ap", the softmax with a zero background logit under "ce_ohem"."""
    from detectron2.data import DatasetCatalog, DatasetMapper

    scores = {}
    for loss in ("ap", "ce_ohem"):
        cfg = load_cfg(QUICK_CONFIG, OPTS + ["MODEL.CLS_LOSS.NAME", loss])
        model = build_model_for_run(cfg, tiny_ckpts[loss])
        inputs = DatasetMapper(cfg, is_train=False)(DatasetCatalog.get(f"{PREFIX}_val")[0])
        scores[loss] = sd.image_scores(model, inputs)[1]
    p_sig, p_soft = scores["ap"], scores["ce_ohem"]
    ok = ((p_sig > 1e-4) & (p_sig < 1 - 1e-4)).all(dim=1)  # sigmoid not saturated
    assert ok.sum() > 50
    p = p_sig[ok].double()
    logits = torch.log(p) - torch.log1p(-p)  # recover the logits
    expected = torch.exp(logits) / (1 + torch.exp(logits).sum(dim=1, keepdim=True))
    torch.testing.assert_close(p_soft[ok].double(), expected, rtol=1e-3, atol=1e-5)
