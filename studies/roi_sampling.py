"""RoI-sampling study of the paper's supplementary A4.3 (Table 14, Fig. 13).

Details: docs/studies.md#studiesroi_sampling."""
import contextlib
import logging
import sys
import time
from pathlib import Path

from .common import (
    check_run_settings, cls_loss_label, default_config, fmt_num, markdown_table,
    metrics_by_iteration, pyplot, read_json, scaled_schedule, study_argument_parser, to_jsonable,
    train_net_command, run_logged, write_json
)

CONFIG_REL = "FasterRCNN/faster_rcnn_R_18_FPN_600it_synth_ce.yaml"
DEFAULT_SIZES = (512, 1024, 1536, 2048, 3072, 4096)
DEFAULT_LOSSES = ("ce", "ap")
POSITIVE_FRACTION = 1.0
METRICS = ("AP", "AP50", "AP75")

RUN_FILE = "study_run.json"  # the settings of a run directory
EVAL_FILE = "study_eval.json"  # the evaluator's output for a finished run
REPORT = "roi_sampling_study"


def build_parser():
    from ap_loss_d2.losses.registry import cls_loss_names

    parser = study_argument_parser(
        "roi_sampling",
        "Train and evaluate Faster R-CNN (CE vs AP-loss) for several numbers of sampled RoIs per "
        "image (paper supplementary A4.3, Table 14 / Fig. 13).",
        config=f"configs/{CONFIG_REL}, a model with APLossROIHeads", num_gpus=True)
    add = parser.add_argument
    add("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
        help="values of MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE")
    add("--losses", nargs="+", default=list(DEFAULT_LOSSES), choices=cls_loss_names("roi_heads"),
        help="values of MODEL.CLS_LOSS.NAME")
    add("--iters", type=int, default=None,
        help="SOLVER.MAX_ITER of each run, SOLVER.STEPS scaled to match (default: the config's)")
    add("--train-net", default=None,
        help="another training script taking Detectron2's default_argument_parser arguments "
        "(default: the repository's train_net.py)")
    add("--verbose", action="store_true",
        help="also print the training and evaluation logs (always written to files)")
    return parser


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


def _merged_cfg(config_file, opts):
    from ap_loss_d2.engine import get_ap_loss_cfg

    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def run_overrides(base_cfg, loss, size, iters):
    """The study's overrides of one run (the user's overrides are appended after them)."""
    # fmt: off
    opts = [
        "MODEL.CLS_LOSS.NAME", loss, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", str(size),
        "MODEL.ROI_HEADS.POSITIVE_FRACTION", str(POSITIVE_FRACTION),
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", str(max(base_cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN, size))
    ]
    # fmt: on
    if iters is not None:
        steps = scaled_schedule(base_cfg.SOLVER.STEPS, base_cfg.SOLVER.MAX_ITER, iters)
        opts += ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", repr(steps)]
    return opts


def run_name(loss, size):
    return f"{loss}_rois{size}"


# ------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------


def _last_checkpoint(run_dir):
    f = Path(run_dir) / "last_checkpoint"
    return f.read_text().strip() if f.exists() else None


def train(settings, run_dir, train_net, num_gpus, verbose=False):
    """Train one run with ``train_net.py --resume`` (a no-op resume on an empty directory).

    The subprocess's output goes to ``run_dir/train_stdout.log``, and to the console too with
    ``verbose`` (Detectron2 also writes ``log.txt`` and ``metrics.json`` there).
    """
    # fmt: off
    cmd = [
        *(train_net_command() if train_net is None else [sys.executable, str(train_net)]),
        "--config-file", settings["config"],
        "--num-gpus", str(num_gpus),
        "--resume",
        *settings["overrides"],
        "OUTPUT_DIR", str(run_dir),
        "DATASETS.TEST", "()",  # evaluated once, by evaluate()
    ]
    # fmt: on
    log_path = Path(run_dir) / "train_stdout.log"
    returncode = run_logged(cmd, log_path, echo=verbose)
    if returncode != 0:
        tail = log_path.read_text().splitlines()[-30:]
        raise RuntimeError(
            f"training failed (exit code {returncode}); last lines of {log_path}:\n"
            + "\n".join(tail)
        )
    final = Path(run_dir) / "model_final.pth"
    if not final.exists():
        raise RuntimeError(f"training ended without writing {final}; see {log_path}")


