"""Paper Fig. 5 / Fig. 12: the detections of two or more models on the same images, side by side.

Details: docs/studies.md#studiesvisualize."""
import copy
from pathlib import Path

from ap_loss_d2.data import register_datasets

from .common import (
    RUN_SPEC, build_model_for_run, markdown_table, number, prepare_runs, progress, save_figure,
    study_argument_parser, subplots, timestamp, write_study_outputs
)

STUDY = "visualize"


def detect(model, cfg, dataset_dict, score_thresh):
    """Detectron2 ``Instances`` (CPU, original image size) of ``model`` on one dataset dict, the
    detections scoring >= ``score_thresh``, and the RGB image they belong to."""
    import torch
    from detectron2.data import DatasetMapper
    from detectron2.data import detection_utils as utils

    inputs = DatasetMapper(cfg, is_train=False)(copy.deepcopy(dataset_dict))
    with torch.no_grad():
        instances = model([inputs])[0]["instances"].to("cpu")
    instances = instances[instances.scores >= score_thresh]
    image = utils.read_image(dataset_dict["file_name"], format="RGB")
    return instances, image


def _draw(image, instances, metadata):
    from detectron2.utils.visualizer import Visualizer

    # small images (the embedded set: 128 px) are drawn enlarged so that the labels stay legible
    scale = max(1.0, 512 / max(image.shape[:2]))
    return Visualizer(image, metadata=metadata, scale=scale).draw_instance_predictions(instances).get_image()


def _figure(rows, labels, titles_per_row, path):
    """rows: [[image per model]]; one subplot per (row, model), column titles = labels."""
    h, w = rows[0][0].shape[:2]
    scale = 4.0 / max(h, w)
    fig, axes = subplots(len(rows), len(labels), squeeze=False,
                         figsize=(len(labels) * w * scale + 0.5, len(rows) * h * scale + 0.6))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            axes[r][c].imshow(img)
            axes[r][c].set(xticks=[], yticks=[], title=labels[c] if r == 0 else "")
            if c == 0:
                axes[r][c].set_ylabel(titles_per_row[r], fontsize=8)
    save_figure(fig, path, dpi=100)


def parse_args(argv=None):
    p = study_argument_parser(STUDY, __doc__.split("\n\n")[0], runs=RUN_SPEC)
    p.add_argument("--num-images", type=number(int), default=4)
    p.add_argument("--score-thresh", type=float, default=0.3)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        import cv2  # noqa: F401  (Detectron2's Visualizer needs OpenCV)
    except ImportError:
        raise ImportError("studies.visualize draws with Detectron2's Visualizer, which needs OpenCV: "
                          "pip install opencv-python-headless") from None
    if not 0 <= args.score_thresh <= 1:
        raise ValueError(f"--score-thresh={args.score_thresh} must be in [0, 1]")

    register_datasets()
    from detectron2.data import DatasetCatalog, MetadataCatalog

    out, specs, resolved, labels, dataset = prepare_runs(args)
    if dataset not in DatasetCatalog.list():
        raise KeyError(f"--dataset {dataset!r} is not registered; "
                       f"registered: {', '.join(sorted(DatasetCatalog.list()))}")
    dicts = DatasetCatalog.get(dataset)[: args.num_images]
    metadata = MetadataCatalog.get(dataset)
    num_classes = len(metadata.get("thing_classes", []))

    drawn = [[None] * len(specs) for _ in dicts]
    records = [{"file_name": d["file_name"], "image_id": d.get("image_id"), "detections": {}} for d in dicts]
    for m, ((cfg, _), spec, label) in enumerate(zip(resolved, specs, labels)):
        progress(STUDY, f"{label}: {len(dicts)} images of {dataset}")
        model = build_model_for_run(cfg, spec.weights)
        retina = cfg.MODEL.META_ARCHITECTURE.endswith("RetinaNet")
        k = cfg.MODEL.RETINANET.NUM_CLASSES if retina else cfg.MODEL.ROI_HEADS.NUM_CLASSES
        if num_classes and k != num_classes:
            raise ValueError(f"run {label!r} predicts {k} classes but {dataset!r} has {num_classes}")
        for i, d in enumerate(dicts):
            instances, image = detect(model, cfg, d, args.score_thresh)
            drawn[i][m] = _draw(image, instances, metadata)
            records[i]["detections"][label] = [
                {"box": [round(float(v), 2) for v in b], "score": round(float(s), 4), "class": int(c)}
                for b, s, c in zip(instances.pred_boxes.tensor.tolist(), instances.scores.tolist(),
                                   instances.pred_classes.tolist())
            ]

    row_titles = [Path(r["file_name"]).name for r in records]
    figures = []
    for i, row in enumerate(drawn):
        name = f"image_{i}.png"
        _figure([row], labels, [row_titles[i]], out / name)
        figures.append(name)
    _figure(drawn, labels, row_titles, out / f"{STUDY}.png")
    figures.append(f"{STUDY}.png")

    rows = [[row_titles[i], lab, len(r["detections"][lab]),
             ", ".join(f"{x['score']:.2f}" for x in r["detections"][lab][:5]) or "-"]
            for i, r in enumerate(records) for lab in labels]
    table = markdown_table(["image", "run", f"detections >= {args.score_thresh}", "top scores"], rows)
    report = {"study": STUDY, "created": timestamp(), "dataset": dataset, "score_thresh": args.score_thresh,
              "runs": [{"label": lab, "config": s.config, "weights": s.weights} for lab, s in zip(labels, specs)],
              "images": records, "figures": figures}
    md = [f"# Fig. 5 / 12: detections on {dataset} (score >= {args.score_thresh})", "", table, ""]
    md += [f"![{t}]({f})" for t, f in zip(row_titles, figures)]
    write_study_outputs(out, STUDY, report, md, table)
    return report


if __name__ == "__main__":
    main()
