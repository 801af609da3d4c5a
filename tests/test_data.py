"""Synthetic dataset, loaders, registration and SSD augmentation (CPU, offline, fast)."""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("detectron2")

import detectron2.data.transforms as T  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import load_coco_json, load_voc_instances  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402

from ap_loss_d2.config import add_ap_loss_config  # noqa: E402
from ap_loss_d2.data import (  # noqa: E402
    CLASSES,
    DATASET_NAMES,
    BoxAwareDatasetMapper,
    CenterKeepingCropTransform,
    ExpandTransform,
    MinIoURandomCrop,
    PhotometricDistort,
    PhotometricTransform,
    RandomExpand,
    SyntheticShapesSpec,
    build_ssd_augmentation,
    build_train_mapper,
    dataset_root,
    ensure_synthetic_dataset,
    load_synthetic_coco,
    load_synthetic_voc,
    load_validated_coco_json,
    load_validated_voc_instances,
    register_synthetic_shapes,
)

TINY = SyntheticShapesSpec(seed=3, image_size=64, num_train=6, num_val=2, max_size=20)


def _tree_digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    ensure_synthetic_dataset(TINY, root)
    return root


@pytest.fixture
def tiny_copy(tiny_root, tmp_path):
    """A private, writable copy of the tiny dataset (for corruption tests)."""
    src = dataset_root(TINY, tiny_root)
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Generation and caching
# ---------------------------------------------------------------------------------------------


def test_generation_is_deterministic(tiny_root, tmp_path):
    first = dataset_root(TINY, tiny_root)
    again = ensure_synthetic_dataset(TINY, tmp_path / "again")
    assert again.name == first.name
    digest = _tree_digest(first)
    assert digest == _tree_digest(again)  # json, xml and JPEG bytes identical
    assert sum(k.endswith(".jpg") for k in digest) == 2 * (TINY.num_train + TINY.num_val)

    other = SyntheticShapesSpec(**{**TINY.to_dict(), "seed": 4})
    other_dir = ensure_synthetic_dataset(other, tmp_path / "other")
    assert other_dir.name != first.name
    js = lambda d: (d / "annotations" / "instances_train.json").read_text()  # noqa: E731
    assert js(other_dir) != js(first)
    img = lambda d: np.asarray(Image.open(d / "images/train/train_000000.jpg"))  # noqa: E731
    assert not np.array_equal(img(other_dir), img(first))