def evaluate(settings, run_dir):
    """Evaluate ``run_dir/model_final.pth`` with the project's evaluator; returns its output."""
    from ap_loss_d2.engine import Trainer, validate_cfg
    from ap_loss_d2.engine import SafeDetectionCheckpointer

    cfg = _merged_cfg(settings["config"], settings["overrides"])
    cfg.OUTPUT_DIR = str(run_dir)
    cfg.MODEL.WEIGHTS = str(Path(run_dir) / "model_final.pth")
    validate_cfg(cfg)
    cfg.freeze()
    model = Trainer.build_model(cfg)
    SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).load(cfg.MODEL.WEIGHTS)
    return Trainer.test(cfg, model)


def bbox_metrics(results, test_datasets):
    """AP/AP50/AP75 of ``Trainer.test``'s output (``{"bbox": ...}`` for one test dataset,
    ``{dataset: {"bbox": ...}}`` for several: the first is used)."""
    if "bbox" not in results:
        results = results[test_datasets[0]]
    return {k: float(results["bbox"][k]) for k in METRICS}


def mean_sampled_rois(run_dir):
    """Mean RoIs sampled per image during training, from Detectron2's ``metrics.json``
    (``roi_head/num_fg_samples + roi_head/num_bg_samples``); None if not logged."""
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        return None
    values = [
        r["roi_head/num_fg_samples"] + r["roi_head/num_bg_samples"]
        for r in metrics_by_iteration(path)[0].values()
        if "roi_head/num_fg_samples" in r and "roi_head/num_bg_samples" in r
    ]
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _fmt(x, digits=2):
    return fmt_num(x, digits)


def table14(records, sizes, losses):
    """Table 14: per RoI batch size, AP/AP50/AP75 and RoIs sampled of each loss."""
    by_key = {(r["loss"], r["batch_size_per_image"]): r for r in records}
    head = ["#RoIs/img"]
    for loss in losses:
        label = cls_loss_label(loss)
        head += [f"{label} {m}" for m in METRICS] + [f"{label} sampled"]
    rows = []
    for size in sizes:
        row = [str(size)]
        for loss in losses:
            r = by_key.get((loss, size))
            row += [_fmt(r[m]) if r else "-" for m in METRICS]
            row.append(_fmt(r["mean_sampled_rois_per_image"], 0) if r else "-")
        rows.append(row)
    return markdown_table(head, rows) + "\n"


def write_report(output_dir, records, meta):
    """Write the markdown table, the JSON and the plot of the runs finished so far."""
    output_dir = Path(output_dir)
    sizes, losses = meta["sizes"], meta["losses"]
    write_json(output_dir / f"{REPORT}.json", {**meta, "metrics": list(METRICS), "runs": records})
    total = len(sizes) * len(losses)
    overrides = " ".join(meta["overrides"])
    lines = [
        "# RoI-sampling study (paper supplementary A4.3, Table 14 / Fig. 13)",
        "",
        f"- config: `{meta['config']}`",
        f"- overrides: `{overrides}`" if overrides else "- overrides: none",
        f"- {meta['iters']} iterations per run, ROI_HEADS.POSITIVE_FRACTION {POSITIVE_FRACTION}",
        f"- evaluated on {', '.join(meta['test_datasets'])}; {len(records)}/{total} runs finished",
        "",
        "AP, AP50, AP75 of each run (the evaluator's output); 'sampled': mean number of RoIs per "
        "image actually sampled during training.",
        "",
        table14(records, sizes, losses),
    ]
    (output_dir / f"{REPORT}.md").write_text("\n".join(lines))
    plot(output_dir / f"{REPORT}.png", records, sizes, losses)


