"""Embedded synthetic detection dataset: small filled shapes (:data:`CLASSES`) on textured
backgrounds, so that foreground anchors are a tiny fraction of all (the imbalance AP-loss
addresses). Generated deterministically from a :class:`SyntheticShapesSpec` (numpy + PIL) and
cached under ``$AP_LOSS_D2_DATASETS``, else ``$DETECTRON2_DATASETS``, else ``datasets``, in
:func:`dataset_dirname` (e.g. ``synthetic_shapes_v1_seed0_128px``), written to a temporary
sibling folder and renamed into place when complete. Each folder holds ``manifest.json``,
``annotations/instances_{split}.json`` (COCO), ``images/{split}/`` and ``VOC/`` (Pascal VOC).

:func:`register_synthetic_shapes` registers ``synth_shapes_{train,val}`` (COCO,
``evaluator_type="coco"``) and ``synth_shapes_voc_{train,val}`` (VOC, ``year=2012``: area AP),
generated on first use. Pixels ``x0..x1-1`` have the COCO box ``[x0, y0, x1 - x0, y1 - y0]`` and
the VOC box ``xmin = x0 + 1, xmax = x1``, so both loaders yield identical XYXY boxes.
"""
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSES", "DATASET_NAMES", "DEFAULT_SPEC", "SPLITS", "SyntheticShapesSpec", "dataset_dirname",
    "dataset_root", "ensure_synthetic_dataset", "generate_synthetic_dataset", "load_synthetic_coco",
    "load_synthetic_voc", "load_validated_coco_json", "load_validated_voc_instances",
    "register_synthetic_shapes",
]

#: The class names, in contiguous-id order (COCO category ids are 1, 2, 3).
CLASSES: Tuple[str, ...] = ("circle", "square", "triangle")
SPLITS: Tuple[str, ...] = ("train", "val")
#: Bumped whenever the generator's output changes (it is part of the folder name).
GENERATOR_VERSION = 1
MANIFEST = "manifest.json"

#: Names registered by :func:`register_synthetic_shapes` with the default prefixes.
DATASET_NAMES: Tuple[str, ...] = ("synth_shapes_train", "synth_shapes_val", "synth_shapes_voc_train", "synth_shapes_voc_val")


@dataclass(frozen=True)
class SyntheticShapesSpec:
    """Parameters of the synthetic shapes dataset (the default: the main job's). Image ``i`` of
    a split has its own generator seeded by ``(seed, split, i)``; images are ``image_size``
    square; ``num_train`` / ``num_val`` >= 2 (Detectron2's VOC loader cannot read a one-line
    split list); objects per image uniform in ``[min_objects, max_objects]``, extents
    log-uniform in ``[min_size, max_size]`` pixels, re-sampled above ``max_overlap_iou`` with an
    earlier object."""

    seed: int = 0
    image_size: int = 128
    num_train: int = 600
    num_val: int = 100
    min_objects: int = 4
    max_objects: int = 12
    min_size: int = 6
    max_size: int = 28
    max_overlap_iou: float = 0.3
    jpeg_quality: int = 95

    def __post_init__(self):
        problems = []
        if self.image_size < 16:
            problems.append(f"image_size={self.image_size} < 16")
        if self.num_train < 2 or self.num_val < 2:
            problems.append(f"num_train={self.num_train}, num_val={self.num_val} (need >= 2 each)")
        if not 1 <= self.min_objects <= self.max_objects:
            problems.append(f"objects range {self.min_objects}..{self.max_objects}")
        if not 3 <= self.min_size <= self.max_size < self.image_size:
            problems.append(f"size range {self.min_size}..{self.max_size} (need 3 <= min <= max < image_size)")
        if not 0.0 <= self.max_overlap_iou <= 1.0:
            problems.append(f"max_overlap_iou={self.max_overlap_iou}")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append(f"jpeg_quality={self.jpeg_quality}")
        if problems:
            raise ValueError("Invalid SyntheticShapesSpec: " + "; ".join(problems))

    def num_images(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}")
        return self.num_train if split == "train" else self.num_val

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT_SPEC = SyntheticShapesSpec()


def _spec_or_default(spec: Optional[SyntheticShapesSpec]) -> SyntheticShapesSpec:
    if spec is None:
        return DEFAULT_SPEC
    if not isinstance(spec, SyntheticShapesSpec):
        raise TypeError(f"spec must be a SyntheticShapesSpec, got {type(spec).__name__}")
    return spec


