"""RoI-sampling study of the paper's supplementary A4.3 (Table 14, Fig. 13): Faster R-CNN (CE vs
AP-loss) trained for several numbers of sampled RoIs per image.

Details: docs/studies.md#studiesroi_sampling."""
import contextlib
import logging
import sys
import time
from pathlib import Path

from .common import (
    bbox_results, build_model_for_run, check_run_settings, cls_loss_label, default_config, fmt_num, load_cfg,
    markdown_table, metrics_by_iteration, number, read_json, save_figure, scaled_schedule, study_argument_parser,
    subplots, to_jsonable, train_net_process, write_json
)

CONFIG_REL = "FasterRCNN/faster_rcnn_R_18_FPN_600it_synth_ce.yaml"
POSITIVE_FRACTION = 1.0
METRICS = ("AP", "AP50", "AP75")
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
    add("--verbose", action="store_true", help="also print the training and evaluation logs")
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


def evaluate(settings, run_dir):
    """Evaluate ``run_dir/model_final.pth`` with the project's evaluator; returns its output."""
    from ap_loss_d2.engine import Trainer

    cfg = load_cfg(settings["config"], [*settings["overrides"], "OUTPUT_DIR", str(run_dir)])
    return Trainer.test(cfg, build_model_for_run(cfg, str(Path(run_dir) / "model_final.pth")))


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


def _log_detectron2(path, verbose):
    """Send Detectron2's logs of the evaluations to ``path`` (and to the console if verbose)."""
    d2 = logging.getLogger("detectron2")
    d2.setLevel(logging.INFO)
    path = str(Path(path).resolve())
    if not any(getattr(h, "baseFilename", None) == path for h in d2.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s]: %(message)s"))
        d2.addHandler(handler)
    if verbose and not any(type(h) is logging.StreamHandler for h in d2.handlers):
        d2.addHandler(logging.StreamHandler(sys.stdout))


def _say(msg):
    print(f"[roi_sampling_study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    opts = list(args.opts)
    sizes, losses = sorted(set(args.sizes)), list(dict.fromkeys(args.losses))
    config = str(Path(args.config_file or default_config(CONFIG_REL)).resolve())
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    _log_detectron2(output_dir / "eval_log.txt", args.verbose)
    base = load_cfg(config, opts)
    meta = {"config": config, "iters": args.iters if args.iters is not None else base.SOLVER.MAX_ITER,
            "sizes": sizes, "losses": losses, "positive_fraction": POSITIVE_FRACTION, "overrides": opts,
            "test_datasets": list(base.DATASETS.TEST)}
    if not meta["test_datasets"]:
        raise SystemExit("the config has no DATASETS.TEST to evaluate on")
    runs = [(loss, size) for size in sizes for loss in losses]
    records, start = [], time.perf_counter()
    for i, (loss, size) in enumerate(runs, 1):
        tag, run_dir = f"[{i}/{len(runs)}] {loss} rois={size}", output_dir / f"{loss}_rois{size}"
        run_dir.mkdir(exist_ok=True)
        settings = {"config": config, "overrides": run_overrides(base, loss, size, args.iters) + opts}
        check_run_settings(run_dir, settings)
        eval_file = run_dir / "study_eval.json"
        if eval_file.exists():
            records.append(read_json(eval_file))
            _say(f"{tag}: done before, AP={fmt_num(records[-1]['AP'], 2)}")
            continue
        final = run_dir / "model_final.pth"
        if not final.exists():
            last = run_dir / "last_checkpoint"
            _say(f"{tag}: training" + (f" (resuming from {last.read_text().strip()})" if last.exists() else "")
                 + f", log: {run_dir / 'log.txt'}")
            t0 = time.perf_counter()
            _, code = train_net_process(  # evaluated once, below
                run_dir, config, [*settings["overrides"], "DATASETS.TEST", "()"], log="train_stdout.log",
                num_gpus=args.num_gpus, train_net=args.train_net, echo=args.verbose)
            log = run_dir / "train_stdout.log"
            if code != 0:
                raise RuntimeError(f"training failed (exit code {code}); last lines of {log}:\n"
                                   + "\n".join(log.read_text().splitlines()[-30:]))
            if not final.exists():
                raise RuntimeError(f"training ended without writing {final}; see {log}")
            _say(f"{tag}: trained in {time.perf_counter() - t0:.0f}s")
        _say(f"{tag}: evaluating on {', '.join(meta['test_datasets'])}")
        # pycocotools prints its tables: kept in the evaluation log unless --verbose
        with open(output_dir / "eval_log.txt", "a") as f, contextlib.redirect_stdout(sys.stdout if args.verbose else f):
            results = evaluate(settings, run_dir)
        bbox = bbox_results(results)
        record = to_jsonable({"loss": loss, "batch_size_per_image": size, **{k: float(bbox[k]) for k in METRICS},
                              "mean_sampled_rois_per_image": mean_sampled_rois(run_dir),
                              "output_dir": str(run_dir), "results": results})
        write_json(eval_file, record)
        records.append(record)
        write_report(output_dir, records, meta)
        _say(f"{tag}: " + " ".join(f"{m}={fmt_num(record[m], 2)}" for m in METRICS)
             + f" ({time.perf_counter() - start:.0f}s elapsed)")
    write_report(output_dir, records, meta)
    _say(f"table: {output_dir / (REPORT + '.md')}")
    _say(f"plot:  {output_dir / (REPORT + '.png')}")
    print(table14(records, sizes, losses), flush=True)
    return records


if __name__ == "__main__":
    main()