def test_cache_layout_and_content(tiny_root):
    folder = dataset_root(TINY, tiny_root)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["spec"] == TINY.to_dict() and manifest["classes"] == list(CLASSES)
    coco = json.loads((folder / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    assert len(coco["images"]) == TINY.num_train
    per_image = {}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["iscrowd"] == 0 and a["area"] == w * h
        assert TINY.min_size - 1 <= max(w, h) <= TINY.max_size and min(w, h) >= 2
        assert 0 <= x and 0 <= y and x + w <= TINY.image_size and y + h <= TINY.image_size
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert all(1 <= n <= TINY.max_objects for n in per_image.values())
    for split in ("train", "val"):
        ids = (folder / "VOC/ImageSets/Main" / f"{split}.txt").read_text().split()
        assert len(ids) == TINY.num_images(split)
        assert all((folder / "VOC/JPEGImages" / f"{i}.jpg").is_file() for i in ids)
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # temp folder renamed


def test_default_spec_and_dirname():
    d = SyntheticShapesSpec()
    assert (d.image_size, d.num_train, d.num_val) == (128, 600, 100)
    assert (d.min_objects, d.max_objects, d.min_size, d.max_size) == (4, 12, 6, 28)
    assert dataset_root(d, "/x").name == "synthetic_shapes_v1_seed0_128px"
    assert dataset_root(TINY, "/x").name.startswith("synthetic_shapes_v1_seed3_64px_")
    with pytest.raises(ValueError):
        SyntheticShapesSpec(num_val=1)
    with pytest.raises(ValueError):
        SyntheticShapesSpec(min_size=30, max_size=20)


def test_cache_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AP_LOSS_D2_DATASETS", str(tmp_path / "a"))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "b"))
    assert dataset_root(TINY).parent == tmp_path / "a"
    monkeypatch.delenv("AP_LOSS_D2_DATASETS")
    assert dataset_root(TINY).parent == tmp_path / "b"


def test_incomplete_folder_is_reported(tmp_path):
    (tmp_path / dataset_root(TINY, tmp_path).name).mkdir()  # looks like a dataset, no manifest
    with pytest.raises(RuntimeError, match="manifest"):
        ensure_synthetic_dataset(TINY, tmp_path)


# ---------------------------------------------------------------------------------------------
# Loaders and registration
# ---------------------------------------------------------------------------------------------


def _xyxy(anns):
    boxes = [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)


def test_coco_and_voc_describe_the_same_boxes(tiny_root):
    folder = dataset_root(TINY, tiny_root)
    for split in ("train", "val"):
        js = str(folder / f"annotations/instances_{split}.json")
        coco = load_coco_json(js, str(folder / "images" / split))
        voc = load_voc_instances(str(folder / "VOC"), split, list(CLASSES))
        assert len(coco) == len(voc) == TINY.num_images(split)
        for rc, rv in zip(coco, voc):
            assert Path(rc["file_name"]).name == Path(rv["file_name"]).name
            assert (rc["height"], rc["width"]) == (rv["height"], rv["width"])
            np.testing.assert_array_equal(_xyxy(rc["annotations"]), _xyxy(rv["annotations"]))
            # load_coco_json maps ids 1..3 to contiguous 0..2 only when given a dataset name.
            assert [a["category_id"] - 1 for a in rc["annotations"]] == [
                a["category_id"] for a in rv["annotations"]
            ]
        assert load_synthetic_voc(split, TINY, tiny_root)[0]["annotations"] == voc[0]["annotations"]


def test_images_are_textured_rgb(tiny_root):
    records = load_synthetic_coco("train", TINY, tiny_root)
    r = records[0]
    img = np.asarray(Image.open(r["file_name"])).astype(np.float32)
    assert img.shape == (TINY.image_size, TINY.image_size, 3)
    assert img.std() > 10  # textured, not flat


def test_registration_is_lazy_and_idempotent(tmp_path):
    names = register_synthetic_shapes(TINY, tmp_path, prefix="t_lazy")
    assert names == ["t_lazy_train", "t_lazy_voc_train", "t_lazy_val", "t_lazy_voc_val"]
    assert not any(tmp_path.iterdir())  # nothing generated by registering
    assert register_synthetic_shapes(TINY, tmp_path, prefix="t_lazy") == names  # no crash
    meta = MetadataCatalog.get("t_lazy_val")
    assert meta.evaluator_type == "coco" and meta.thing_classes == list(CLASSES)
    assert meta.json_file.endswith("instances_val.json")
    vmeta = MetadataCatalog.get("t_lazy_voc_train")
    assert (vmeta.evaluator_type, vmeta.split, vmeta.year) == ("pascal_voc", "train", 2012)
    dicts = DatasetCatalog.get("t_lazy_train")  # first use generates
    assert len(dicts) == TINY.num_train
    assert {a["category_id"] for r in dicts for a in r["annotations"]} <= {0, 1, 2}
    assert Path(meta.json_file).is_file()
    assert len(DatasetCatalog.get("t_lazy_voc_val")) == TINY.num_val


def test_register_datasets_adds_the_project_sets_only():
    from ap_loss_d2.data import BUILTIN_VOC_DATASETS, register_datasets

    loaders = {n: DatasetCatalog[n] for n in DatasetCatalog.list()}
    names = register_datasets()  # conftest called it once already: nothing changes
    assert names == ["synth_shapes_train", "synth_shapes_voc_train", "synth_shapes_val", "synth_shapes_voc_val"] + [
        n + "_nodifficult" for n in BUILTIN_VOC_DATASETS
    ]
    assert set(DATASET_NAMES) <= set(names) and {n: DatasetCatalog[n] for n in DatasetCatalog.list()} == loaders
    assert MetadataCatalog.get("synth_shapes_train").evaluator_type == "coco"
    twin = MetadataCatalog.get("voc_2012_trainval_nodifficult")
    assert twin.difficult_dropped_from == "voc_2012_trainval"
    assert twin.dirname == MetadataCatalog.get("voc_2012_trainval").dirname


_CATALOG_SCRIPT = """
import json, math, sys
import torch
if sys.argv[1] == "package-first":
    import ap_loss_d2.data as data, ap_loss_d2.modeling
    import detectron2.data
elif sys.argv[1] == "detectron2-first":
    import detectron2.data
    import ap_loss_d2.data as data, ap_loss_d2.modeling
else:
    import detectron2.data
from detectron2.data import DatasetCatalog, MetadataCatalog
out = {"import": [DatasetCatalog.list(), MetadataCatalog.list()]}
if sys.argv[1] != "detectron2-only":
    from detectron2.config import get_cfg
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import SimpleTrainer
    from detectron2.modeling import build_model
    from ap_loss_d2.config import add_ap_loss_config
    out["registered"] = data.register_datasets()
    cfg = add_ap_loss_config(get_cfg())
    cfg.merge_from_file(sys.argv[2])
    model = build_model(cfg)
    loader = build_detection_train_loader(cfg, mapper=data.build_train_mapper(cfg))
    trainer = SimpleTrainer(model, loader, torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.train(0, 2)
    out["loss"] = trainer.storage.history("total_loss").latest()
    out["trained"] = [DatasetCatalog.list(), MetadataCatalog.list()]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_catalogs_in_both_import_orders(synth_dataset_dir):
    """Fresh processes: importing the package registers nothing, whichever of it and Detectron2's
    built-in registrations comes first; after register_datasets() and two training iterations
    on synth_shapes, the catalogs are Detectron2's plus exactly the project's names."""
    root = Path(__file__).resolve().parents[1]
    cfg = str(root / "tests" / "configs" / "tiny_synth_retinanet.yaml")
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}

    def run(order):
        proc = subprocess.run([sys.executable, "-c", _CATALOG_SCRIPT, order, cfg], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT "):])

    stock = run("detectron2-only")["import"]
    results = [run("package-first"), run("detectron2-first")]
    for r in results:
        assert [sorted(x) for x in r["import"]] == [sorted(x) for x in stock]
        assert len(r["registered"]) == 11 and not set(r["registered"]) & set(stock[0])
        expected = [sorted(set(x) | set(r["registered"])) for x in stock]
        assert [sorted(x) for x in r["trained"]] == expected
        assert math.isfinite(r["loss"])
    assert results[0]["registered"] == results[1]["registered"]


def test_voc_evaluator_accepts_the_xml(tiny_root):
    """Detectron2's VOC evaluator parses our xml; ground truth as predictions gives AP 100."""
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.structures import Boxes, Instances

    names = register_synthetic_shapes(TINY, tiny_root, prefix="t_evalvoc")
    ev = PascalVOCDetectionEvaluator(names[3])
    ev.reset()
    for r in DatasetCatalog.get(names[3]):
        inst = Instances((r["height"], r["width"]))
        inst.pred_boxes = Boxes(torch.tensor(_xyxy(r["annotations"]), dtype=torch.float32))
        inst.scores = torch.ones(len(r["annotations"]))
        inst.pred_classes = torch.tensor([a["category_id"] for a in r["annotations"]])
        ev.process([{"image_id": r["image_id"]}], [{"instances": inst}])
    res = ev.evaluate()["bbox"]
    assert res["AP50"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _coco_paths(folder):
    return folder / "annotations" / "instances_val.json", folder / "images" / "val"


def test_missing_image_file_is_reported(tiny_copy):
    js, root = _coco_paths(tiny_copy)
    (root / "val_000001.jpg").unlink()
    with pytest.raises(ValueError, match=r"instances_val\.json.*image id 2.*val_000001\.jpg"):
        load_validated_coco_json(js, root)
    (tiny_copy / "VOC/JPEGImages/val_000001.jpg").unlink()
    with pytest.raises(ValueError, match=r"val_000001\.xml.*val_000001\.jpg"):
        load_validated_voc_instances(tiny_copy / "VOC", "val")


def test_unknown_category_is_reported(tiny_copy):
    js, root = _coco_paths(tiny_copy)
    data = json.loads(js.read_text())
    ann = data["annotations"][-1]
    ann["category_id"] = 7
    js.write_text(json.dumps(data))
    msg = rf"instances_val\.json.*image id {ann['image_id']}.*unknown category id 7"
    with pytest.raises(ValueError, match=msg):
        load_validated_coco_json(js, root)
    xml = tiny_copy / "VOC/Annotations/val_000000.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>hexagon", 1))
    with pytest.raises(ValueError, match=r"val_000000\.xml.*unknown class name"):
        load_validated_voc_instances(tiny_copy / "VOC", "val")


@pytest.mark.parametrize("bbox", [[5, 5, 0, 4], [5, 5, 4, -1], [60, 5, 10, 4]])
def test_degenerate_or_outside_box_is_reported(tiny_copy, bbox):
    js, root = _coco_paths(tiny_copy)
    data = json.loads(js.read_text())
    ann = data["annotations"][0]
    ann["bbox"] = bbox
    js.write_text(json.dumps(data))
    msg = rf"instances_val\.json.*image id {ann['image_id']}.*annotation id {ann['id']}"
    with pytest.raises(ValueError, match=msg):
        load_validated_coco_json(js, root)


def test_degenerate_voc_box_is_reported(tiny_copy):
    import re

    xml = tiny_copy / "VOC/Annotations/val_000001.xml"
    text = xml.read_text()
    xmin = re.search(r"<xmin>(\d+)</xmin>", text).group(1)
    text = re.sub(r"<xmax>\d+</xmax>", f"<xmax>{int(xmin) - 1}</xmax>", text, count=1)
    xml.write_text(text)
    with pytest.raises(ValueError, match=r"val_000001\.xml.*image val_000001.*degenerate"):
        load_validated_voc_instances(tiny_copy / "VOC", "val")


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


def _white_box_image(h=100, w=160, box=(30, 20, 70, 60)):
    img = np.zeros((h, w, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 255
    return img, np.array([box], dtype=np.float32)


def _white_extent(img, thr=200):
    ys, xs = np.nonzero(img.min(axis=2) > thr)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def _apply(augs, img, boxes):
    aug_input = T.AugInput(img, boxes=boxes)
    tfms = T.AugmentationList(augs)(aug_input)
    return aug_input.image, aug_input.boxes, tfms


def test_expand_moves_boxes_with_content():
    np.random.seed(0)
    img, boxes = _white_box_image()
    aug = RandomExpand(max_ratio=3, prob=1.0, fill=(10, 20, 30))
    out, out_boxes, tfms = _apply([aug], img, boxes)
    assert isinstance(tfms.transforms[0], ExpandTransform)
    assert out.shape[0] > img.shape[0] and out.dtype == np.uint8
    np.testing.assert_allclose(out_boxes[0], _white_extent(out), atol=1)
    t = tfms.transforms[0]
    assert tuple(out[0, 0]) == (10, 20, 30) or t.left == 0 and t.top == 0
    np.testing.assert_array_equal(t.inverse().apply_image(out), img)


def test_crop_moves_boxes_with_content_and_drops_outside_centres():
    img, boxes = _white_box_image()
    crop = CenterKeepingCropTransform(40, 30, 80, 60, orig_w=160, orig_h=100)
    out = crop.apply_image(img)
    b = crop.apply_box(np.vstack([boxes, [[100, 0, 150, 20]], [[0, 0, 44, 40]]]))
    np.testing.assert_allclose(b[0], _white_extent(out), atol=1)  # clipped to the crop
    np.testing.assert_array_equal(b[1:], 0)  # centres outside -> emptied
    # The augmentation: every crop it picks keeps the white box consistent with the content.
    found = 0
    for seed in range(30):
        np.random.seed(seed)
        out, out_boxes, tfms = _apply([MinIoURandomCrop()], img, boxes)
        if isinstance(tfms.transforms[0], CenterKeepingCropTransform):
            found += 1
            h, w = out.shape[:2]
            assert 0.5 <= h / w <= 2 and w >= 0.3 * 160 - 1 and h >= 0.3 * 100 - 1
            np.testing.assert_allclose(out_boxes[0], _white_extent(out), atol=1)
    assert found > 5


def test_flip_and_resize_keep_boxes_consistent():
    img, boxes = _white_box_image()
    out, out_boxes, _ = _apply([T.Resize((512, 512)), T.RandomFlip(prob=1.0)], img, boxes)
    assert out.shape[:2] == (512, 512)
    np.testing.assert_allclose(out_boxes[0], _white_extent(out, thr=127), atol=2)


def test_full_ssd_pipeline_keeps_boxes_consistent():
    img, boxes = _white_box_image()
    augs = build_ssd_augmentation(256)
    assert [type(a) for a in augs][:3] == [PhotometricDistort, RandomExpand, MinIoURandomCrop]
    augs[0] = PhotometricDistort(prob=0.0)  # keep the white box white for the check
    for seed in range(10):
        np.random.seed(seed)
        out, out_boxes, _ = _apply(augs, img, boxes)
        assert out.shape == (256, 256, 3) and out.dtype == np.uint8
        np.testing.assert_allclose(out_boxes[0], _white_extent(out, thr=127), atol=2)
    assert build_ssd_augmentation(300, is_train=False)[0].shape == (300, 300)


def test_photometric_distort_keeps_boxes_and_range():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    boxes = np.array([[3, 4, 20, 30]], dtype=np.float32)
    changed = 0
    for seed in range(20):
        np.random.seed(seed)
        out, out_boxes, tfms = _apply([PhotometricDistort()], img.copy(), boxes.copy())
        assert out.dtype == np.uint8 and out.shape == img.shape
        np.testing.assert_array_equal(out_boxes, boxes)
        changed += not np.array_equal(out, img)
    assert changed >= 15
    full = PhotometricTransform(40.0, 1.4, False, 1.5, 17.0, "RGB")
    f = full.apply_image(img.astype(np.float32))
    assert f.dtype == np.float32 and f.min() >= 0 and f.max() <= 255
    # Identity parameters leave the image as it was (HSV round trip is exact up to rounding).
    same = PhotometricTransform(0.0, 1.0, True, 1.0, 0.0, "BGR").apply_image(img)
    assert np.abs(same.astype(int) - img).max() <= 1
    # A hue shift of 120 degrees rotates pure RGB primaries: red -> green.
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    green = PhotometricTransform(hue_delta=120.0, image_format="RGB").apply_image(red)
    assert (green[..., 1] == 255).all() and (green[..., [0, 2]] == 0).all()


# ---------------------------------------------------------------------------------------------
# Config and mapper
# ---------------------------------------------------------------------------------------------


def test_config_and_train_mapper(tiny_root):
    cfg = get_cfg()
    add_ap_loss_config(cfg)
    add_ap_loss_config(cfg)  # idempotent
    assert (cfg.AP_LOSS_INPUT.AUGMENTATION, cfg.AP_LOSS_INPUT.FIXED_SIZE) == ("default", 512)
    mapper = build_train_mapper(cfg)
    assert type(mapper) is DatasetMapper

    cfg.AP_LOSS_INPUT.AUGMENTATION = "ssd"
    cfg.AP_LOSS_INPUT.FIXED_SIZE = 192
    mapper = build_train_mapper(cfg)
    assert isinstance(mapper, BoxAwareDatasetMapper) and isinstance(mapper, DatasetMapper)
    records = load_synthetic_coco("train", TINY, tiny_root)
    np.random.seed(0)
    for r in records:
        out = mapper(r)
        assert tuple(out["image"].shape) == (3, 192, 192)
        boxes = out["instances"].gt_boxes.tensor
        assert len(boxes) >= 1
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert boxes.min() >= 0 and boxes.max() <= 192
    cfg.AP_LOSS_INPUT.AUGMENTATION = "bogus"
    with pytest.raises(ValueError, match="bogus"):
        build_train_mapper(cfg)


def test_mapper_drops_boxes_whose_centre_leaves_the_crop(tmp_path):
    cfg = get_cfg()
    add_ap_loss_config(cfg)
    img, _ = _white_box_image()

    class FixedCrop(T.Augmentation):
        def get_transform(self, image, boxes):
            assert boxes is not None and len(boxes) == 2  # the mapper feeds the boxes
            return CenterKeepingCropTransform(0, 0, 80, 100, orig_w=160, orig_h=100)

    mapper = BoxAwareDatasetMapper(cfg, is_train=True, augmentations=[FixedCrop()])
    path = str(tmp_path / "crop.png")
    Image.fromarray(img).save(path)
    record = {
        "file_name": path,
        "height": 100,
        "width": 160,
        "image_id": 0,
        "annotations": [
            {"bbox": [30, 20, 70, 60], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},
            {"bbox": [70, 20, 130, 60], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1},
        ],
    }
    out = mapper(record)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [0]
    np.testing.assert_allclose(inst.gt_boxes.tensor[0].numpy(), [30, 20, 70, 60])
