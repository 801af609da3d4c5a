"""Table 3's white-box attacks (studies.robustness): DeepFool against analytic oracles
and on a small real RetinaNet, the adversarial patch's pasting, training and options, and the
robustness study's Advs-Patch / DeepFool columns end to end (CPU, tiny)."""
import json
import math

import numpy as np
import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.data import DatasetCatalog, build_detection_test_loader  # noqa: E402
from detectron2.data import detection_utils as utils  # noqa: E402
from detectron2.evaluation import inference_on_dataset  # noqa: E402
from detectron2.modeling import GeneralizedRCNN  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402
from PIL import Image  # noqa: E402

from ap_loss_d2.data import SyntheticShapesSpec, register_synthetic_shapes  # noqa: E402
from ap_loss_d2.evaluation import build_evaluator  # noqa: E402
from studies import robustness as rb  # noqa: E402
from studies.common import build_model_for_run, load_cfg  # noqa: E402
from tests.test_robustness import save_checkpoint  # noqa: E402

try:  # Detectron2 main
    from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
except ImportError:  # v0.6
    from detectron2.modeling.meta_arch.retinanet import permute_to_N_HWA_K

QUICK_CONFIG = "configs/quick/retinanet_R_18_FPN_1000it_synth_ap.yaml"
RCNN_CONFIG = "configs/FasterRCNN/faster_rcnn_R_18_FPN_600it_synth_ce.yaml"
TINY = SyntheticShapesSpec(seed=12, image_size=64, num_train=3, num_val=2, min_objects=2,
                           max_objects=3, max_size=28)
PREFIX = "atktest_shapes"
OPTS = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20",
        "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50"]
# A random-init RetinaNet scores every anchor near its prior 0.01 (logit -4.6): with this
# threshold (logit -5.29) the objects are "detected" and DeepFool has something to remove.
THRESH = 0.005


# ---------------------------------------------------------------------------------------------
# DeepFool: analytic oracles
# ---------------------------------------------------------------------------------------------
def _linear(seed=0, shape=(3, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    b = 1.0 - float((w * x0).sum())  # f(x0) = 1
    return w, x0, (lambda x: (w * x).sum() + b)


def test_deepfool_first_step_on_a_linear_f_is_minus_f_w_over_norm_w_squared():
    w, x0, f = _linear()
    out = rb.deepfool_binary(f, x0, max_iter=10, overshoot=0.02, step_eps=0.0)
    expected = -1.0 * w / float((w ** 2).sum())  # -f(x0) w / ||w||^2 with f(x0) = 1
    torch.testing.assert_close(out["first_step"], expected, rtol=1e-12, atol=1e-14)
    # one step reaches the hyperplane; the overshoot crosses it: f = -0.02 f(x0)
    assert out["success"] and out["reason"] == "success" and out["iterations"] == 1
    torch.testing.assert_close(out["r"], 1.02 * expected, rtol=1e-12, atol=1e-14)
    assert out["f0"] == pytest.approx(1.0) and out["f"] == pytest.approx(-0.02, abs=1e-12)
    # the minimal L2 distance to the hyperplane, times 1 + overshoot
    assert float(out["r"].norm()) == pytest.approx(1.02 / float(w.norm()), rel=1e-12)


def test_deepfool_step_eps_lengthens_each_step_as_the_authors_code():
    w, x0, f = _linear(1)
    out = rb.deepfool_binary(f, x0, max_iter=10, overshoot=0.0, step_eps=1e-4)
    n = float(w.norm())
    torch.testing.assert_close(out["first_step"], -(1.0 / n + 1e-4) * w / n, rtol=1e-12,
                               atol=1e-14)
    assert out["success"] and out["iterations"] == 1  # without overshoot the eps crosses it


def test_deepfool_nonlinear_f_iterates_to_the_boundary_and_stops_at_the_budget():
    # f(x) = ||x||^2 - 1 from ||x0|| = 2: the minimal perturbation is x0 (1/||x0|| - 1)
    x0 = torch.tensor([1.2, -1.6], dtype=torch.float64)
    f = lambda x: (x ** 2).sum() - 1.0  # noqa: E731
    out = rb.deepfool_binary(f, x0, max_iter=50, overshoot=0.0, step_eps=1e-9)
    assert out["success"] and out["iterations"] > 1
    torch.testing.assert_close(out["r"], x0 * (1 / 2.0 - 1), rtol=1e-6, atol=1e-6)
    short = rb.deepfool_binary(f, x0, max_iter=1, overshoot=0.0, step_eps=0.0)
    assert not short["success"] and short["reason"] == "max_iter" and short["iterations"] == 1
    # already on the other side: no perturbation
    inside = rb.deepfool_binary(f, x0 / 4, max_iter=5)
    assert inside["reason"] == "already" and inside["iterations"] == 0
    assert float(inside["r"].abs().max()) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_iter=0), "max_iter"), (dict(max_iter=2.5), "max_iter"),
    (dict(overshoot=-0.1), "overshoot"), (dict(step_eps=-1.0), "step_eps"),
])
def test_deepfool_bad_options(kwargs, match):
    w, x0, f = _linear()
    with pytest.raises(ValueError, match=match):
        rb.deepfool_binary(f, x0, **kwargs)


