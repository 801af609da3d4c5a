"""The main job: train RetinaNet with AP-loss on the embedded dataset (CPU) and evaluate it.

    python tools/main_job.py                       # AP-loss (what `make main` runs)
    python tools/main_job.py MODEL.CLS_LOSS.NAME focal OUTPUT_DIR output/main_job_focal

Runs ``train_net.py`` on ``configs/quick/retinanet_R_18_FPN_1000it_synth_ap.yaml`` (extra
arguments are passed on as config overrides), which generates the embedded dataset on first
use, trains, evaluates with Detectron2's COCOEvaluator, and then prints the AP table and the
wall time. The evaluation numbers are read back from the run's ``metrics.json``.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "quick" / "retinanet_R_18_FPN_1000it_synth_ap.yaml"


def last_eval(metrics_file: Path):
    """The last bbox evaluation row written by the trainer, as {metric: value}."""
    found = {}
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        bbox = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("bbox/")}
        if bbox:
            found = bbox
    return found


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
    print(f"[main_job] wall time {wall / 60:.1f} min (train + eval), output in {out}")


if __name__ == "__main__":
    main()
