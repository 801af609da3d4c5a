"""Learning-rate sweep: each loss at its own best learning rate, mean and range over seeds.

Details: docs/studies.md#studieslr_sweep."""
import json
import math
import os
import queue
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

from .common import (
    BBOX_METRICS, check_loss_names, cls_loss_label, fmt_num, import_modules, markdown_table, not_finite, number,
    progress, REPO, save_figure, study_argument_parser, subplots, sweep_run, timestamp, write_json,
    write_study_outputs
)

STUDY = "lr_sweep"
CONFIG_REL = "quick/retinanet_R_18_FPN_1000it_synth_ap.yaml"
DEFAULT_CONFIG = "configs/" + CONFIG_REL  # relative to the repository (recorded as written)
METRICS = BBOX_METRICS


def run_name(loss: str, lr: float, seed: int) -> str:
    return f"{loss}_lr{lr:g}_seed{seed}"


def config_path(config: str) -> str:
    """``config`` as given, or relative to the repository (the default)."""
    if os.path.isfile(config):
        return config
    if (REPO / config).is_file() or config == DEFAULT_CONFIG:
        return str(REPO / config)
    raise SystemExit(f"[{STUDY}] --config-file {config}: no such file")


def run_one(args, loss: str, lr: float, seed: int, slot: int) -> dict:
    """Train (or resume, or skip) one run; returns its record."""
    env = dict(os.environ)
    if args.devices:
        env["CUDA_VISIBLE_DEVICES"] = str(args.devices[slot % len(args.devices)])
    settings = {"config": args.config_file, "loss": loss, "lr": lr, "seed": seed, "opts": list(args.opts)}
    # DIAGNOSTICS: cls_loss/time in metrics.json, which the cost study plots (Fig. 10)
    opts = ["MODEL.CLS_LOSS.DIAGNOSTICS", "True", "MODEL.CLS_LOSS.NAME", loss, "SOLVER.BASE_LR", repr(float(lr)),
            "SEED", str(seed), *args.opts]
    return sweep_run(STUDY, Path(args.output_dir) / run_name(loss, lr, seed), config_path(args.config_file), opts,
                     settings, imports=args.imports, num_gpus=args.num_gpus, env=env)


def _stats(values: List[float]) -> dict:
    if not values:
        return {"mean": None, "min": None, "max": None}
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def _is_ok(record: dict) -> bool:
    return record["status"] == "ok" and not not_finite(record, METRICS)


def summarize(records: List[dict], losses, lrs) -> dict:
    """Per loss and LR: seeds run, ok, diverged, failed, AP stats over ok runs; each loss's best
    LR (highest mean AP among LRs without divergence or failure, else among all)."""
    table = {}
    for loss in losses:
        table[loss] = {}
        for lr in lrs:
            rs = [r for r in records if r["settings"]["loss"] == loss and math.isclose(r["settings"]["lr"], lr)]
            ok = [r for r in rs if _is_ok(r)]
            table[loss][f"{lr:g}"] = {
                "seeds": sorted(r["settings"]["seed"] for r in rs), "ok": len(ok),
                "diverged": sorted([r["settings"]["seed"], r["diverged_at"]] for r in rs if r["status"] == "diverged"),
                "failed": sorted(r["settings"]["seed"] for r in rs if not _is_ok(r) and r["status"] != "diverged"),
                **{m: _stats([r[m] for r in ok]) for m in METRICS}}
    best = {}
    for loss in losses:
        cells = [(lr, c) for lr, c in table[loss].items() if c["ok"]]
        stable = [(lr, c) for lr, c in cells if not c["diverged"] and not c["failed"]]
        pool = stable or cells
        if pool:
            lr, c = max(pool, key=lambda x: x[1]["AP"]["mean"])
            best[loss] = {"lr": float(lr), "stable": bool(stable), "seeds": c["seeds"],
                          **{m: c[m] for m in METRICS}}
    return {"table": table, "best": best}


def _fmt_range(s, digits=1):
    lo, hi = fmt_num(s["min"], digits), fmt_num(s["max"], digits)
    return "-" if s["mean"] is None else f"{fmt_num(s['mean'], digits)} [{lo}, {hi}]"


def render(summary: dict, args, labels) -> List[str]:
    headers = ["loss", "LR", "seeds ok", *(f"{m} mean [min, max]" for m in METRICS), "diverged"]
    rows = []
    for loss, cells in summary["table"].items():
        best_lr = summary["best"].get(loss, {}).get("lr")
        for lr, c in cells.items():
            is_best = best_lr is not None and math.isclose(float(lr), best_lr)
            mark = (lambda v: f"**{v}**") if is_best else (lambda v: v)
            div = ", ".join(f"seed {s} at it. {it}" for s, it in c["diverged"]) or "-"
            if c["failed"]:
                div += f" (failed: seeds {c['failed']})"
            rows.append([labels.get(loss, loss), mark(lr), f"{c['ok']}/{len(c['seeds'])}",
                         *(mark(_fmt_range(c[m])) for m in METRICS), div])
    readme = [[f"{labels.get(loss, loss)}, best LR {b['lr']:g}"
               + ("" if b["stable"] else " (every LR has a diverged or failed seed)"),
               *(_fmt_range(b[m]) for m in METRICS)]
              for loss, b in summary["best"].items()]
    seeds = ", ".join(str(s) for s in args.seeds)
    opts = " ".join(args.opts) or "none"
    return [
        "# Learning-rate sweep", "",
        f"Generated {timestamp()} by `python -m studies.lr_sweep`. Config "
        f"`{args.config_file}`, overrides: `{opts}`; seeds {seeds}; the same schedule for every run. "
        "Bold: each loss's best LR (highest mean AP among the LRs where no seed diverged or "
        "failed; a run with no detections, AP NaN, is failed).", "",
        markdown_table(headers, rows, align="llr" + "r" * len(METRICS) + "l"), "",
        "## Each loss at its best learning rate (README table)", "",
        markdown_table(["run", *(f"{m} mean [min, max]" for m in METRICS)], readme), "",
        f"Mean and range over seeds {seeds}.", "",
    ]