# ---------------------------------------------------------------------------------------------
# Adversarial patch: pasting
# ---------------------------------------------------------------------------------------------
def _image(h=60, w=80, seed=0):
    return np.random.default_rng(seed).integers(1, 256, size=(h, w, 3), dtype=np.uint8)


def test_adversarial_patch_is_pasted_exactly_into_center_patch_region():
    img = _image()
    boxes = np.array([[10, 20, 30, 60], [40, 4, 76, 24], [70, 50, 95, 70]], dtype=np.float64)
    regions = [rb.center_patch_region(b, 60, 80) for b in boxes]
    assert regions == [(15, 30, 25, 50), (49, 9, 67, 19), (76, 55, 80, 60)]  # last one clipped
    # a constant patch resizes to the same constant: the regions hold exactly it
    flat = rb.AdversarialPatch(np.full((8, 8, 3), (200, 0, 17), np.uint8))
    stats = {}
    out = flat(img, boxes, None, stats)
    inside = np.zeros((60, 80), bool)
    for x0, y0, x1, y1 in regions:
        inside[y0:y1, x0:x1] = True
        assert (out[y0:y1, x0:x1] == np.array([200, 0, 17], np.uint8)).all()
    np.testing.assert_array_equal(out[~inside], img[~inside])  # nothing else changes
    assert stats == {"patches": 3}
    np.testing.assert_array_equal(img, _image())  # input untouched
    # a patch of the region's own size is copied pixel for pixel
    patch = _image(20, 10, seed=3)
    out = rb.AdversarialPatch(patch)(img, boxes[:1])
    np.testing.assert_array_equal(out[30:50, 15:25], patch)


def test_paste_patch_tensor_matches_the_uint8_paste_and_is_differentiable():
    img = _image()
    boxes = np.array([[10, 20, 30, 60], [40, 4, 76, 24]])
    # float32 as AdversarialPatch (same arithmetic, same rounding at .5)
    patch = torch.as_tensor(_image(16, 16, seed=5).transpose(2, 0, 1)).float().requires_grad_()
    x = torch.as_tensor(img.transpose(2, 0, 1)).float()
    pasted = rb.paste_patch_tensor(x, boxes, patch)
    ref = rb.AdversarialPatch(_image(16, 16, seed=5))(img, boxes)
    np.testing.assert_array_equal(
        pasted.detach().round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy(), ref)
    (grad,) = torch.autograd.grad(pasted.sum(), patch)
    assert grad.abs().sum() > 0
    assert torch.equal(x, torch.as_tensor(img.transpose(2, 0, 1)).float())


