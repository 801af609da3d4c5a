"""Robustness study (Table 3): perturbation functions and an end-to-end CLI run (CPU, small)."""
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.data import DatasetCatalog, build_detection_test_loader  # noqa: E402
from detectron2.evaluation import inference_on_dataset  # noqa: E402
from detectron2.structures import Boxes, BoxMode, Instances  # noqa: E402

from ap_loss_d2.data import SyntheticShapesSpec, register_synthetic_shapes  # noqa: E402
from ap_loss_d2.evaluation import build_evaluator  # noqa: E402
from studies import robustness as rb  # noqa: E402
from studies.common import build_model_for_run, dataset_subset, load_cfg  # noqa: E402


def save_checkpoint(model, path) -> str:
    """``model``'s weights saved by the project's checkpointer as ``path`` (a ``.pth``)."""
    from ap_loss_d2.engine import SafeDetectionCheckpointer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    SafeDetectionCheckpointer(model, save_dir=str(path.parent)).save(path.stem)
    return str(path.parent / (path.stem + ".pth"))


QUICK_CONFIG = "configs/quick/retinanet_R_18_FPN_1000it_synth_ap.yaml"
TINY = SyntheticShapesSpec(seed=11, image_size=64, num_train=2, num_val=3, min_objects=2,
                           max_objects=4, max_size=24)
PREFIX = "robtest_shapes"
# Small and fast: 96 px test images, few detections, keep every score of a random-init model.
OPTS = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20",
        "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50"]


def _image(h=60, w=80, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, size=(h, w, 3), dtype=np.uint8)  # no zeros anywhere


# ---------------------------------------------------------------------------------------------
# Perturbation functions
# ---------------------------------------------------------------------------------------------
def test_center_patch_region_is_half_box_at_centre():
    # box 20 x 40 centred at (20, 40): patch 10 x 20 centred there
    assert rb.center_patch_region([10, 20, 30, 60], 100, 100) == (15, 30, 25, 50)
    # clipped at the border, at least one pixel
    assert rb.center_patch_region([0, 0, 1, 1], 10, 10) == (0, 0, 1, 1)
    assert rb.center_patch_region([-20, -20, -10, -10], 10, 10) is None


def test_black_patch_zeros_exactly_the_centre_half_box():
    img = _image()
    boxes = np.array([[10, 20, 30, 60], [40, 4, 76, 24]], dtype=np.float32)
    out = rb.black_patch(img, boxes, np.random.default_rng(0))
    expected = img.copy()
    expected[30:50, 15:25] = 0  # box 1: 20x40 -> 10x20 at centre (20, 40)
    expected[9:19, 49:67] = 0  # box 2: 36x20 -> 18x10 at centre (58, 14)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(img, _image())  # input untouched


def test_flip_patch_equals_a_flip_of_the_original_patch_and_is_seeded():
    img = _image()
    box = np.array([[10, 20, 30, 60]])
    seen = set()
    for seed in range(12):
        stats = {}
        out = rb.flip_patch(img, box, np.random.default_rng(seed), stats)
        patch = img[30:50, 15:25]
        flips = {"left_right": patch[:, ::-1], "top_bottom": patch[::-1, :],
                 "both": patch[::-1, ::-1]}
        mode = [m for m in rb.FLIP_MODES if stats.get(f"flip_{m}")]
        assert len(mode) == 1 and stats["patches"] == 1
        np.testing.assert_array_equal(out[30:50, 15:25], flips[mode[0]])
        outside = np.ones(img.shape[:2], bool)
        outside[30:50, 15:25] = False
        np.testing.assert_array_equal(out[outside], img[outside])
        np.testing.assert_array_equal(
            out, rb.flip_patch(img, box, np.random.default_rng(seed)))  # reproducible
        seen.add(mode[0])
    assert seen == set(rb.FLIP_MODES)


