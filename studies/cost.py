"""Time and memory cost of the losses (the paper's Sec. 4.3: Fig. 10, Fig. 9 and Fig. 11).

Details: docs/studies.md#studiescost."""
import math
import shutil
from pathlib import Path
from typing import Optional

from .common import (
    cls_loss_label, markdown_table, metrics_by_iteration, progress, pyplot, save_figure,
    study_argument_parser, subplots, timestamp, unique_labels, write_study_outputs
)

STUDY = "cost"
#: metrics.json keys traced against the iteration.
METRIC_KEYS = ("cls_loss/time", "time", "cls_loss/num_neg_nontrivial", "cls_loss/num_pos")


def fmt_value(v) -> str:
    """Integral values as integers, >= 100 with 1 decimal, else 4 decimals."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    v = float(v)
    return str(int(v)) if v.is_integer() else f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"


def _label_for(metrics_path: Path, label: Optional[str]) -> str:
    """``label``, else the loss label of the run's config.yaml, else the folder's name."""
    import yaml

    cfg = metrics_path.parent / "config.yaml"
    try:
        data = (yaml.safe_load(cfg.read_text()) or {}) if not label and cfg.is_file() else {}
    except yaml.YAMLError:
        data = {}
    name = ((data.get("MODEL") or {}).get("CLS_LOSS") or {}).get("NAME")
    return label or (cls_loss_label(name) if name else metrics_path.parent.name)


def analyse_run(metrics_path: Path, label: str) -> dict:
    metrics, skipped = metrics_by_iteration(metrics_path)
    run = {"label": label, "metrics": str(metrics_path), "skipped_lines": skipped, "series": {}, "summary": {}}
    for key in METRIC_KEYS:
        its = [it for it, e in metrics.items() if isinstance(e.get(key), (int, float))]
        vals = [float(metrics[it][key]) for it in its]
        if vals:
            run["series"][key] = {"iterations": its, "values": vals}
            run["summary"][key] = dict(n=len(vals), first_iter=its[0], last_iter=its[-1], start=vals[0],
                                       end=vals[-1], mean=sum(vals) / len(vals), min=min(vals), max=max(vals))
    lt, it = run["summary"].get("cls_loss/time"), run["summary"].get("time")
    run["loss_share_of_iteration"] = lt["mean"] / it["mean"] if lt and it and it["mean"] > 0 else None
    return run


def training_table(runs) -> str:
    rows = []
    for run in runs:
        for key in METRIC_KEYS:
            s = run["summary"].get(key)
            if s:
                rows.append([run["label"], key, s["n"], f"{s['first_iter']}-{s['last_iter']}",
                             fmt_value(s["start"]), fmt_value(s["end"]), fmt_value(s["mean"]),
                             fmt_value(s["min"]), fmt_value(s["max"])])
    return markdown_table(["Run", "metric", "points", "iterations", "start", "end", "mean",
                           "min", "max"], rows)


def training_figure(runs):
    """Fig. 10 measured during training: loss and iteration time; non-trivial negative and
    positive anchor x class entries."""
    fig, (a, b) = subplots(1, 2, figsize=(11, 4))
    colors = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    for k, run in enumerate(runs):
        for ax, key, ls, what in ((a, "cls_loss/time", "-", "loss"), (a, "time", "--", "iteration"),
                                  (b, "cls_loss/num_neg_nontrivial", "-", "non-trivial negatives"),
                                  (b, "cls_loss/num_pos", ":", "positives")):
            if key in run["series"]:
                its = run["series"][key]["iterations"]
                ax.plot(its, run["series"][key]["values"], ls, color=colors[k % len(colors)],
                        label=f"{run['label']}: {what}", **({"marker": "o", "ms": 4} if len(its) == 1 else {}))
    a.set(xlabel="iteration", ylabel="time (s)")
    a.set_title("Measured during training: loss and iteration time (Fig. 10)", fontsize=9)
    b.set(xlabel="iteration", ylabel="anchor × class entries per batch")
    b.set_title("Measured during training: non-trivial negative entries |N^|, positive entries |P|", fontsize=9)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if b.get_lines() and all(min(line.get_ydata()) > 0 for line in b.get_lines()):
        b.set_yscale("log")
    return fig


def parse_args(argv=None):
    p = study_argument_parser(STUDY, __doc__.split("\n\n")[0], opts=False)
    p.add_argument("--run-dir", action="append", default=[], metavar="RUN_DIR[:LABEL]",
                   help="training output folder with metrics.json (repeatable)")
    p.add_argument("--metrics", action="append", default=[], metavar="FILE[:LABEL]",
                   help="a metrics.json file (repeatable)")
    p.add_argument("--benchmark", default=None, metavar="DIR",
                   help="output folder of python -m tools.benchmark (its benchmark.txt and benchmark.png)")
    args = p.parse_args(argv)
    if not (args.run_dir or args.metrics or args.benchmark):
        p.error("give at least one of --run-dir, --metrics, --benchmark")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = [(Path(path) / name, label or None) for texts, name in ((args.run_dir, "metrics.json"), (args.metrics, ""))
              for path, _, label in (t.partition(":") for t in texts)]
    for f, _ in inputs:
        if not f.is_file():
            raise SystemExit(f"{f} does not exist")
    labels = unique_labels([_label_for(f, lab) for f, lab in inputs])
    report = {"study": STUDY, "created": timestamp(), "runs": [], "benchmark": None, "figures": []}
    md = []
    for (f, _), label in zip(inputs, labels):
        progress(STUDY, f"{label}: reading {f}")
        run = analyse_run(f, label)
        if "cls_loss/time" not in run["series"]:
            progress(STUDY, f"{label}: {f} logs no cls_loss/time; train with "
                            "MODEL.CLS_LOSS.DIAGNOSTICS True to measure the loss time")
        report["runs"].append(run)
    if report["runs"]:
        save_figure(training_figure(report["runs"]), out / "cost_training.png", dpi=110)
        report["figures"].append("cost_training.png")
        md += ["## Measured during training (Fig. 10)", "",
               "Per-iteration loss time (forward), iteration time, non-trivial negatives and "
               "positives of the runs' own logits, as logged in metrics.json: each point is the "
               "median over Detectron2's 20-iteration smoothing window. Times in seconds.", "",
               training_table(report["runs"]), ""]
        shares = [(r["label"], r["loss_share_of_iteration"]) for r in report["runs"]
                  if r["loss_share_of_iteration"] is not None]
        if shares:
            md += ["Mean loss time / mean iteration time: "
                   + ", ".join(f"{lab} {s:.3f}" for lab, s in shares), ""]
        md += ["![training cost](cost_training.png)", ""]
    if args.benchmark:  # the benchmark's own table and figure (Fig. 9 and 11)
        bench = Path(args.benchmark)
        missing = [f for f in ("benchmark.txt", "benchmark.png") if not (bench / f).is_file()]
        if missing:
            raise SystemExit(f"--benchmark {bench}: no {' or '.join(missing)}; give the --output-dir of "
                             "python -m tools.benchmark")
        shutil.copy(bench / "benchmark.png", out / "cost_benchmark.png")
        report["benchmark"] = str(bench.resolve())
        report["figures"].append("cost_benchmark.png")
        md += ["## Synthetic logits: memory and time cost of the losses (Fig. 9 and 11)", "",
               f"From `python -m tools.benchmark` in `{bench}`: N(0, 1) logits with random positives (the "
               "early-training regime), not a training run.", "", "```", (bench / "benchmark.txt").read_text().rstrip(),
               "```", "", "![loss benchmark](cost_benchmark.png)", ""]
    write_study_outputs(out, STUDY, report, md)
    return report


if __name__ == "__main__":
    main()
