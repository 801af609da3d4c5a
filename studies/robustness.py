"""Robustness to local perturbations (the paper's Sec. 4.2.2 "Robustness", Table 3).

Details: docs/studies.md#studiesrobustness."""
import argparse
import zlib
from collections import Counter
from typing import Callable

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.data.detection_utils import convert_image_to_rgb, read_image
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators, inference_on_dataset
from detectron2.utils import comm

from ap_loss_d2.data.mapper import BoxAwareDatasetMapper, annotation_boxes
from ap_loss_d2.evaluation import build_evaluator
from . import attacks
from .perturbations import NOISE_VARIANCE, PERTURBATIONS
from .common import (
    RUN_SPEC, build_model_for_run, dataset_subset, fmt_num, markdown_table, prepare_runs, progress,
    pyplot, study_argument_parser, timestamp, write_study_outputs
)

STUDY = "robustness"


#: name -> Table 3 column header.
PERTURBATION_NAMES = {
    "original": "Original", "black_patch": "Black Patch", "random_patch": "Random Patch",
    "flip_patch": "Flip Patch", "gaussian_noise": "Gaussian Noise", "advs_patch": "Advs-Patch",
    "deepfool": "DeepFool"
}
#: The white-box attacks (per model; RetinaNet only).
ATTACKS = ("advs_patch", "deepfool")
#: Every column of Table 3, in the paper's order (the choices of ``--perturbations``).
COLUMNS = ("original", "black_patch", "random_patch", "flip_patch", "advs_patch",
           "gaussian_noise", "deepfool")


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
    ``perturbation`` (a key of :data:`PERTURBATIONS`, or ``"advs_patch"`` with ``fn`` an
    :class:`~studies.attacks.AdversarialPatch`) to the decoded image, with the
    record's annotation boxes (all of them, XYXY, through ``AugInput.boxes``) and
    ``np.random.default_rng(seed + image_id)`` (``AugInput.image_seed``). ``fn``, when given,
    replaces the perturbation's function.

    Returned dicts also carry ``"perturbation": {"name", "image_id", <per-image stats>}``.
    """

    include_crowd = True

    def __init__(self, cfg, perturbation: str, seed: int = 0, fn: Callable = None):
        if perturbation == "advs_patch":
            if fn is None:
                raise ValueError("perturbation 'advs_patch' needs fn=AdversarialPatch(patch)")
        elif perturbation not in PERTURBATIONS:
            valid = ", ".join(list(PERTURBATIONS) + ["advs_patch (with fn)"])
            raise ValueError(f"Unknown perturbation {perturbation!r}; valid: {valid}")
        super().__init__(cfg, is_train=False)
        self.perturbation = perturbation
        self.seed = seed
        # Perturb the decoded image first, then run Detectron2's test-time augmentations.
        self.augmentations = T.AugmentationList(
            [PerturbAugmentation(fn or PERTURBATIONS[perturbation]), self.augmentations]
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
def evaluate_run(cfg, model, dataset_name, perturbation, seed, output_folder, fn=None):
    """Evaluator results of ``model`` on ``dataset_name`` perturbed by ``perturbation`` (its
    function replaced by ``fn`` if given, e.g. an ``AdversarialPatch``):
    ``(results, perturbation_stats)`` with ``results`` the dataset evaluator's dict."""
    mapper = PerturbedDatasetMapper(cfg, perturbation, seed, fn=fn)
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