def test_adversarial_patch_rejects_a_non_uint8_patch():
    with pytest.raises(ValueError, match="uint8"):
        rb.AdversarialPatch(np.zeros((4, 4, 3), np.float32))


# ---------------------------------------------------------------------------------------------
# On a small real RetinaNet
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("atk_datasets")
    register_synthetic_shapes(TINY, root=root, prefix=PREFIX)
    return root


@pytest.fixture(scope="module")
def tiny_model(tiny_data):
    cfg = load_cfg(QUICK_CONFIG, OPTS)
    torch.manual_seed(0)
    return cfg, build_model_for_run(cfg, "")


def _oracle_matched_logits(model, x, instances):
    """The matched anchors' GT-class logits through Detectron2's own preprocessing and
    permute_to_N_HWA_K (an independent path from robustness.matched_score_logits)."""
    images = model.preprocess_image([{"image": x}])
    feats = model.backbone(images.tensor)
    feats = [feats[f] for f in model.head_in_features]
    logits, _ = model.head(feats)
    logits = torch.cat([permute_to_N_HWA_K(t, model.num_classes) for t in logits], 1)[0]
    labels = model.label_anchors(model.anchor_generator(feats), [instances])[0][0]
    pos = (labels >= 0) & (labels < model.num_classes)
    return logits[pos, labels[pos]]


def test_matched_score_logits_equal_detectron2s_layout(tiny_data, tiny_model):
    cfg, model = tiny_model
    ex = rb.load_examples(cfg, f"{PREFIX}_val")
    assert len(ex) == 2 and ex[0].size == (96, 96)
    xs = [torch.as_tensor(e.test_image.transpose(2, 0, 1)).float() for e in ex]
    with torch.no_grad():
        got = rb.matched_score_logits(model, xs, [e.instances for e in ex])  # batched
        for x, e, g in zip(xs, ex, got):
            assert g.numel() > 0
            torch.testing.assert_close(g, _oracle_matched_logits(model, x, e.instances))


@pytest.mark.slow  # DeepFool iterations (~20 backward passes) on a random-init RetinaNet
def test_deepfool_removes_every_matched_detection_of_a_real_model(tiny_data, tiny_model):
    cfg, model = tiny_model
    ex = rb.load_examples(cfg, f"{PREFIX}_val", 1)[0]
    c = math.log(THRESH / (1 - THRESH))
    x0 = torch.as_tensor(ex.test_image.transpose(2, 0, 1)).float()
    with torch.no_grad():
        before = _oracle_matched_logits(model, x0, ex.instances)
    assert before.max() > c  # detected before the attack
    res = rb.deepfool_detector(model, ex, threshold=THRESH, max_iter=50, keep_perturbation=True)
    assert res["attacked"] and res["success"] and res["reason"] == "success"
    assert res["f0"] == pytest.approx(float(before.max()) - c, abs=1e-4)
    r = res.pop("perturbation")
    assert float(r.double().norm()) == pytest.approx(res["r_norm"], rel=1e-9)
    # the decision flipped on the perturbed input, through the independent path
    with torch.no_grad():
        after = _oracle_matched_logits(model, x0 + r, ex.instances)
    assert after.max() < c
    assert res["rho"] == pytest.approx(res["r_norm"] / float(x0.double().norm()))
    assert all(p.requires_grad for p in model.parameters())  # restored after the attack


def test_attacks_reject_unsupported_models_and_thresholds(tiny_data, tiny_model):
    cfg, model = tiny_model
    with pytest.raises(ValueError, match="Faster R-CNN is not supported"):
        rb.check_attack_model(GeneralizedRCNN, "deepfool")
    with pytest.raises(ValueError, match="RetinaNet"):
        rb.deepfool_dataset(cfg, torch.nn.Linear(2, 2), f"{PREFIX}_val")
    with pytest.raises(ValueError, match="0 < t < 1"):  # the config's threshold is 0.0
        rb.deepfool_dataset(cfg, model, f"{PREFIX}_val")
    ex = rb.load_examples(cfg, f"{PREFIX}_train", 2)
    for kwargs, match in ((dict(steps=0), "steps"), (dict(lr=-1.0), "lr"),
                          (dict(batch_size=0), "batch_size"), (dict(size=0), "size")):
        with pytest.raises(ValueError, match=match):
            rb.train_adversarial_patch(model, ex, **kwargs)
    with pytest.raises(ValueError, match="no training images"):
        rb.train_adversarial_patch(model, [], steps=1)


