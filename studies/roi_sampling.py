"""RoI-sampling study of the paper's supplementary A4.3 (Table 14, Fig. 13): Faster R-CNN (CE vs
AP-loss) trained for several numbers of sampled RoIs per image.

Details: docs/studies.md#studiesroi_sampling."""
from pathlib import Path

from .common import (
    BBOX_METRICS, cls_loss_label, default_config, fmt_num, load_cfg, markdown_table, metrics_by_iteration, number,
    progress, save_figure, scaled_schedule, study_argument_parser, subplots, sweep_run, write_json
)

CONFIG_REL = "FasterRCNN/faster_rcnn_R_18_FPN_600it_synth_ce.yaml"
POSITIVE_FRACTION = 1.0
METRICS = BBOX_METRICS
REPORT = "roi_sampling_study"


def build_parser():
    from ap_loss_d2.losses.registry import cls_loss_names

    parser = study_argument_parser("roi_sampling", __doc__.split("\n\n")[0],
                                   config=f"configs/{CONFIG_REL}, a model with APLossROIHeads", num_gpus=True)
    add = parser.add_argument
    add("--sizes", type=number(int), nargs="+", default=[512, 1024, 1536, 2048, 3072, 4096],
        help="values of MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE")
    add("--losses", nargs="+", default=["ce", "ap"], choices=cls_loss_names("roi_heads"),
        help="values of MODEL.CLS_LOSS.NAME")
    add("--iters", type=number(int), default=None,
        help="SOLVER.MAX_ITER of each run, SOLVER.STEPS scaled to match (default: the config's)")
    add("--train-net", default=None,
        help="another training script taking Detectron2's default_argument_parser arguments")
    return parser


def run_overrides(base_cfg, loss, size, iters):
    """The study's overrides of one run (the user's overrides are appended after them)."""
    opts = ["MODEL.CLS_LOSS.NAME", loss, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", str(size),
            "MODEL.ROI_HEADS.POSITIVE_FRACTION", str(POSITIVE_FRACTION),
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", str(max(base_cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN, size))]
    if iters is not None:
        steps = scaled_schedule(base_cfg.SOLVER.STEPS, base_cfg.SOLVER.MAX_ITER, iters)
        opts += ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", repr(steps)]
    return opts


def mean_sampled_rois(run_dir):
    """Mean RoIs sampled per image in training (``roi_head/num_{fg,bg}_samples``); None if not logged."""
    path = Path(run_dir) / "metrics.json"
    keys = ("roi_head/num_fg_samples", "roi_head/num_bg_samples")
    values = [sum(r[k] for k in keys) for r in (metrics_by_iteration(path)[0].values() if path.exists() else [])
              if all(k in r for k in keys)]
    return sum(values) / len(values) if values else None


def table14(records, sizes, losses):
    """Table 14: per RoI batch size, AP/AP50/AP75 and RoIs sampled of each loss."""
    by_key = {(r["loss"], r["batch_size_per_image"]): r for r in records}
    head = ["#RoIs/img"] + [f"{cls_loss_label(loss)} {m}" for loss in losses for m in (*METRICS, "sampled")]
    rows = []
    for size in sizes:
        rows.append([str(size)])
        for r in (by_key.get((loss, size)) for loss in losses):
            rows[-1] += [fmt_num(r[m], 2) if r else "-" for m in METRICS]
            rows[-1].append(fmt_num(r["mean_sampled_rois_per_image"], 0) if r else "-")
    return markdown_table(head, rows) + "\n"


def write_report(output_dir, records, meta):
    """Write the markdown table, the JSON and the plot of the runs finished so far."""
    sizes, losses = meta["sizes"], meta["losses"]
    write_json(output_dir / f"{REPORT}.json", {**meta, "metrics": list(METRICS), "runs": records})
    overrides = " ".join(meta["overrides"])
    lines = ["# RoI-sampling study (paper supplementary A4.3, Table 14 / Fig. 13)", "",
             f"- config: `{meta['config']}`", f"- overrides: `{overrides}`" if overrides else "- overrides: none",
             f"- {meta['iters']} iterations per run, ROI_HEADS.POSITIVE_FRACTION {POSITIVE_FRACTION}",
             f"- evaluated on {', '.join(meta['test_datasets'])}; {len(records)}/{len(sizes) * len(losses)} "
             "runs finished", "",
             "AP, AP50, AP75 of each run (the evaluator's output); 'sampled': mean number of RoIs per "
             "image actually sampled during training.", "", table14(records, sizes, losses)]
    (output_dir / f"{REPORT}.md").write_text("\n".join(lines))
    fig, ax = subplots(figsize=(6, 4))
    for loss in losses:
        points = sorted((r["batch_size_per_image"], r["AP"]) for r in records
                        if r["loss"] == loss and r["AP"] is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=cls_loss_label(loss))
    ax.set(xticks=sorted(sizes), xlabel="number of RoI samples per image", ylabel="AP",
           title="AP vs #RoIs in the second stage (positive fraction 1.0)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    save_figure(fig, output_dir / f"{REPORT}.png")


def main(argv=None):
    args = build_parser().parse_args(argv)
    opts = list(args.opts)
    sizes, losses = sorted(set(args.sizes)), list(dict.fromkeys(args.losses))
    config = str(Path(args.config_file or default_config(CONFIG_REL)).resolve())
    output_dir = Path(args.output_dir).resolve()
    base = load_cfg(config, opts)
    meta = {"config": config, "iters": args.iters if args.iters is not None else base.SOLVER.MAX_ITER,
            "sizes": sizes, "losses": losses, "positive_fraction": POSITIVE_FRACTION, "overrides": opts,
            "test_datasets": list(base.DATASETS.TEST)}
    if not meta["test_datasets"]:
        raise SystemExit("the config has no DATASETS.TEST to evaluate on")
    output_dir.mkdir(parents=True, exist_ok=True)
    runs = [(loss, size) for size in sizes for loss in losses]
    records = []
    for i, (loss, size) in enumerate(runs, 1):
        overrides = run_overrides(base, loss, size, args.iters) + opts
        progress(REPORT, f"[{i}/{len(runs)}] {loss} rois={size}")
        r = sweep_run(REPORT, output_dir / f"{loss}_rois{size}", config, overrides,
                      {"config": config, "overrides": overrides}, num_gpus=args.num_gpus, train_net=args.train_net)
        records.append({**r, "loss": loss, "batch_size_per_image": size, **{m: r.get(m) for m in METRICS},
                        "mean_sampled_rois_per_image": mean_sampled_rois(r["run_dir"])})
        write_report(output_dir, records, meta)
    progress(REPORT, f"table: {output_dir / (REPORT + '.md')}, plot: {output_dir / (REPORT + '.png')}")
    print(table14(records, sizes, losses), flush=True)
    return records


if __name__ == "__main__":
    main()