def plot_examples(dataset_name, perturbations, seed, path, fns=None, image_format="RGB"):
    """One figure: every image perturbation of the first image of ``dataset_name`` (boxes
    drawn); ``fns`` maps a name to its function where it is not in :data:`PERTURBATIONS`
    (``advs_patch``); names without a function (``deepfool``) are left out. ``image_format``:
    the format the functions expect (the patch's channel order)."""
    fns = dict(PERTURBATIONS, **(fns or {}))
    perturbations = [p for p in perturbations if p in fns]
    record = DatasetCatalog.get(dataset_name)[0]
    image = read_image(record["file_name"], format=image_format)
    boxes = annotation_boxes(record, include_crowd=True)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(perturbations), figsize=(2.6 * len(perturbations), 3.0),
                             squeeze=False)
    for ax, name in zip(axes[0], perturbations):
        img = fns[name](image, boxes, np.random.default_rng(
            image_seed(seed, record["image_id"])), None)
        ax.imshow(convert_image_to_rgb(img, image_format))
        for x0, y0, x1, y1 in boxes:
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.6,
                                       color="yellow"))
        ax.set_title(PERTURBATION_NAMES[name], fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(run, metric, pert, digits):
    if pert == "deepfool":
        return fmt_num((run.get("deepfool") or {}).get("rho_scaled"), digits + 1)
    return fmt_num(run[metric].get(pert), digits)


def column_header(pert, report=None):
    """Table 3 header of a column (DeepFool with its scale)."""
    if pert == "deepfool":
        scale = (report or {}).get("deepfool", {}).get("scale", DEEPFOOL_SCALE)
        return f"DeepFool (rho x {fmt_num(scale, 0)})"
    return PERTURBATION_NAMES[pert]


def build_table(report, metric=None, digits=1):
    """Table 3 as markdown: one row per run, one column per perturbation (``metric``; the
    DeepFool column: its scaled mean rho, with one more decimal)."""
    metric = metric or report["metric"]
    perts = report["perturbations"]
    rows = [[run["label"]] + [_cell(run, metric, p, digits) for p in perts]
            for run in report["runs"]]
    return markdown_table(["Training Loss"] + [column_header(p, report) for p in perts], rows)


DEEPFOOL_SCALE = 1000.0


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a float") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return value


def parse_args(argv=None):
    p = study_argument_parser(STUDY, __doc__, runs=RUN_SPEC)
    p.add_argument("--max-images", type=int, default=None,
                   help="evaluate on the first N images only (ground truth restricted too)")
    p.add_argument("--perturbations", nargs="+", choices=list(COLUMNS), default=list(COLUMNS),
                   help="Table 3 columns (default: all, in the paper's order); advs_patch and "
                        "deepfool need RetinaNet runs")
    p.add_argument("--seed", type=int, default=0, help="per-image seed is seed + image id")
    p.add_argument("--digits", type=int, default=1, help="decimals in the markdown table")
    p.add_argument("--no-plot", action="store_true", help="skip robustness.png")
    g = p.add_argument_group("Advs-Patch (one universal patch per run, trained white-box)")
    g.add_argument("--patch-dataset", default=None,
                   help="training images of the patch (default: the run's DATASETS.TRAIN[0])")
    g.add_argument("--patch-images", type=_positive(int), default=64,
                   help="the first N images of --patch-dataset")
    g.add_argument("--patch-steps", type=_positive(int), default=100, help="Adam steps")
    g.add_argument("--patch-lr", type=_positive(float), default=0.03,
                   help="Adam step size on pixel values in [0, 1]")
    g.add_argument("--patch-batch", type=_positive(int), default=8, help="images per step")
    g.add_argument("--patch-size", type=_positive(int), default=32,
                   help="side of the square patch in pixels before resizing")
    g.add_argument("--patch-seed", type=int, default=0, help="initial patch and image order")
    g = p.add_argument_group("DeepFool (minimal L2 perturbation per test image)")
    g.add_argument("--deepfool-images", type=_positive(int), default=None,
                   help="attack the first N evaluated images (default: all)")
    g.add_argument("--deepfool-max-iter", type=_positive(int), default=50,
                   help="DeepFool steps per image before it counts as failed")
    g.add_argument("--deepfool-overshoot", type=_non_negative_float, default=0.02,
                   help="DeepFool's overshoot")
    g.add_argument("--deepfool-score-thresh", type=float, default=None,
                   help="score an anchor must fall below (default: the run's "
                        "MODEL.RETINANET.SCORE_THRESH_TEST)")
    g.add_argument("--deepfool-scale", type=_positive(float), default=DEEPFOOL_SCALE,
                   help="factor on rho in the table")
    return p.parse_args(argv)


def check_attacks(args, resolved):
    """Fail before any work when an attack is asked of a run it does not support."""
    from detectron2.modeling import META_ARCH_REGISTRY

    for pert in ATTACKS:
        if pert not in args.perturbations:
            continue
        for cfg, label in resolved:
            try:
                attacks.check_attack_model(
                    META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE), pert)
            except ValueError as e:
                raise ValueError(f"run {label!r}: {e}") from None
            if pert == "deepfool":
                t = args.deepfool_score_thresh
                attacks.check_threshold(cfg.MODEL.RETINANET.SCORE_THRESH_TEST if t is None else t)