@pytest.mark.slow  # trains a patch (a few Adam steps) three times
def test_patch_training_lowers_its_objective_and_is_seeded(tiny_data, tiny_model):
    cfg, model = tiny_model
    ex = rb.load_examples(cfg, f"{PREFIX}_train")
    before = [p.detach().clone() for p in model.parameters()]
    kw = dict(steps=6, lr=0.05, batch_size=2, size=8)
    a = rb.train_adversarial_patch(model, ex, seed=1, **kw)
    assert a["patch"].shape == (8, 8, 3) and a["patch"].dtype == np.uint8
    assert a["final_objective"] < a["initial_objective"]
    # the reported objective is the objective of the returned (quantised) patch
    with torch.no_grad():
        obj = rb.patch_objective(model, ex, torch.as_tensor(a["patch"].transpose(2, 0, 1)).float())
    assert float(obj) == pytest.approx(a["final_objective"], rel=1e-5)
    b = rb.train_adversarial_patch(model, ex, seed=1, **kw)
    np.testing.assert_array_equal(a["patch"], b["patch"])
    assert a["objective"] == b["objective"]
    c = rb.train_adversarial_patch(model, ex, seed=2, **kw)
    assert not np.array_equal(a["patch"], c["patch"])
    for p, q in zip(model.parameters(), before):  # the model is not trained
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------
# The study's columns
# ---------------------------------------------------------------------------------------------
def test_cli_rejects_bad_attack_options(tiny_data, tmp_path, capsys):
    base = ["--run", f"{QUICK_CONFIG}::tiny", "--dataset", f"{PREFIX}_val",
            "--output-dir", str(tmp_path / "x")]
    for opt in (["--patch-steps", "0"], ["--patch-lr", "-1"], ["--deepfool-max-iter", "0"],
                ["--deepfool-overshoot", "-0.5"], ["--patch-images", "two"]):
        with pytest.raises(SystemExit):
            rb.parse_args(base + opt)
        assert opt[0] in capsys.readouterr().err
    with pytest.raises(ValueError, match="Faster R-CNN is not supported"):
        rb.main(["--run", f"{RCNN_CONFIG}::rcnn", "--dataset", f"{PREFIX}_val",
                 "--perturbations", "original", "advs_patch", "--output-dir", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="0 < t < 1"):
        rb.main(base + ["--perturbations", "deepfool", "--seed", "0", *OPTS])
    assert not (tmp_path / "r" / "robustness.json").exists()


@pytest.mark.slow  # the study end to end with both attacks
def test_cli_attack_columns_end_to_end(tiny_data, tiny_model, tmp_path):
    cfg, model = tiny_model
    ckpt = save_checkpoint(model, tmp_path / "ckpt" / "tiny.pth")
    out = tmp_path / "rob"
    perts = ["original", "advs_patch", "deepfool"]
    report = rb.main(["--run", f"{QUICK_CONFIG}:{ckpt}:tiny", "--dataset", f"{PREFIX}_val",
                      "--perturbations", *perts, "--patch-dataset", f"{PREFIX}_train",
                      "--patch-images", "3", "--patch-steps", "2", "--patch-batch", "2",
                      "--patch-size", "8", "--deepfool-max-iter", "30",
                      "--deepfool-score-thresh", str(THRESH), "--output-dir", str(out), *OPTS])
    saved = json.loads((out / "robustness.json").read_text())
    run = saved["runs"][0]
    assert saved["perturbations"] == perts and report["runs"][0]["AP50"] == run["AP50"]
    # the patch PNG is the patch the column was evaluated with: re-evaluate independently
    rgb = np.asarray(Image.open(out / run["advs_patch"]["file"]).convert("RGB"))
    patch = np.ascontiguousarray(rgb[:, :, ::-1]) if cfg.INPUT.FORMAT == "BGR" else rgb
    assert patch.shape == (8, 8, 3)
    name = f"{PREFIX}_val"
    loader = build_detection_test_loader(
        DatasetCatalog.get(name),
        mapper=rb.PerturbedDatasetMapper(cfg, "advs_patch", 0, fn=rb.AdversarialPatch(patch)))
    res = inference_on_dataset(build_model_for_run(cfg, ckpt), loader,
                               build_evaluator(cfg, name, str(tmp_path / "adv")))
    assert run["AP50"]["advs_patch"] == pytest.approx(res["bbox"]["AP50"], abs=1e-9)
    n_obj = sum(len(d["annotations"]) for d in DatasetCatalog.get(name))
    assert run["perturbation_stats"]["advs_patch"] == {"images": 2, "patches": n_obj}
    assert run["advs_patch"]["steps"] == 2 and len(run["advs_patch"]["objective"]) == 2
    # DeepFool: its own column, rho from the per-image results
    d = run["deepfool"]
    assert "deepfool" not in run["AP50"]
    succ = [r["rho"] for r in d["per_image"] if r["success"]]
    assert d["attacked"] == 2 and d["succeeded"] == len(succ) >= 1
    assert d["rho"] == pytest.approx(np.mean(succ)) and d["rho_scaled"] == pytest.approx(
        1000 * d["rho"])
    assert d["success_rate"] == pytest.approx(len(succ) / 2) and d["threshold"] == THRESH
    md = (out / "robustness.md").read_text()
    assert "| Training Loss | Original | Advs-Patch | DeepFool (rho x 1000) |" in md
    row = (f"| tiny | {run['AP50']['original']:.1f} | {run['AP50']['advs_patch']:.1f} | "
           f"{d['rho_scaled']:.2f} |")
    assert row in md
    assert (out / "robustness.png").is_file()


def test_cli_defaults_are_the_documented_budgets():
    args = rb.parse_args(["--run", f"{QUICK_CONFIG}::x"])
    assert args.perturbations == list(rb.COLUMNS) == [
        "original", "black_patch", "random_patch", "flip_patch", "advs_patch",
        "gaussian_noise", "deepfool"]  # the paper's column order
    assert (args.patch_size, args.patch_steps, args.patch_lr, args.patch_batch,
            args.patch_images, args.patch_seed) == (32, 100, 0.03, 8, 64, 0)
    assert (args.deepfool_max_iter, args.deepfool_overshoot, args.deepfool_scale,
            args.deepfool_images, args.deepfool_score_thresh) == (50, 0.02, 1000.0, None, None)


def test_mapper_pastes_the_patch_before_the_test_resize(tiny_data):
    cfg = load_cfg(QUICK_CONFIG, ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"])
    record = DatasetCatalog.get(f"{PREFIX}_val")[0]
    with pytest.raises(ValueError, match="needs fn"):
        rb.PerturbedDatasetMapper(cfg, "advs_patch")
    fn = rb.AdversarialPatch(_image(8, 8, seed=9))
    adv = rb.PerturbedDatasetMapper(cfg, "advs_patch", fn=fn)(record)
    plain = rb.PerturbedDatasetMapper(cfg, "original")(record)["image"].permute(1, 2, 0).numpy()
    boxes = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                      for a in record["annotations"]])
    np.testing.assert_array_equal(adv["image"].permute(1, 2, 0).numpy(), fn(plain, boxes))
    assert adv["perturbation"]["patches"] == len(record["annotations"])