def plot(path, records, sizes, losses):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for loss in losses:
        points = sorted(
            (r["batch_size_per_image"], r["AP"])
            for r in records
            if r["loss"] == loss and r["AP"] is not None
        )
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=cls_loss_label(loss))
    ax.set_xticks(sorted(sizes))
    ax.set_xlabel("number of RoI samples per image")
    ax.set_ylabel("AP")
    ax.set_title("AP vs #RoIs in the second stage (positive fraction 1.0)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


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
    if any(s <= 0 for s in args.sizes):
        raise SystemExit(f"--sizes must be positive, got {args.sizes}")
    if args.iters is not None and args.iters <= 0:
        raise SystemExit(f"--iters must be positive, got {args.iters}")
    sizes = sorted(set(args.sizes))
    losses = list(dict.fromkeys(args.losses))
    config = str(Path(args.config_file or default_config(CONFIG_REL)).resolve())
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    _log_detectron2(output_dir / "eval_log.txt", args.verbose)

    base = _merged_cfg(config, opts)
    meta = {
        "config": config, "iters": args.iters if args.iters is not None else base.SOLVER.MAX_ITER,
        "sizes": sizes, "losses": losses, "positive_fraction": POSITIVE_FRACTION, "overrides": opts,
        "test_datasets": list(base.DATASETS.TEST)
    }
    if not meta["test_datasets"]:
        raise SystemExit("the config has no DATASETS.TEST to evaluate on")

    runs = [(loss, size) for size in sizes for loss in losses]
    records = []
    start = time.perf_counter()
    for i, (loss, size) in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] {loss} rois={size}"
        run_dir = output_dir / run_name(loss, size)
        run_dir.mkdir(exist_ok=True)
        overrides = run_overrides(base, loss, size, args.iters) + opts
        settings = {"config": config, "overrides": overrides}
        check_run_settings(run_dir, settings, RUN_FILE)

        eval_file = run_dir / EVAL_FILE
        if eval_file.exists():
            record = read_json(eval_file)
            _say(f"{tag}: done before, AP={_fmt(record['AP'])}")
            records.append(record)
            continue

        if not (run_dir / "model_final.pth").exists():
            last = _last_checkpoint(run_dir)
            _say(
                f"{tag}: training" + (f" (resuming from {last})" if last else "")
                + f", log: {run_dir / 'log.txt'}"
            )
            t0 = time.perf_counter()
            train(settings, run_dir, args.train_net, args.num_gpus, args.verbose)
            _say(f"{tag}: trained in {time.perf_counter() - t0:.0f}s")
        _say(f"{tag}: evaluating on {', '.join(meta['test_datasets'])}")
        if args.verbose:
            results = evaluate(settings, run_dir)
        else:  # pycocotools prints its tables: keep them in the evaluation log
            with open(output_dir / "eval_log.txt", "a") as f, contextlib.redirect_stdout(f):
                results = evaluate(settings, run_dir)
        record = {
            "loss": loss, "batch_size_per_image": size,
            **bbox_metrics(results, meta["test_datasets"]),
            "mean_sampled_rois_per_image": mean_sampled_rois(run_dir), "output_dir": str(run_dir),
            "results": results
        }
        record = to_jsonable(record)
        write_json(eval_file, record)
        records.append(record)
        write_report(output_dir, records, meta)
        _say(
            f"{tag}: " + " ".join(f"{m}={_fmt(record[m])}" for m in METRICS)
            + f" ({time.perf_counter() - start:.0f}s elapsed)"
        )

    write_report(output_dir, records, meta)
    _say(f"table: {output_dir / (REPORT + '.md')}")
    _say(f"plot:  {output_dir / (REPORT + '.png')}")
    print(table14(records, sizes, losses), flush=True)
    return records


if __name__ == "__main__":
    main()
