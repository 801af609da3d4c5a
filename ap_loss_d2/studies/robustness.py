"""Robustness to local perturbations (the paper's Sec. 4.2.2 "Robustness", Table 3).

``python -m ap_loss_d2.studies.robustness --run CONFIG:WEIGHTS[:LABEL] [--run ...]
[--dataset NAME] [--max-images N] [--perturbations ...] [--seed S] --output-dir DIR``

Each checkpoint is evaluated with its dataset's own evaluator (``ap_loss_d2.evaluation
.build_evaluator``: COCO AP or Pascal VOC AP) on perturbed copies of the test set, made on the
fly by :class:`PerturbedDatasetMapper` (Detectron2's test ``DatasetMapper`` with the
perturbation applied to the decoded image before the test-time resize):

* ``original``: unchanged;
* ``black_patch``: a patch of half the box's width and height at the centre of every object is
  set to zero;
* ``random_patch``: that patch is replaced by content cut from a region of the same size that
  lies outside every box of the image (uniformly among all such regions); if there is none,
  the region overlapping the boxes least is used, and counted (``random_patch_fallbacks``);
* ``flip_patch``: that patch is replaced by itself flipped left/right, top/bottom or both
  (chosen at random per object);
* ``gaussian_noise``: zero-mean Gaussian noise of variance 0.01 added to the image scaled to
  [0, 1] (pixel / 255), then back to uint8 with rounding and clipping.

The paper's adversarial patch and DeepFool columns are not reproduced. Randomness is seeded per
image with ``seed + image_id`` (non-integer ids, e.g. VOC file ids, through CRC32), so results
are reproducible and independent of data-loader workers and order.

Outputs in ``--output-dir``: ``robustness.json`` (every evaluator result, AP50 and AP per
run and perturbation, perturbation statistics), ``robustness.md`` (Table 3: AP50 per run and
perturbation) and ``robustness.png`` (examples of every perturbation on the first image).
"""
import zlib
from collections import Counter
from typing import Callable, Dict

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators, inference_on_dataset
from detectron2.utils import comm

from ..data.mapper import BoxAwareDatasetMapper, annotation_boxes
from ..evaluation import build_evaluator
from .common import (
    add_opts,
    build_model_for_run,
    dataset_subset,
    fmt_num,
    markdown_table,
    prepare_runs,
    progress,
    pyplot,
    study_parser,
    timestamp,
    write_study_outputs,
)

__all__ = [
    "PERTURBATIONS",
    "PERTURBATION_NAMES",
    "PerturbAugmentation",
    "PerturbTransform",
    "PerturbationStats",
    "PerturbedDatasetMapper",
    "black_patch",
    "center_patch_region",
    "flip_patch",
    "gaussian_noise",
    "image_seed",
    "main",
    "random_patch",
]

STUDY = "robustness"
NOISE_VARIANCE = 0.01


# ---------------------------------------------------------------------------------------------
# Perturbations: f(image HxWxC uint8, boxes (B, 4) XYXY absolute, rng, stats=None) -> image
# ---------------------------------------------------------------------------------------------
def _round(v: float) -> int:
    return int(np.floor(v + 0.5))  # half up, unlike Python's round()


def center_patch_region(box, height: int, width: int):
    """Integer pixel region ``(x0, y0, x1, y1)`` (end exclusive) of the centre patch of ``box``:
    half the box's width and height (rounded half up, at least 1 pixel), centred on the box
    centre, clipped to the image. None if it falls outside the image."""
    bx0, by0, bx1, by1 = (float(v) for v in box)
    pw = max(1, _round((bx1 - bx0) / 2))
    ph = max(1, _round((by1 - by0) / 2))
    x0 = _round((bx0 + bx1) / 2 - pw / 2)
    y0 = _round((by0 + by1) / 2 - ph / 2)
    x0c, y0c = max(x0, 0), max(y0, 0)
    x1c, y1c = min(x0 + pw, width), min(y0 + ph, height)
    if x1c <= x0c or y1c <= y0c:
        return None
    return x0c, y0c, x1c, y1c


def _check(image, boxes):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected an HxWxC uint8 image, got {image.dtype} {image.shape}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return image, boxes


def _count(stats, key, n=1):
    if stats is not None:
        stats[key] = stats.get(key, 0) + n


def black_patch(image, boxes, rng=None, stats=None):
    """Zero the centre patch (half width, half height) of every box."""
    image, boxes = _check(image, boxes)
    out = image.copy()
    h, w = image.shape[:2]
    for box in boxes:
        r = center_patch_region(box, h, w)
        if r is not None:
            out[r[1]:r[3], r[0]:r[2]] = 0
            _count(stats, "patches")
    return out