def plot(summary: dict, path: Path, labels) -> bool:
    fig, ax = subplots(figsize=(5, 3.5))
    for loss, cells in summary["table"].items():
        pts = sorted((float(lr), c["AP"]) for lr, c in cells.items() if c["AP"]["mean"] is not None)
        err = [[s["mean"] - s["min"] for _, s in pts], [s["max"] - s["mean"] for _, s in pts]]
        if pts:
            ax.errorbar([x for x, _ in pts], [s["mean"] for _, s in pts], yerr=err, marker="o", capsize=3,
                        label=labels.get(loss, loss))
    ax.set(xscale="log", xlabel="base learning rate", ylabel="AP (mean, range over seeds)")
    ax.grid(alpha=0.3)
    drawn = bool(ax.get_lines())
    if drawn:
        ax.legend()
    save_figure(fig, path)
    return drawn


def expected_results(summary: dict, args, previous: Optional[Path] = None) -> dict:
    """The best LRs' stats that studies.main_job prints; ``previous``'s hand-added
    ``fresh_runs`` kept when it measured the same config."""
    old = json.loads(previous.read_text()) if previous is not None and previous.is_file() else {}
    kept = {"fresh_runs": old["fresh_runs"]} if old.get("config") == args.config_file and "fresh_runs" in old else {}
    return {"generated": timestamp(), "command": "python -m studies.lr_sweep " + " ".join(sys.argv[1:]),
            "config": args.config_file, "overrides": list(args.opts), "seeds": list(args.seeds),
            "losses": {loss: {"lr": b["lr"], **{m: b[m] for m in METRICS}} for loss, b in summary["best"].items()},
            **kept}


def parse_args(argv=None):
    p = study_argument_parser(STUDY, __doc__.split("\n\n")[0], config=DEFAULT_CONFIG + " (the main job's)",
                              num_gpus=True)
    add = p.add_argument
    add("--losses", nargs="+", default=["ap", "focal"])
    add("--lrs", nargs="+", type=number(float), default=[0.005, 0.01, 0.02])
    add("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add("--num-parallel", type=number(int), default=1, help="runs trained at the same time")
    add("--devices", nargs="*", default=[], help="CUDA_VISIBLE_DEVICES values given to the parallel runs, round-robin")
    add("--expected-results", default=None, metavar="FILE",
        help="also write the best-LR summary read by studies.main_job")
    add("--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="a module to import in the sweep and in every training process first, e.g. one that registers a "
             "loss named in --losses (repeatable)")
    args = p.parse_args(argv)
    args.config_file = args.config_file or DEFAULT_CONFIG
    if args.imports and args.num_gpus > 1:
        p.error("--import runs each training in one process: use --num-gpus 1")
    import_modules(args.imports, error=p.error)
    check_loss_names(args.losses, args.imports, error=p.error)
    config_path(args.config_file)  # fail early on a missing config
    for key in ("MODEL.CLS_LOSS.NAME", "SOLVER.BASE_LR", "SEED", "OUTPUT_DIR"):
        if key in args.opts[::2]:
            p.error(f"{key} is set by the sweep per run; use --losses/--lrs/--seeds/--output-dir")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(loss, lr, seed) for loss in args.losses for lr in args.lrs for seed in args.seeds]
    progress(STUDY, f"{len(jobs)} runs ({len(args.losses)} losses x {len(args.lrs)} LRs x "
                    f"{len(args.seeds)} seeds), {args.num_parallel} at a time, into {out}")
    free = queue.Queue()  # the slots (--devices entries) of the runs in flight
    for slot in range(args.num_parallel):
        free.put(slot)

    def task(job):
        slot = free.get()
        try:
            return run_one(args, *job, slot=slot)
        finally:
            free.put(slot)

    with ThreadPoolExecutor(max_workers=args.num_parallel) as pool:
        records = list(pool.map(task, jobs))
    summary = summarize(records, args.losses, args.lrs)
    labels = {loss: cls_loss_label(loss) for loss in args.losses}
    md = render(summary, args, labels)
    figures = ["lr_sweep.png"] if plot(summary, out / "lr_sweep.png", labels) else []
    report = {"study": STUDY, "generated": timestamp(), "config": args.config_file,
              "overrides": list(args.opts), "losses": args.losses, "lrs": args.lrs,
              "seeds": args.seeds, **summary, "runs": records, "figures": figures}
    if args.expected_results:
        write_json(Path(args.expected_results), expected_results(summary, args, Path(args.expected_results)))
        progress(STUDY, f"wrote {args.expected_results}")
    write_study_outputs(out, STUDY, report, md)
    failed = [r for r in records if r["status"] == "failed"]
    retried = [r for r in failed if "reason" not in r]
    if failed:
        progress(STUDY, f"{len(failed)} run(s) failed (not diverged)"
                        + (f"; rerun the command to retry {len(retried)}" if retried else ""))
    return report


if __name__ == "__main__":
    sys.exit(1 if any(r["status"] == "failed" for r in main()["runs"]) else 0)
