"""Paper Fig. 6: detection AP against training iterations, one line per run (AP-loss vs focal...).

``python -m ap_loss_d2.studies.training_curves --run output/voc_ap --run output/voc_focal
--output-dir output/fig6 [--config-file CFG.yaml] [--dataset NAME] [--max-images N]
[--device cpu] [KEY VALUE ...]``

Each ``--run`` is a training output folder of ``train_net.py`` (``RUN_DIR[:LABEL]``): every
saved checkpoint (``model_XXXXXXX.pth``, ``model_final.pth``) is evaluated with Detectron2's
evaluator through :meth:`ap_loss_d2.engine.Trainer.test` (the same evaluation as the periodic
``TEST.EVAL_PERIOD`` hook and ``train_net.py --eval-only``) on ``--dataset`` (default: the
config's first ``DATASETS.TEST``), optionally its first ``--max-images`` images. The config is
the run's ``config.yaml`` unless ``--config-file`` is given; trailing ``KEY VALUE`` pairs
override it.

The iteration of a checkpoint is the number of iterations trained: its stored ``iteration``
(Detectron2's 0-based index) + 1. Writes ``training_curves.json`` (re-read on the next call:
evaluations of unchanged checkpoints with the same dataset and evaluation config are not
repeated), ``training_curves.md`` and
``training_curves.png`` (AP and AP50 against iteration).
"""
import argparse
import re
from pathlib import Path

from .common import (
    dataset_subset,
    fmt_num,
    load_cfg,
    loss_label,
    markdown_table,
    progress,
    pyplot,
    timestamp,
    unique_labels,
    write_json,
)

__all__ = ["checkpoint_iteration", "evaluate_checkpoint", "list_checkpoints", "main"]

STUDY = "training_curves"
METRICS = ("AP", "AP50", "AP75")
_CKPT = re.compile(r"^model_(\d+|final)\.pth$")


def checkpoint_iteration(path) -> int:
    """Iterations trained when ``path`` was saved: its stored ``iteration`` + 1, or (older files
    without it) the number in ``model_XXXXXXX.pth`` + 1."""
    import torch

    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "iteration" in data:
        return int(data["iteration"]) + 1
    m = _CKPT.match(Path(path).name)
    if m and m.group(1) != "final":
        return int(m.group(1)) + 1
    raise ValueError(f"{path}: no stored 'iteration' and no iteration in the file name")


def list_checkpoints(run_dir) -> list:
    """``[(iteration, path)]`` of a run's checkpoints, by iteration; when two files hold the same
    iteration (``model_final.pth`` and a periodic one) the final one is kept."""
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
    """``{"AP": .., "AP50": .., "AP75": ..}`` of ``weights`` on ``cfg.DATASETS.TEST[0]`` via
    :meth:`Trainer.test` (Detectron2's ``inference_on_dataset`` with ap_loss_d2's evaluator)."""
    from ..engine import Trainer
    from .common import build_model_for_run

    model = build_model_for_run(cfg, weights)
    results = Trainer.test(cfg, model)
    if cfg.DATASETS.TEST[0] in results:
        results = results[cfg.DATASETS.TEST[0]]
    bbox = results.get("bbox", {})
    point = {m: bbox.get(m) for m in METRICS}
    if not bbox:  # Detectron2's evaluators return nothing without a single detection
        point["note"] = "no detections above the test score threshold"
    return point


def _parse_run(text):
    head, sep, tail = text.rpartition(":")
    if sep and Path(head).is_dir():
        return Path(head), tail or None
    if not Path(text).is_dir():
        raise FileNotFoundError(f"--run {text!r}: expected a training output folder RUN_DIR[:LABEL]")
    return Path(text), None


def _fingerprint(path):
    st = Path(path).stat()
    return f"{st.st_size}:{int(st.st_mtime_ns)}"


def _config_hash(cfg):
    """Hash of the evaluation config (without OUTPUT_DIR): a changed override re-evaluates."""
    import hashlib

    c = cfg.clone()
    c.defrost()
    c.OUTPUT_DIR = ""
    return hashlib.sha1(c.dump().encode()).hexdigest()[:16]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="RUN_DIR[:LABEL] (repeat for each run)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--config-file", default="", help="yaml config for every run (default: each run's config.yaml)")
    p.add_argument("--dataset", default="", help="dataset to evaluate on (default: the config's DATASETS.TEST[0])")
    p.add_argument("--max-images", type=int, default=None, help="evaluate on the first N images only")
    p.add_argument("--device", default=None)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)

    import ap_loss_d2.data  # noqa: F401  (registers the embedded and VOC sets)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / f"{STUDY}.json"
    cache = {}
    if cache_path.is_file():
        import json

        for run in json.loads(cache_path.read_text()).get("runs", []):
            for point in run.get("points", []):
                cache[(point["checkpoint"], point.get("fingerprint"), point.get("dataset"), point.get("config"))] = point

    runs = []
    for text in args.run:
        run_dir, label = _parse_run(text)
        config = args.config_file or str(run_dir / "config.yaml")
        cfg = load_cfg(config, args.opts, args.device)
        runs.append((run_dir, label or loss_label(cfg), cfg))
    labels = unique_labels([lab for _, lab, _ in runs])

    report_runs = []
    for (run_dir, _, cfg), label in zip(runs, labels):
        dataset = args.dataset or cfg.DATASETS.TEST[0]
        if args.max_images:
            dataset = dataset_subset(dataset, args.max_images, out / "_subsets")
        cfg = cfg.clone()
        cfg.defrost()
        cfg.DATASETS.TEST = (dataset,)
        cfg.OUTPUT_DIR = str(out / "_eval" / re.sub(r"[^A-Za-z0-9_.-]+", "_", label))
        cfg.freeze()
        config_hash = _config_hash(cfg)
        points = []
        for it, ckpt in list_checkpoints(run_dir):
            key = (ckpt, _fingerprint(ckpt), dataset, config_hash)
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

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for metric, ax in zip(("AP", "AP50"), axes):
        for run in report_runs:
            pts = [(q["iteration"], q[metric]) for q in run["points"] if q.get(metric) is not None]
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=run["label"])
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{metric} vs. training iteration")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = out / f"{STUDY}.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)

    rows = [[run["label"], q["iteration"]] + (["no detections"] * len(METRICS) if q.get("note") else [fmt_num(q.get(m)) for m in METRICS])
            for run in report_runs for q in run["points"]]
    table = markdown_table(["run", "iteration"] + list(METRICS), rows)
    report = {"study": STUDY, "created": timestamp(), "runs": report_runs, "complete": True,
              "figures": [png.name]}
    write_json(cache_path, report)
    md = [f"# Fig. 6: AP against training iteration", "", table, "", f"![training curves]({png.name})"]
    (out / f"{STUDY}.md").write_text("\n".join(md) + "\n")
    print(table, flush=True)
    progress(STUDY, f"wrote {cache_path}, {out / (STUDY + '.md')}, {png}")
    return report


if __name__ == "__main__":
    main()
