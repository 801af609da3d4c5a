"""The main job: train RetinaNet with AP-loss on the embedded dataset (CPU) and evaluate it.

    python tools/main_job.py                       # AP-loss (what `make main` runs)
    python tools/main_job.py MODEL.CLS_LOSS.NAME focal OUTPUT_DIR output/main_job_focal

Runs ``train_net.py`` on ``configs/quick/retinanet_R_18_FPN_1000it_synth_ap.yaml`` (extra
arguments are passed on as config overrides), which generates the embedded dataset on first
use, trains, evaluates with Detectron2's COCOEvaluator, and then prints the AP table and the
wall time. The evaluation numbers are read back from the run's ``metrics.json``.

When ``configs/quick/expected_results.json`` (written by ``python -m ap_loss_d2.studies.lr_sweep
... --expected-results configs/quick/expected_results.json``) has a measurement for this run's
config, loss and learning rate, the spread over the sweep's seeds is printed next to the result,
so a user can tell whether their run landed where it should.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "quick" / "retinanet_R_18_FPN_1000it_synth_ap.yaml"
EXPECTED = REPO / "configs" / "quick" / "expected_results.json"
#: Overrides that do not change what is measured (a sweep entry still applies).
NEUTRAL_KEYS = ("OUTPUT_DIR", "MODEL.DEVICE", "SEED")


def last_eval(metrics_file: Path):
    """The last bbox evaluation row written by the trainer, as {metric: value}."""
    found = {}
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        bbox = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("bbox/")}
        if bbox:
            found = bbox
    return found


def _same_file(a, b) -> bool:
    pa, pb = Path(a), Path(b)
    pa = pa if pa.is_absolute() else REPO / pa
    pb = pb if pb.is_absolute() else REPO / pb
    return pa.resolve() == pb.resolve()


def _relevant(opts):
    pairs = list(zip(opts[::2], opts[1::2]))
    return [(k, v) for k, v in pairs if k not in NEUTRAL_KEYS + ("MODEL.CLS_LOSS.NAME", "SOLVER.BASE_LR")]


def expected_spread(config_file, opts, results=None, expected_file=EXPECTED):
    """Lines saying what the LR sweep measured for this run's loss and LR (mean and range over
    seeds), and where ``results`` (this run's metrics) falls; [] when the file has no
    measurement of this setting."""
    if not Path(expected_file).is_file():
        return []
    data = json.loads(Path(expected_file).read_text())
    if not _same_file(data["config"], config_file) or _relevant(opts) != _relevant(
        list(data.get("overrides", []))
    ):
        return []
    from ap_loss_d2.studies.common import load_cfg

    cfg = load_cfg(str(config_file), [x for k, v in zip(opts[::2], opts[1::2])
                                      if k in ("MODEL.CLS_LOSS.NAME", "SOLVER.BASE_LR") for x in (k, v)])
    loss, lr = cfg.MODEL.CLS_LOSS.NAME, cfg.SOLVER.BASE_LR
    entry = data["losses"].get(loss)
    if entry is None:
        return []
    seeds = ", ".join(str(s) for s in data.get("seeds", []))
    if abs(entry["lr"] - lr) > 1e-12 * max(1.0, lr):
        return [f"[main_job] the LR sweep ({data.get('generated', '?')}) measured {loss} at its best "
                f"LR {entry['lr']:g}, not at this run's {lr:g}: AP {entry['AP']['mean']:.1f} "
                f"[{entry['AP']['min']:.1f}, {entry['AP']['max']:.1f}] over seeds {seeds}"]
    lines = [f"[main_job] expected for {loss} at LR {lr:g} (LR sweep of {data.get('generated', '?')}, "
             f"seeds {seeds}): " + ", ".join(
                 f"{m} {entry[m]['mean']:.1f} [{entry[m]['min']:.1f}, {entry[m]['max']:.1f}]"
                 for m in ("AP", "AP50", "AP75") if m in entry)]
    if results and "AP" in results:
        lo, hi = entry["AP"]["min"], entry["AP"]["max"]
        where = "inside" if lo <= results["AP"] <= hi else "OUTSIDE"
        lines.append(f"[main_job] this run's AP {results['AP']:.1f} is {where} the sweep's range "
                     f"[{lo:.1f}, {hi:.1f}]")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=str(CONFIG))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = parser.parse_args(argv)
    opts = list(args.opts)
    out = "output/main_job"
    if "OUTPUT_DIR" in opts[::2]:
        out = opts[opts.index("OUTPUT_DIR") + 1]
    else:
        opts += ["OUTPUT_DIR", out]
    out = Path(out)
    metrics = out / "metrics.json"
    if metrics.exists():
        metrics.unlink()  # a fresh run: do not report an earlier run's numbers

    start = time.time()
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", args.config_file, *opts]
    print("[main_job]", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.time() - start

    results = last_eval(REPO / metrics if not metrics.is_absolute() else metrics)
    if not results:
        sys.exit(f"[main_job] no evaluation found in {metrics}")
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    print("\n[main_job] COCO bbox metrics on synth_shapes_val")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    print("| " + " | ".join(f"{results.get(k, float('nan')):.2f}" for k in keys) + " |")
    per_class = {k: v for k, v in results.items() if k.startswith("AP-")}
    if per_class:
        print("per class: " + ", ".join(f"{k[3:]} {v:.2f}" for k, v in per_class.items()))
    for line in expected_spread(args.config_file, opts, results):
        print(line)
    print(f"[main_job] wall time {wall / 60:.1f} min (train + eval), output in {out}")


if __name__ == "__main__":
    main()