def _save_png(array, path):
    from PIL import Image

    Image.fromarray(array).save(path)


def run_advs_patch(args, cfg, model, run_index, out):
    """Train the run's patch, save it as PNG; ``(AdversarialPatch, summary dict)``."""
    dataset = args.patch_dataset or cfg.DATASETS.TRAIN[0]
    examples = attacks.load_examples(cfg, dataset, args.patch_images)
    res = attacks.train_adversarial_patch(
        model, examples, steps=args.patch_steps, lr=args.patch_lr, batch_size=args.patch_batch,
        size=args.patch_size, seed=args.patch_seed, log=lambda m: progress(STUDY, "    " + m))
    name = f"advs_patch_run{run_index}.png"
    _save_png(attacks.patch_to_rgb_uint8(res["patch"], cfg.INPUT.FORMAT), out / name)
    summary = {k: v for k, v in res.items() if k != "patch"}
    summary.update(dataset=dataset, file=name, image_format=cfg.INPUT.FORMAT,
                   objective_definition="mean softplus(score logit) of the matched anchors "
                                        "at their object's class (minimised)")
    return attacks.AdversarialPatch(res["patch"]), summary


def main(argv=None):
    args = parse_args(argv)
    out, specs, resolved, labels, dataset = prepare_runs(args)
    check_attacks(args, [(cfg, lab) for (cfg, _), lab in zip(resolved, labels)])
    eval_name = dataset_subset(dataset, args.max_images, out / "subsets")
    evaluator_type = MetadataCatalog.get(eval_name).get("evaluator_type", None)
    metric = "AP50"
    report = {
        "study": STUDY, "created": timestamp(), "dataset": dataset, "evaluated_dataset": eval_name,
        "evaluator_type": evaluator_type, "max_images": args.max_images, "metric": metric,
        "metrics": ["AP50", "AP"], "seed": args.seed, "noise_variance": NOISE_VARIANCE,
        "perturbations": list(args.perturbations),
        "perturbation_names": {p: PERTURBATION_NAMES[p] for p in args.perturbations}, "runs": [],
        "figures": []
    }
    if "advs_patch" in args.perturbations:
        report["advs_patch"] = dict(
            dataset=args.patch_dataset, images=args.patch_images, steps=args.patch_steps,
            lr=args.patch_lr, batch_size=args.patch_batch, size=args.patch_size,
            seed=args.patch_seed)
    if "deepfool" in args.perturbations:
        report["deepfool"] = dict(
            images=args.deepfool_images, max_iter=args.deepfool_max_iter,
            overshoot=args.deepfool_overshoot, score_thresh=args.deepfool_score_thresh,
            scale=args.deepfool_scale,
            definition="rho = mean over images attacked successfully of ||r||_2 / ||x||_2 "
                       "(x: test-resized input, pixel units); binary DeepFool on "
                       "max over matched anchors of score logit - logit(threshold)")
    n_total = len(specs) * len(args.perturbations)
    k = 0
    plot_fns = {}
    for spec, (cfg, _), label in zip(specs, resolved, labels):
        model = build_model_for_run(cfg, spec.weights)
        index = len(report["runs"])
        run = {"label": label, "config": spec.config, "weights": spec.weights or cfg.MODEL.WEIGHTS,
               "cls_loss": cfg.MODEL.CLS_LOSS.NAME, "results": {}, "perturbation_stats": {},
               "AP50": {}, "AP": {}}
        for pert in args.perturbations:
            k += 1
            progress(STUDY, f"({k}/{n_total}) {label}: {PERTURBATION_NAMES[pert]} on {eval_name}")
            if pert == "deepfool":
                run["deepfool"] = attacks.deepfool_dataset(
                    cfg, model, eval_name, max_images=args.deepfool_images,
                    threshold=args.deepfool_score_thresh, max_iter=args.deepfool_max_iter,
                    overshoot=args.deepfool_overshoot, scale=args.deepfool_scale,
                    log=lambda m: progress(STUDY, "    " + m))
                d = run["deepfool"]
                progress(STUDY, f"    rho x {args.deepfool_scale:g}: {fmt_num(d['rho_scaled'], 3)}"
                                f"; succeeded {d['succeeded']}/{d['attacked']} attacked images")
                continue
            fn = None
            if pert == "advs_patch":
                fn, run["advs_patch"] = run_advs_patch(args, cfg, model, index, out)
                plot_fns.setdefault("advs_patch", (fn, cfg.INPUT.FORMAT))
            folder = out / "eval" / f"run{index}" / pert
            results, stats = evaluate_run(cfg, model, eval_name, pert, args.seed, folder, fn=fn)
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
            fmt = plot_fns["advs_patch"][1] if plot_fns else "RGB"
            plot_examples(eval_name, args.perturbations, args.seed, out / "robustness.png",
                          fns={k: v[0] for k, v in plot_fns.items()}, image_format=fmt)
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
    if "advs_patch" in args.perturbations:
        a = report["advs_patch"]
        md += ["", f"Advs-Patch: one {a['size']}x{a['size']} patch per run, {a['steps']} Adam "
                   f"steps (step size {a['lr']:g}, {a['batch_size']} images per step, seed "
                   f"{a['seed']}) on the first {a['images']} images of the patch dataset, "
                   "minimising the mean softplus of the matched anchors' score logits at their "
                   "object's class; pasted resized into the centre half-box of every object. "
                   "Objective on the training images, initial -> final patch: " + "; ".join(
                       f"{r['label']} {r['advs_patch']['initial_objective']:.4f} -> "
                       f"{r['advs_patch']['final_objective']:.4f} (`{r['advs_patch']['file']}`)"
                       for r in report["runs"] if "advs_patch" in r)]
    if "deepfool" in args.perturbations:
        d = report["deepfool"]
        md += ["", f"DeepFool: rho = mean ||r||_2 / ||x||_2 over the images attacked "
                   f"successfully, times {d['scale']:g} (larger = more robust); binary DeepFool "
                   f"(overshoot {d['overshoot']:g}, at most {d['max_iter']} steps) on the max "
                   "over the anchors matched to the objects of the score logit at the object's "
                   "class minus logit(score threshold). Per run: " + "; ".join(
                       f"{r['label']} succeeded {r['deepfool']['succeeded']}/"
                       f"{r['deepfool']['attacked']} attacked images ("
                       f"{r['deepfool']['already_undetected']} already below the threshold "
                       f"{r['deepfool']['threshold']:g}, {r['deepfool']['no_objects']} without "
                       f"matched objects, of {r['deepfool']['images']})"
                       for r in report["runs"] if "deepfool" in r)]
    if report["figures"]:
        md += ["", "![perturbation examples](robustness.png)"]
    write_study_outputs(out, "robustness", STUDY, report, md, table)
    return report


if __name__ == "__main__":
    main()
