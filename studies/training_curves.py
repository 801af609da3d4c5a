"""Paper Fig. 6: detection AP against training iterations, one line per run (AP-loss vs focal...).

Details: docs/studies.md#studiestraining_curves."""
import re
from pathlib import Path

from ap_loss_d2.data import register_datasets

from .common import (
    bbox_results, build_model_for_run, dataset_subset, fmt_num, load_cfg, loss_label, markdown_table, progress,
    read_json, save_figure, study_argument_parser, subplots, timestamp, unique_labels, write_json, write_study_outputs
)

STUDY = "training_curves"
METRICS = ("AP", "AP50", "AP75")
_CKPT = re.compile(r"^model_(\d+|final)\.pth$")


def checkpoint_iteration(path) -> int:
    """Iterations trained when ``path`` was saved: its stored ``iteration`` (else the number in
    ``model_XXXXXXX.pth``) + 1."""
    import torch

    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "iteration" in data:
        return int(data["iteration"]) + 1
    m = _CKPT.match(Path(path).name)
    if m and m.group(1) != "final":
        return int(m.group(1)) + 1
    raise ValueError(f"{path}: no stored 'iteration' and no iteration in the file name")


def list_checkpoints(run_dir) -> list:
    """``[(iteration, path)]`` of a run's checkpoints; ``model_final.pth`` wins a tie."""
    found = {}
    for path in sorted(Path(run_dir).glob("model_*.pth")):
        if not _CKPT.match(path.name):
            continue
        it = checkpoint_iteration(path)
        if it not in found or path.name == "model_final.pth":
            found[it] = str(path)
    if not found:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint model_XXXXXXX.pth / model_final.pth")
    return sorted(found.items())


def evaluate_checkpoint(cfg, weights) -> dict:
    """``{"AP": .., "AP50": .., "AP75": ..}`` of ``weights`` on ``cfg.DATASETS.TEST[0]`` (Trainer.test)."""
    from ap_loss_d2.engine import Trainer

    bbox = bbox_results(Trainer.test(cfg, build_model_for_run(cfg, weights)))
    point = {m: bbox.get(m) for m in METRICS}
    if not bbox:  # Detectron2's evaluators return nothing without a single detection
        point["note"] = "no detections above the test score threshold"
    return point


def group_points(runs) -> list:
    """Runs with the same label -> ``[{"label", "num_runs", "points": [{"iteration", "AP", "AP_min",
    "AP_max", ...}]}]``: per iteration saved by all of the label's runs, the mean, min and max of
    each metric over the runs that have it (a checkpoint without detections counts as 0)."""
    by_label = {}
    for run in runs:
        by_label.setdefault(run["label"], []).append(run)
    groups = []
    for label, members in by_label.items():
        common = set.intersection(*[{q["iteration"] for q in r["points"]} for r in members])
        points = []
        for it in sorted(common):
            at_it = [next(q for q in r["points"] if q["iteration"] == it) for r in members]
            points.append({"iteration": it})
            for m in METRICS:
                vals = [v for v in (0.0 if q.get("note") else q.get(m) for q in at_it) if v is not None]
                if vals:
                    points[-1].update({m: sum(vals) / len(vals), m + "_min": min(vals), m + "_max": max(vals)})
        groups.append({"label": label, "num_runs": len(members), "points": points})
    return groups


def _parse_run(text):
    head, sep, tail = text.rpartition(":")
    if sep and Path(head).is_dir():
        return Path(head), tail or None
    if not Path(text).is_dir():
        raise FileNotFoundError(f"--run {text!r}: expected a training output folder RUN_DIR[:LABEL]")
    return Path(text), None


def _config_hash(cfg):
    """Hash of the evaluation config (without OUTPUT_DIR): a changed override re-evaluates."""
    import hashlib

    c = cfg.clone()
    c.defrost()
    c.OUTPUT_DIR = ""
    return hashlib.sha1(c.dump().encode()).hexdigest()[:16]