def test_random_patch_content_comes_from_outside_every_box():
    h, w = 60, 80
    # every pixel unique, so the source of a copied patch can be located
    idx = np.arange(h * w, dtype=np.int64).reshape(h, w)
    img = np.stack([idx % 256, idx // 256, np.full_like(idx, 7)], -1).astype(np.uint8)
    boxes = np.array([[10, 20, 30, 60], [40, 4, 76, 24]], dtype=np.float64)
    mask = rb.box_mask(boxes, h, w)
    for seed in range(5):
        stats = {}
        out = rb.random_patch(img, boxes, np.random.default_rng(seed), stats)
        assert stats == {"patches": 2}
        changed = np.any(out != img, axis=-1)
        regions = [(15, 30, 25, 50), (49, 9, 67, 19)]
        allowed = np.zeros((h, w), bool)
        for x0, y0, x1, y1 in regions:
            allowed[y0:y1, x0:x1] = True
            patch = out[y0:y1, x0:x1]
            src = patch[..., 0].astype(np.int64) + 256 * patch[..., 1].astype(np.int64)
            sy, sx = divmod(int(src[0, 0]), w)
            # the patch is a contiguous copy of a same-size region ...
            np.testing.assert_array_equal(patch, img[sy:sy + y1 - y0, sx:sx + x1 - x0])
            # ... that overlaps no box
            assert not mask[sy:sy + y1 - y0, sx:sx + x1 - x0].any()
        assert not changed[~allowed].any()
        np.testing.assert_array_equal(out, rb.random_patch(img, boxes, np.random.default_rng(seed)))


def test_random_patch_falls_back_to_least_overlap_and_counts_it():
    img = _image(20, 20)
    boxes = np.array([[0, 0, 20, 12], [0, 12, 16, 20]])  # free: x 16..20, y 12..20 only
    stats = {}
    out = rb.random_patch(img, boxes, np.random.default_rng(0), stats)
    assert stats["random_patch_fallbacks"] == 2 and stats["patches"] == 2
    assert out.shape == img.shape


def test_gaussian_noise_statistics_and_seeding():
    img = np.full((400, 500, 3), 128, np.uint8)
    out = rb.gaussian_noise(img, np.zeros((0, 4)), np.random.default_rng(3))
    d = out.astype(np.float64) / 255 - img.astype(np.float64) / 255
    assert abs(d.mean()) < 2e-3
    assert abs(d.var() - 0.01) < 5e-4
    np.testing.assert_array_equal(out, rb.gaussian_noise(img, None, np.random.default_rng(3)))
    assert not np.array_equal(out, rb.gaussian_noise(img, None, np.random.default_rng(4)))
    # clipping: saturated pixels stay in range
    white = rb.gaussian_noise(np.full((50, 50, 3), 255, np.uint8), None, np.random.default_rng(0))
    assert white.dtype == np.uint8 and white.max() == 255 and white.min() < 255


def test_image_seed():
    assert rb.image_seed(10, 5) == 15
    assert rb.image_seed(0, "val_000001") == rb.image_seed(0, "val_000001")
    assert rb.image_seed(0, "val_000001") != rb.image_seed(0, "val_000002")


# ---------------------------------------------------------------------------------------------
# Mapper and end-to-end
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rob_datasets")
    register_synthetic_shapes(TINY, root=root, prefix=PREFIX)
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_data):
    cfg = load_cfg(QUICK_CONFIG, OPTS)
    torch.manual_seed(0)
    model = build_model_for_run(cfg, "")
    return save_checkpoint(model, tmp_path_factory.mktemp("rob_ckpt") / "tiny.pth")


def test_mapper_perturbs_before_resize(tiny_data):
    cfg = load_cfg(QUICK_CONFIG, ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"])
    record = DatasetCatalog.get(f"{PREFIX}_val")[0]
    plain = rb.PerturbedDatasetMapper(cfg, "original")(record)
    black = rb.PerturbedDatasetMapper(cfg, "black_patch", seed=5)(record)
    assert black["perturbation"]["patches"] == len(record["annotations"])
    img = plain["image"].permute(1, 2, 0).numpy()  # same size: no resize at 64 px
    boxes = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                      for a in record["annotations"]])
    np.testing.assert_array_equal(black["image"].permute(1, 2, 0).numpy(),
                                  rb.black_patch(img, boxes))
    # seeded per image: identical on a second call, differs with another seed
    a = rb.PerturbedDatasetMapper(cfg, "gaussian_noise", seed=1)(record)["image"]
    b = rb.PerturbedDatasetMapper(cfg, "gaussian_noise", seed=1)(record)["image"]
    c = rb.PerturbedDatasetMapper(cfg, "gaussian_noise", seed=2)(record)["image"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert "annotations" not in black  # still Detectron2's test mapper


class _OracleModel(torch.nn.Module):
    """Predicts every ground-truth box (score 0.9, or 0.05 when its centre patch is all black)
    plus one false 4x4 box per class and image (score 0.5): black patches push the true boxes
    below the false ones. Expects unresized inputs."""

    def __init__(self, dataset_name):
        super().__init__()
        self.gt = {d["image_id"]: d for d in DatasetCatalog.get(dataset_name)}

    def forward(self, inputs):
        outs = []
        for inp in inputs:
            rec = self.gt[inp["image_id"]]
            h, w = rec["height"], rec["width"]
            assert tuple(inp["image"].shape[1:]) == (h, w)
            boxes, scores, classes = [], [], []
            for a in rec["annotations"]:
                box = BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                x0, y0, x1, y1 = rb.center_patch_region(box, h, w)
                black = bool((inp["image"][:, y0:y1, x0:x1] == 0).all())
                boxes.append(box)
                scores.append(0.05 if black else 0.9)
                classes.append(a["category_id"])
            for k, (x, y) in enumerate([(0, 0), (w - 4, 0), (0, h - 4)]):
                boxes.append([x, y, x + 4, y + 4])
                scores.append(0.5)
                classes.append(k)
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
            inst.scores = torch.tensor(scores)
            inst.pred_classes = torch.tensor(classes)
            outs.append({"instances": inst})
        return outs


@pytest.mark.parametrize("fmt", ["coco", "voc"])
def test_evaluate_run_with_an_oracle_model(tiny_data, tmp_path, fmt):
    name = f"{PREFIX}_val" if fmt == "coco" else f"{PREFIX}_voc_val"
    cfg = load_cfg(QUICK_CONFIG, OPTS + ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"])
    model = _OracleModel(name)
    res, stats = rb.evaluate_run(cfg, model, name, "original", 0, tmp_path / "o")
    assert res["bbox"]["AP50"] == pytest.approx(100.0)
    res_b, stats_b = rb.evaluate_run(cfg, model, name, "black_patch", 0, tmp_path / "b")
    assert res_b["bbox"]["AP50"] < 100.0
    n_obj = sum(len(d["annotations"]) for d in DatasetCatalog.get(name))
    assert stats == {"images": 3} and stats_b == {"images": 3, "patches": n_obj}
    # a subset's ground truth is restricted to its images (else recall, hence AP, would drop)
    sub = dataset_subset(name, 2, tmp_path / "subsets")
    assert sub != name and len(DatasetCatalog.get(sub)) == 2
    res_s, stats_s = rb.evaluate_run(cfg, model, sub, "original", 0, tmp_path / "s")
    assert res_s["bbox"]["AP50"] == pytest.approx(100.0) and stats_s == {"images": 2}


@pytest.mark.slow  # runs the study end to end
def test_cli_end_to_end_json_equals_evaluator(tiny_data, tiny_ckpt, tmp_path):
    out = tmp_path / "rob"
    perts = ["original", "black_patch", "gaussian_noise"]
    report = rb.main(["--run", f"{QUICK_CONFIG}:{tiny_ckpt}:tiny", "--dataset", f"{PREFIX}_val",
                      "--max-images", "2", "--perturbations", *perts, "--seed", "3",
                      "--output-dir", str(out), *OPTS])
    saved = json.loads((out / "robustness.json").read_text())
    assert saved["study"] == "robustness" and saved["perturbations"] == perts
    assert saved["evaluator_type"] == "coco" and saved["evaluated_dataset"] != f"{PREFIX}_val"
    run = saved["runs"][0]
    assert run["label"] == "tiny"
    assert report["runs"][0]["AP50"] == run["AP50"]
    # recompute two columns independently with the evaluator on the first 2 images
    cfg = load_cfg(QUICK_CONFIG, OPTS)
    model = build_model_for_run(cfg, tiny_ckpt)
    name = saved["evaluated_dataset"]
    assert len(DatasetCatalog.get(name)) == 2
    for pert in ("original", "gaussian_noise"):
        loader = build_detection_test_loader(
            DatasetCatalog.get(name), mapper=rb.PerturbedDatasetMapper(cfg, pert, 3))
        res = inference_on_dataset(model, loader, build_evaluator(cfg, name, str(tmp_path / pert)))
        assert run["AP50"][pert] == pytest.approx(res["bbox"]["AP50"], abs=1e-9)
        assert run["AP"][pert] == pytest.approx(res["bbox"]["AP"], abs=1e-9)
        assert run["results"][pert]["bbox"]["AP75"] == pytest.approx(res["bbox"]["AP75"], abs=1e-9)
    md = (out / "robustness.md").read_text()
    assert "| Training Loss | Original | Black Patch | Gaussian Noise |" in md
    row = "| tiny | " + " | ".join(f"{run['AP50'][p]:.1f}" for p in perts) + " |"
    assert row in md
    assert (out / "robustness.png").is_file()