FLIP_MODES = ("left_right", "top_bottom", "both")


def flip_patch(image, boxes, rng, stats=None):
    """Replace the centre patch of every box by itself flipped left/right, top/bottom or both
    (uniformly at random per box; the mode counts go to ``stats["flip_<mode>"]``)."""
    image, boxes = _check(image, boxes)
    out = image.copy()
    h, w = image.shape[:2]
    for box in boxes:
        r = center_patch_region(box, h, w)
        if r is None:
            continue
        mode = FLIP_MODES[int(rng.integers(len(FLIP_MODES)))]
        patch = image[r[1]:r[3], r[0]:r[2]]
        if mode in ("left_right", "both"):
            patch = patch[:, ::-1]
        if mode in ("top_bottom", "both"):
            patch = patch[::-1, :]
        out[r[1]:r[3], r[0]:r[2]] = patch
        _count(stats, "patches")
        _count(stats, f"flip_{mode}")
    return out


def box_mask(boxes, height: int, width: int) -> np.ndarray:
    """Boolean HxW mask of the pixels touched by any box (box ``[x0, x1]`` covers the columns
    ``floor(x0) .. ceil(x1) - 1``)."""
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c1, r1 = min(int(np.ceil(x1)), width), min(int(np.ceil(y1)), height)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def _window_sums(mask: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """Sum of ``mask`` over every ph x pw window; entry (y, x) is the window at top-left (y, x)."""
    s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    s[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    return s[ph:, pw:] - s[:-ph, pw:] - s[ph:, :-pw] + s[:-ph, :-pw]


def random_patch(image, boxes, rng, stats=None):
    """Replace the centre patch of every box by content cut from a same-size region outside
    every box of the image, chosen uniformly among all such regions. If no region of that size
    avoids all boxes, the least-overlapping one is used (ties at random) and counted in
    ``stats["random_patch_fallbacks"]``."""
    image, boxes = _check(image, boxes)
    out = image.copy()
    h, w = image.shape[:2]
    mask = box_mask(boxes, h, w)
    for box in boxes:
        r = center_patch_region(box, h, w)
        if r is None:
            continue
        pw, ph = r[2] - r[0], r[3] - r[1]
        sums = _window_sums(mask, ph, pw)
        best = sums.min()
        ys, xs = np.nonzero(sums == best)
        k = int(rng.integers(len(ys)))
        sy, sx = int(ys[k]), int(xs[k])
        if best > 0:
            _count(stats, "random_patch_fallbacks")
        out[r[1]:r[3], r[0]:r[2]] = image[sy:sy + ph, sx:sx + pw]
        _count(stats, "patches")
    return out


def gaussian_noise(image, boxes=None, rng=None, stats=None, variance: float = NOISE_VARIANCE):
    """Add N(0, ``variance``) noise to ``image / 255``, then back to uint8 (round, clip)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if rng is None:
        rng = np.random.default_rng()
    x = image.astype(np.float64) / 255.0 + rng.normal(0.0, np.sqrt(variance), size=image.shape)
    _count(stats, "noised_images")
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def original(image, boxes=None, rng=None, stats=None):
    """No perturbation (the image itself)."""
    return np.asarray(image)


#: name -> function, in the paper's column order.
PERTURBATIONS: Dict[str, Callable] = {
    "original": original,
    "black_patch": black_patch,
    "random_patch": random_patch,
    "flip_patch": flip_patch,
    "gaussian_noise": gaussian_noise,
}
#: name -> Table 3 column header.
PERTURBATION_NAMES = {
    "original": "Original",
    "black_patch": "Black Patch",
    "random_patch": "Random Patch",
    "flip_patch": "Flip Patch",
    "gaussian_noise": "Gaussian Noise",
}


def image_seed(seed: int, image_id) -> int:
    """``seed + image_id`` (integer ids); other ids (e.g. VOC file ids) via CRC32 of ``str``."""
    try:
        iid = int(image_id)
    except (TypeError, ValueError):
        iid = zlib.crc32(str(image_id).encode())
    return int(seed) + iid


# ---------------------------------------------------------------------------------------------
# Mapper
# ---------------------------------------------------------------------------------------------
class PerturbTransform(T.Transform):
    """Applies a perturbation function to the image; coordinates and segmentation unchanged.
    Per-image statistics of the perturbation are collected in ``stats``."""

    def __init__(self, fn, boxes, seed):
        super().__init__()
        self.fn, self.boxes, self.seed, self.stats = fn, boxes, seed, {}

    def apply_image(self, img):
        return self.fn(img, self.boxes, np.random.default_rng(self.seed), self.stats)

    def apply_coords(self, coords):
        return coords

    def apply_segmentation(self, segmentation):
        return segmentation

    def inverse(self):
        return T.NoOpTransform()


class PerturbAugmentation(T.Augmentation):
    """A :class:`PerturbTransform` of ``fn`` from the ``AugInput``'s ``boxes`` and
    ``image_seed`` (no per-image state on the augmentation)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def get_transform(self, image, boxes, image_seed):
        boxes = np.zeros((0, 4)) if boxes is None else boxes
        return PerturbTransform(self.fn, boxes, image_seed)


class PerturbedDatasetMapper(BoxAwareDatasetMapper):
    """Detectron2's test ``DatasetMapper(cfg, is_train=False)`` whose first augmentation applies
    ``perturbation`` (a key of :data:`PERTURBATIONS`) to the decoded image, with the record's
    annotation boxes (all of them, XYXY, through ``AugInput.boxes``) and
    ``np.random.default_rng(seed + image_id)`` (``AugInput.image_seed``).

    Returned dicts also carry ``"perturbation": {"name", "image_id", <per-image stats>}``.
    """

    include_crowd = True

    def __init__(self, cfg, perturbation: str, seed: int = 0):
        if perturbation not in PERTURBATIONS:
            raise ValueError(
                f"Unknown perturbation {perturbation!r}; valid: {', '.join(PERTURBATIONS)}"
            )
        super().__init__(cfg, is_train=False)
        self.perturbation = perturbation
        self.seed = seed
        # Perturb the decoded image first, then run Detectron2's test-time augmentations.
        self.augmentations = T.AugmentationList(
            [PerturbAugmentation(PERTURBATIONS[perturbation]), self.augmentations]
        )

    def aug_input(self, dataset_dict, image, sem_seg):
        aug_input = super().aug_input(dataset_dict, image, sem_seg)
        aug_input.image_seed = image_seed(self.seed, dataset_dict["image_id"])
        return aug_input

    def __call__(self, dataset_dict):
        out, transforms = self.map_with_transforms(dataset_dict)
        stats = next(t.stats for t in transforms.transforms if isinstance(t, PerturbTransform))
        out["perturbation"] = dict(
            name=self.perturbation, image_id=dataset_dict["image_id"], **stats
        )
        return out


class PerturbationStats(DatasetEvaluator):
    """Sums the mapper's per-image perturbation statistics (``"perturbation_stats"``)."""

    def reset(self):
        self._items = []

    def process(self, inputs, outputs):
        self._items.extend(i["perturbation"] for i in inputs if "perturbation" in i)

    def evaluate(self):
        items = [x for part in comm.gather(self._items, dst=0) for x in part]
        if not comm.is_main_process():
            return {}
        total = Counter()
        for it in items:
            total.update({k: v for k, v in it.items() if k not in ("name", "image_id")})
        return {"perturbation_stats": dict(images=len(items), **dict(sorted(total.items())))}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def evaluate_run(cfg, model, dataset_name, perturbation, seed, output_folder):
    """Evaluator results of ``model`` on ``dataset_name`` perturbed by ``perturbation``:
    ``(results, perturbation_stats)`` with ``results`` the dataset evaluator's dict."""
    mapper = PerturbedDatasetMapper(cfg, perturbation, seed)
    loader = build_detection_test_loader(
        DatasetCatalog.get(dataset_name), mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS
    )
    evaluator = DatasetEvaluators(
        [build_evaluator(cfg, dataset_name, str(output_folder)), PerturbationStats()]
    )
    results = dict(inference_on_dataset(model, loader, evaluator))
    stats = results.pop("perturbation_stats", {})
    return results, stats


def _metric(results, key):
    bbox = results.get("bbox") if isinstance(results, dict) else None
    if not bbox or key not in bbox:
        return None
    return float(bbox[key])


def plot_examples(dataset_name, perturbations, seed, path):
    """One figure: every perturbation of the first image of ``dataset_name`` (boxes drawn)."""
    record = DatasetCatalog.get(dataset_name)[0]
    image = read_image(record["file_name"], format="RGB")
    boxes = annotation_boxes(record, include_crowd=True)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(perturbations), figsize=(2.6 * len(perturbations), 3.0),
                             squeeze=False)
    for ax, name in zip(axes[0], perturbations):
        img = PERTURBATIONS[name](image, boxes, np.random.default_rng(
            image_seed(seed, record["image_id"])), None)
        ax.imshow(img)
        for x0, y0, x1, y1 in boxes:
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.6,
                                       color="yellow"))
        ax.set_title(PERTURBATION_NAMES[name], fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_table(report, metric=None, digits=1):
    """Table 3 as markdown: one row per run, one column per perturbation (``metric``)."""
    metric = metric or report["metric"]
    perts = report["perturbations"]
    rows = [[run["label"]] + [fmt_num(run[metric].get(p), digits) for p in perts]
            for run in report["runs"]]
    return markdown_table(["Training Loss"] + [PERTURBATION_NAMES[p] for p in perts], rows)


def parse_args(argv=None):
    p = study_parser(STUDY, __doc__)
    p.add_argument("--max-images", type=int, default=None,
                   help="evaluate on the first N images only (ground truth restricted too)")
    p.add_argument("--perturbations", nargs="+", choices=list(PERTURBATIONS),
                   default=list(PERTURBATIONS))
    p.add_argument("--seed", type=int, default=0, help="per-image seed is seed + image id")
    p.add_argument("--digits", type=int, default=1, help="decimals in the markdown table")
    p.add_argument("--no-plot", action="store_true", help="skip robustness.png")
    add_opts(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out, specs, resolved, labels, dataset = prepare_runs(args)
    eval_name = dataset_subset(dataset, args.max_images, out / "subsets")
    evaluator_type = MetadataCatalog.get(eval_name).get("evaluator_type", None)
    metric = "AP50"
    report = {
        "study": STUDY,
        "created": timestamp(),
        "dataset": dataset,
        "evaluated_dataset": eval_name,
        "evaluator_type": evaluator_type,
        "max_images": args.max_images,
        "metric": metric,
        "metrics": ["AP50", "AP"],
        "seed": args.seed,
        "noise_variance": NOISE_VARIANCE,
        "perturbations": list(args.perturbations),
        "perturbation_names": {p: PERTURBATION_NAMES[p] for p in args.perturbations},
        "runs": [],
        "figures": [],
    }
    n_total = len(specs) * len(args.perturbations)
    k = 0
    for spec, (cfg, _), label in zip(specs, resolved, labels):
        model = build_model_for_run(cfg, spec.weights)
        run = {"label": label, "config": spec.config, "weights": spec.weights or cfg.MODEL.WEIGHTS,
               "cls_loss": cfg.MODEL.CLS_LOSS.NAME, "results": {}, "perturbation_stats": {},
               "AP50": {}, "AP": {}}
        for pert in args.perturbations:
            k += 1
            progress(STUDY, f"({k}/{n_total}) {label}: {PERTURBATION_NAMES[pert]} on {eval_name}")
            folder = out / "eval" / f"run{len(report['runs'])}" / pert
            results, stats = evaluate_run(cfg, model, eval_name, pert, args.seed, folder)
            run["results"][pert] = results
            run["perturbation_stats"][pert] = stats
            for m in ("AP50", "AP"):
                run[m][pert] = _metric(results, m)
            progress(STUDY, f"    AP50 {fmt_num(run['AP50'][pert], 2)}, AP "
                            f"{fmt_num(run['AP'][pert], 2)}; {stats}")
        report["runs"].append(run)
        del model

    if not args.no_plot:
        try:
            plot_examples(eval_name, args.perturbations, args.seed, out / "robustness.png")
            report["figures"].append("robustness.png")
        except (OSError, ValueError) as e:
            progress(STUDY, f"no example figure: {type(e).__name__}: {e}")

    table = build_table(report, digits=args.digits)
    md = [f"## Robustness (Table 3): {metric} on `{dataset}`"
          + (f" (first {args.max_images} images)" if args.max_images else ""), "", table, ""]
    md.append(f"Evaluator: {evaluator_type}; seed {args.seed} (+ image id); Gaussian noise "
              f"variance {NOISE_VARIANCE} on [0, 1]. AP (0.5:0.95) is in robustness.json.")
    fallbacks = {r["label"]: r["perturbation_stats"].get("random_patch", {}).get(
        "random_patch_fallbacks", 0) for r in report["runs"]}
    if any(fallbacks.values()):
        md.append(f"Random patch fallbacks (no box-free region): {fallbacks}")
    if report["figures"]:
        md += ["", "![perturbation examples](robustness.png)"]
    write_study_outputs(out, "robustness", STUDY, report, md, table)
    return report


if __name__ == "__main__":
    main()