def dataset_dirname(spec: Optional[SyntheticShapesSpec] = None) -> str:
    """Folder name of the spec, e.g. ``synthetic_shapes_v1_seed0_128px``, plus a hash of the
    spec when it differs from :data:`DEFAULT_SPEC` in more than ``seed`` / ``image_size``."""
    spec = _spec_or_default(spec)
    name = f"synthetic_shapes_v{GENERATOR_VERSION}_seed{spec.seed}_{spec.image_size}px"
    reference = dataclasses.replace(DEFAULT_SPEC, seed=spec.seed, image_size=spec.image_size)
    if spec != reference:
        blob = json.dumps(spec.to_dict(), sort_keys=True).encode()
        name += "_" + hashlib.sha1(blob).hexdigest()[:8]
    return name


def datasets_root() -> Path:
    """``$AP_LOSS_D2_DATASETS``, else ``$DETECTRON2_DATASETS``, else ``datasets``."""
    env = os.environ.get("AP_LOSS_D2_DATASETS") or os.environ.get("DETECTRON2_DATASETS")
    return Path(os.path.expanduser(env or "datasets"))


def dataset_root(spec: Optional[SyntheticShapesSpec] = None, root: Union[str, Path, None] = None) -> Path:
    """Folder of the dataset of ``spec`` under ``root`` (default: :func:`datasets_root`); nothing
    is generated."""
    base = Path(os.path.expanduser(str(root))) if root is not None else datasets_root()
    return base / dataset_dirname(spec)


def _paths(folder: Path, split: str) -> Dict[str, Path]:
    json_file = folder / "annotations" / f"instances_{split}.json"
    return {"json_file": json_file, "image_root": folder / "images" / split, "voc_dir": folder / "VOC"}


def _rng(spec: SyntheticShapesSpec, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, SPLITS.index(split), index, GENERATOR_VERSION])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured float32 HxWx3 background in [0, 255]: gradient + stripes + blobs + noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(30, 225, size=(2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5)), 0, 1)
    img = c0 + (c1 - c0) * t[..., None]
    # Stripes: 1-3 sinusoidal gratings of random orientation, period and colour.
    for _ in range(rng.integers(1, 4)):
        phi = rng.uniform(0, np.pi)
        period = rng.uniform(4.0, 32.0) / size
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (np.cos(phi) * xx + np.sin(phi) * yy) / period + phase)
        img += wave[..., None] * rng.uniform(-30, 30, size=3).astype(np.float32)
    # Blobs: soft Gaussian spots, larger than the objects so they are not object-like.
    for _ in range(rng.integers(2, 6)):
        cx, cy = rng.uniform(0, 1, size=2)
        sigma = rng.uniform(0.08, 0.3)
        g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma * sigma))
        img += g[..., None] * rng.uniform(-60, 60, size=3).astype(np.float32)
    img += rng.normal(0, rng.uniform(4, 12), size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255)