def parse_args(argv=None):
    p = study_argument_parser(STUDY, __doc__.split("\n\n")[0], config="each run's config.yaml", runs="RUN_DIR[:LABEL]")
    p.add_argument("--max-images", type=int, default=None, help="evaluate on the first N images only")
    p.add_argument("--group", action="store_true",
                   help="runs with the same LABEL are seeds of one setting: mean and [min, max]")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    register_datasets()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / f"{STUDY}.json"
    cache = {(q["checkpoint"], q.get("fingerprint"), q.get("dataset"), q.get("config")): q
             for run in (read_json(cache_path).get("runs", []) if cache_path.is_file() else [])
             for q in run.get("points", [])}
    runs = []
    for run_dir, label in map(_parse_run, args.run):
        cfg = load_cfg(args.config_file or str(run_dir / "config.yaml"), args.opts, args.device)
        runs.append((run_dir, label or loss_label(cfg), cfg))
    labels = [lab for _, lab, _ in runs]
    labels = labels if args.group else unique_labels(labels)

    report_runs = []
    for (run_dir, _, cfg), label in zip(runs, labels):
        dataset = args.dataset or cfg.DATASETS.TEST[0]
        if args.max_images:
            dataset = dataset_subset(dataset, args.max_images, out / "_subsets")
        cfg = cfg.clone()
        cfg.defrost()
        cfg.DATASETS.TEST = (dataset,)
        name = f"{label}_{len(report_runs)}" if args.group else label
        cfg.OUTPUT_DIR = str(out / "_eval" / re.sub(r"[^A-Za-z0-9_.-]+", "_", name))
        cfg.freeze()
        config_hash = _config_hash(cfg)
        points = []
        for it, ckpt in list_checkpoints(run_dir):
            key = (ckpt, f"{Path(ckpt).stat().st_size}:{Path(ckpt).stat().st_mtime_ns}", dataset, config_hash)
            if key in cache:
                progress(STUDY, f"{label}: iteration {it} already evaluated ({ckpt})")
                point = cache[key]
            else:
                progress(STUDY, f"{label}: evaluating {ckpt} (iteration {it}) on {dataset}")
                point = {"iteration": it, "checkpoint": ckpt, "fingerprint": key[1], "dataset": dataset,
                         "config": config_hash, **evaluate_checkpoint(cfg, ckpt)}
                cache[key] = point
            points.append(point)
            # written after every evaluation, so that an interrupted call resumes from here
            partial = report_runs + [{"label": label, "run_dir": str(run_dir), "points": points}]
            write_json(cache_path, {"study": STUDY, "runs": partial, "complete": False})
        report_runs.append({"label": label, "run_dir": str(run_dir), "points": points})

    groups = group_points(report_runs)  # without --group the labels are unique: one run per group
    fig, axes = subplots(1, 2, figsize=(10, 4))
    for metric, ax in zip(("AP", "AP50"), axes):
        for group in groups:
            pts = [q for q in group["points"] if q.get(metric) is not None]
            its = [q["iteration"] for q in pts]
            n = group["num_runs"]
            line, = ax.plot(its, [q[metric] for q in pts], marker="o",
                            label=group["label"] + (f" (mean of {n})" if n > 1 else ""))
            if n > 1:
                ax.fill_between(its, [q[metric + "_min"] for q in pts], [q[metric + "_max"] for q in pts],
                                color=line.get_color(), alpha=0.2)
        ax.set(xlabel="iteration", ylabel=f"{metric} (%)", title=f"{metric} vs. training iteration")
        ax.grid(True, alpha=0.3)
        ax.legend()
    png = out / f"{STUDY}.png"
    save_figure(fig, png, dpi=100)

    def cell(q, m, n):
        if q.get(m) is None:
            return "no detections"
        return fmt_num(q[m]) + (f" [{fmt_num(q[m + '_min'])}, {fmt_num(q[m + '_max'])}]" if n > 1 else "")

    rows = [[g["label"], g["num_runs"], q["iteration"]] + [cell(q, m, g["num_runs"]) for m in METRICS]
            for g in groups for q in g["points"]]
    table = markdown_table(["runs", "n", "iteration"] + [f"{m} mean [min, max]" for m in METRICS], rows)
    report = {"study": STUDY, "created": timestamp(), "runs": report_runs, "complete": True, "figures": [png.name],
              "groups": groups}
    md = ["# Fig. 6: AP against training iteration", "", table, "", f"![training curves]({png.name})"]
    write_study_outputs(out, STUDY, report, md, table)
    return report


if __name__ == "__main__":
    main()