def _shape_mask(rng: np.random.Generator, cls: str, w: int, h: int) -> np.ndarray:
    """Boolean hxw mask of one filled shape whose tight box is exactly the whole mask."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    if cls == "circle":
        d.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif cls == "square":
        d.rectangle([0, 0, w - 1, h - 1], fill=255)
    else:  # triangle: one side on an edge of the box, the apex on the opposite edge
        a = float(rng.uniform(0, 1))
        bases = (  # base at bottom, top, left, right
            [(0, h - 1), (w - 1, h - 1), (a * (w - 1), 0)],
            [(0, 0), (w - 1, 0), (a * (w - 1), h - 1)],
            [(0, 0), (0, h - 1), (w - 1, a * (h - 1))],
            [(w - 1, 0), (w - 1, h - 1), (0, a * (h - 1))],
        )
        d.polygon(bases[int(rng.integers(4))], fill=255)
    return np.asarray(m) > 127


def _iou_one_to_many(box: Sequence[int], boxes: List[Sequence[int]]) -> float:
    if not boxes:
        return 0.0
    b = np.asarray(boxes, dtype=np.float64)
    ix = np.clip(np.minimum(b[:, 2], box[2]) - np.maximum(b[:, 0], box[0]), 0, None)
    iy = np.clip(np.minimum(b[:, 3], box[3]) - np.maximum(b[:, 1], box[1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    union = area + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return float((inter / union).max())


def _render_image(spec: SyntheticShapesSpec, split: str, index: int):
    """Returns (HxWx3 uint8 RGB image, list of (class index, [x0, y0, x1, y1]) integer boxes)."""
    rng = _rng(spec, split, index)
    size = spec.image_size
    img = _background(rng, size)
    mean_color = img.reshape(-1, 3).mean(0)
    objects: List[Tuple[int, List[int]]] = []
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    log_lo, log_hi = math.log(spec.min_size), math.log(spec.max_size + 1)
    for _ in range(n):
        for _attempt in range(20):
            cls_idx = int(rng.integers(len(CLASSES)))
            s = min(spec.max_size, int(math.exp(rng.uniform(log_lo, log_hi))))
            if CLASSES[cls_idx] == "triangle":
                w = s
                h = int(np.clip(round(s * rng.uniform(0.75, 1.33)), spec.min_size, spec.max_size))
            else:
                w = h = s
            x0 = int(rng.integers(0, size - w + 1))
            y0 = int(rng.integers(0, size - h + 1))
            box = [x0, y0, x0 + w, y0 + h]
            if _iou_one_to_many(box, [b for _, b in objects]) <= spec.max_overlap_iou:
                break
        else:
            continue  # crowded image: fewer objects
        # A colour that stands out from the average background.
        for _c in range(10):
            color = rng.uniform(0, 255, size=3)
            if np.abs(color - mean_color).max() > 70:
                break
        mask = _shape_mask(rng, CLASSES[cls_idx], w, h)
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:  # cannot happen for sizes >= 3, but never emit an empty object
            continue
        box = [x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1]
        region = img[y0 : y0 + h, x0 : x0 + w]
        region[mask] = color.astype(np.float32)
        objects.append((cls_idx, box))
    return np.round(img).astype(np.uint8), objects


def _sub(parent, tag: str, **fields):
    node = ET.SubElement(parent, tag)
    for key, value in fields.items():
        ET.SubElement(node, key).text = str(value)
    return node


def _voc_xml(file_name: str, size: int, objects) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC"
    ET.SubElement(root, "filename").text = file_name
    _sub(root, "size", width=size, height=size, depth=3)
    ET.SubElement(root, "segmented").text = "0"
    for cls_idx, (x0, y0, x1, y1) in objects:
        obj = _sub(root, "object", name=CLASSES[cls_idx], pose="Unspecified", truncated=0, difficult=0)
        # VOC: 1-based inclusive pixel indices; pixels x0..x1-1 -> xmin=x0+1, xmax=x1.
        _sub(obj, "bndbox", xmin=x0 + 1, ymin=y0 + 1, xmax=int(x1), ymax=int(y1))
    return ET.tostring(root, encoding="utf-8")


def _write_split(spec: SyntheticShapesSpec, folder: Path, split: str, progress) -> None:
    paths = _paths(folder, split)
    paths["image_root"].mkdir(parents=True, exist_ok=True)
    voc = paths["voc_dir"]
    images, annotations, ids = [], [], []
    for i in range(spec.num_images(split)):
        img, objects = _render_image(spec, split, i)
        stem = f"{split}_{i:06d}"
        buf = BytesIO()
        Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=spec.jpeg_quality)
        for folder in (paths["image_root"], voc / "JPEGImages"):
            (folder / f"{stem}.jpg").write_bytes(buf.getvalue())
        (voc / "Annotations" / f"{stem}.xml").write_bytes(_voc_xml(f"{stem}.jpg", spec.image_size, objects))
        image_id, size = i + 1, spec.image_size
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": size, "height": size})
        for cls_idx, (x0, y0, x1, y1) in objects:
            w, h = x1 - x0, y1 - y0
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cls_idx + 1,
                "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0,
            })
        ids.append(stem)
        progress.update(1)
    coco = {
        "info": {"description": f"ap_loss_d2 synthetic shapes ({split})", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CLASSES)],
    }
    paths["json_file"].parent.mkdir(parents=True, exist_ok=True)
    paths["json_file"].write_text(json.dumps(coco, sort_keys=True))
    (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(s + "\n" for s in ids))


def _manifest(spec: SyntheticShapesSpec) -> dict:
    splits = {s: spec.num_images(s) for s in SPLITS}
    return dict(generator="ap_loss_d2.data.synthetic", generator_version=GENERATOR_VERSION, classes=list(CLASSES),
                spec=spec.to_dict(), splits=splits)


def _is_complete(folder: Path, spec: SyntheticShapesSpec) -> bool:
    manifest = folder / MANIFEST
    if not folder.is_dir():
        return False
    if not manifest.is_file():
        raise RuntimeError(f"{folder} exists but has no {MANIFEST}, so it is not a complete generation; delete it to regenerate")
    got = json.loads(manifest.read_text())
    if got != _manifest(spec):
        raise RuntimeError(
            f"{manifest} describes a different dataset than the requested spec "
            f"({got.get('spec')} vs {spec.to_dict()}). Delete {folder} to regenerate it."
        )
    return True


def generate_synthetic_dataset(
    spec: Optional[SyntheticShapesSpec] = None, folder: Union[str, Path, None] = None, show_progress: bool = True
) -> Path:
    """Generate the dataset of ``spec`` into ``folder`` (default: :func:`dataset_root`) through a
    temporary sibling renamed into place (another process's finished copy is kept); returns
    ``folder``. ``FileExistsError`` if it exists already (see :func:`ensure_synthetic_dataset`)."""
    from tqdm import tqdm

    spec = _spec_or_default(spec)
    folder = Path(folder) if folder is not None else dataset_root(spec)
    if folder.exists():
        raise FileExistsError(f"{folder} exists already")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (tmp / "VOC" / sub).mkdir(parents=True, exist_ok=True)
        total = spec.num_train + spec.num_val
        with tqdm(total=total, desc=f"Generating {folder.name}", unit="img", disable=not show_progress) as bar:
            for split in SPLITS:
                _write_split(spec, tmp, split, bar)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(spec), indent=2, sort_keys=True))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.exists():
                raise
            logger.info("%s was completed by another process; discarding this copy", folder)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Synthetic shapes dataset ready at %s", folder)
    return folder


def ensure_synthetic_dataset(spec: Optional[SyntheticShapesSpec] = None, root: Union[str, Path, None] = None) -> Path:
    """The folder of the dataset of ``spec`` under the cache ``root``, generated first if not
    cached yet; RuntimeError if the folder exists but is not a complete dataset of ``spec``."""
    spec = _spec_or_default(spec)
    folder = dataset_root(spec, root)
    if _is_complete(folder, spec):
        return folder
    try:
        return generate_synthetic_dataset(spec, folder)
    except FileExistsError:  # another process renamed its copy into place meanwhile
        _is_complete(folder, spec)
        return folder


def _check_box_xyxy(box, width, height, tol=1e-3) -> Optional[str]:
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return "non-finite coordinates"
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return "degenerate (zero or negative width/height)"
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        return f"outside the {width}x{height} image"
    return None


def load_validated_coco_json(json_file, image_root, dataset_name: Optional[str] = None) -> List[dict]:
    """Detectron2's ``load_coco_json``; ValueError naming the file, image and annotation for a
    missing image file, an unknown category or image id, a degenerate or out-of-image box."""
    from detectron2.data.datasets import load_coco_json

    json_file, image_root = str(json_file), str(image_root)
    with open(json_file) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_file} is not valid JSON ({e}); the file is truncated or corrupt. Restore it "
                             "(an embedded synth_shapes set is generated again once its folder is deleted).") from None
    cat_ids = {c["id"] for c in raw.get("categories", [])}
    images = {img["id"]: img for img in raw.get("images", [])}
    for img in images.values():
        path = os.path.join(image_root, img["file_name"])
        if not os.path.isfile(path):
            raise ValueError(f"{json_file}: image id {img['id']}: image file {path} does not exist")
    for ann in raw.get("annotations", []):
        img = images.get(ann.get("image_id"))
        where = f"{json_file}: annotation id {ann.get('id')}"
        if img is None:
            raise ValueError(f"{where} refers to unknown image id {ann.get('image_id')}")
        where = f"{json_file}: image id {img['id']} ({img['file_name']}), annotation id {ann.get('id')}"
        if ann.get("category_id") not in cat_ids:
            raise ValueError(f"{where}: unknown category id {ann.get('category_id')} (known: {sorted(cat_ids)})")
        bbox = ann.get("bbox")
        if bbox is None or len(bbox) != 4:
            raise ValueError(f"{where}: bbox {bbox!r} is not [x, y, w, h]")
        x, y, w, h = bbox
        if problem := _check_box_xyxy([x, y, x + w, y + h], img["width"], img["height"]):
            raise ValueError(f"{where}: bbox {bbox} (XYWH) is {problem}")
    return load_coco_json(json_file, image_root, dataset_name)


def _voc_offender(dirname: str, split: str, class_names) -> Optional[str]:
    ids = Path(dirname, "ImageSets", "Main", split + ".txt").read_text().split()
    for fileid in ids:
        xml = os.path.join(dirname, "Annotations", fileid + ".xml")
        if not os.path.isfile(xml):
            return f"{xml}: annotation file listed in {split}.txt does not exist"
        for obj in ET.parse(xml).findall("object"):
            name = obj.findtext("name")
            if name not in class_names:
                return f"{xml} (image {fileid}): unknown class name {name!r} (known: {list(class_names)})"
    return None


def load_validated_voc_instances(dirname, split: str, class_names: Sequence[str] = CLASSES) -> List[dict]:
    """Detectron2's ``load_voc_instances``; ValueError naming the file and image for an unknown
    class, a missing annotation or image file, a degenerate or out-of-image box."""
    from detectron2.data.datasets import load_voc_instances

    dirname = str(dirname)
    try:
        dicts = load_voc_instances(dirname, split, list(class_names))
    except (ValueError, OSError) as e:
        offender = _voc_offender(dirname, split, class_names)
        raise ValueError(offender or f"{dirname} ({split}): {e}") from e
    for r in dicts:
        xml = os.path.join(dirname, "Annotations", f"{r['image_id']}.xml")
        if not os.path.isfile(r["file_name"]):
            raise ValueError(f"{xml} (image {r['image_id']}): image file {r['file_name']} does not exist")
        for k, ann in enumerate(r["annotations"]):
            if problem := _check_box_xyxy(ann["bbox"], r["width"], r["height"]):
                raise ValueError(f"{xml} (image {r['image_id']}), object {k}: box {ann['bbox']} (XYXY, after the "
                                 f"loader's -1 on xmin/ymin) is {problem}")
    return dicts


def load_synthetic_coco(split: str, spec: Optional[SyntheticShapesSpec] = None, root=None, dataset_name=None) -> List[dict]:
    """Dataset dicts of one split in COCO format (generates the dataset if needed)."""
    folder = ensure_synthetic_dataset(spec, root)
    return load_validated_coco_json(_paths(folder, split)["json_file"], _paths(folder, split)["image_root"], dataset_name)


def load_synthetic_voc(split: str, spec: Optional[SyntheticShapesSpec] = None, root=None) -> List[dict]:
    """Dataset dicts of one split via Detectron2's VOC loader (generates the dataset if needed)."""
    folder = ensure_synthetic_dataset(spec, root)
    return load_validated_voc_instances(_paths(folder, split)["voc_dir"], split, CLASSES)


def register_synthetic_shapes(spec=None, root=None, prefix: str = "synth_shapes", voc_prefix=None) -> List[str]:
    """Register ``{prefix}_{train,val}`` (COCO format) and ``{voc_prefix}_{train,val}`` (default
    ``prefix + "_voc"``, Pascal VOC format) of the dataset of ``spec``, generated on first use;
    the cache root is resolved now. Names already registered are left alone. Returns the names."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    spec = _spec_or_default(spec)
    folder = dataset_root(spec, root)
    voc_prefix = voc_prefix or f"{prefix}_voc"
    registered, names = set(DatasetCatalog.list()), []
    common = {"thing_classes": list(CLASSES), "dataset_root": str(folder), "synthetic_spec": spec.to_dict()}
    for split in SPLITS:
        p, name = _paths(folder, split), f"{prefix}_{split}"
        names.append(name)
        if name not in registered:
            DatasetCatalog.register(name, lambda split=split, name=name: load_synthetic_coco(split, spec, folder.parent, name))
            MetadataCatalog.get(name).set(
                json_file=str(p["json_file"]), image_root=str(p["image_root"]), evaluator_type="coco",
                thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(CLASSES))}, **common,
            )
        name = f"{voc_prefix}_{split}"
        names.append(name)
        if name not in registered:
            DatasetCatalog.register(name, lambda split=split: load_synthetic_voc(split, spec, folder.parent))
            MetadataCatalog.get(name).set(
                dirname=str(p["voc_dir"]), split=split, year=2012, evaluator_type="pascal_voc", **common
            )
    return names
