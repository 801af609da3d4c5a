"""The main job: train RetinaNet with AP-loss on the embedded dataset (CPU) and evaluate it.

Details: docs/studies.md#studiesmain_job."""
import json
import os
import time
from pathlib import Path

from .common import REPO, bbox_results, default_config, load_cfg, study_argument_parser

CONFIG_REL = "quick/retinanet_R_18_FPN_1000it_synth_ap.yaml"
CONFIG = REPO / "configs" / CONFIG_REL
EXPECTED = REPO / "configs" / "quick" / "expected_results.json"
#: Overrides that do not change what is measured (a sweep entry still applies).
NEUTRAL_KEYS = ("OUTPUT_DIR", "MODEL.DEVICE", "SEED")
_SWEPT = ("MODEL.CLS_LOSS.NAME", "SOLVER.BASE_LR")


def _same_file(a, b) -> bool:
    return (REPO / a).resolve() == (REPO / b).resolve()  # REPO / an absolute path is that path


def _relevant(opts):
    return [(k, v) for k, v in zip(opts[::2], opts[1::2]) if k not in NEUTRAL_KEYS + _SWEPT]


def expected_spread(config_file, opts, results=None, expected_file=EXPECTED):
    """What the LR sweep measured for this run's loss and LR and where ``results`` falls; [] when
    ``expected_file`` has no measurement of this setting."""
    if not Path(expected_file).is_file():
        return []
    data = json.loads(Path(expected_file).read_text())
    if not _same_file(data["config"], config_file) or _relevant(opts) != _relevant(list(data.get("overrides", []))):
        return []
    cfg = load_cfg(str(config_file), [x for k, v in zip(opts[::2], opts[1::2]) if k in _SWEPT for x in (k, v)])
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
        lines.append(verdict(results["AP"], entry["AP"], len(data.get("seeds", [])), data.get("fresh_runs")))
    return lines


def _off(value: float, lo: float, hi: float) -> str:
    """``"inside"``, or how far ``value`` is above / below ``[lo, hi]``."""
    return f"{value - hi:.1f} above" if value > hi else f"{lo - value:.1f} below" if value < lo else "inside"


def verdict(ap: float, sweep: dict, num_seeds: int, fresh_runs=None) -> str:
    """Where this run's ``ap`` lands against the sweep's ``[min, max]`` and, with ``fresh_runs``
    (APs of fresh ``make main`` runs), against that range widened to them."""
    lo, hi = sweep["min"], sweep["max"]
    where = _off(ap, lo, hi)
    line = f"[main_job] this run's AP {ap:.1f} is {where} the sweep's range [{lo:.1f}, {hi:.1f}]"
    if where == "inside":
        return line
    line += f" of {num_seeds} seeds"
    if not fresh_runs or not fresh_runs.get("AP"):
        return line
    aps = fresh_runs["AP"]
    wlo, whi = min(lo, *aps), max(hi, *aps)
    runs = ", ".join(f"{v:.1f}" for v in aps)
    spread = (f"[{wlo:.1f}, {whi:.1f}], the sweep's range widened by {len(aps)} fresh runs "
              f"({fresh_runs.get('how', 'make main')}: AP {runs})")
    wide = _off(ap, wlo, whi)
    if wide == "inside":
        return line + f"; seeds understate the run-to-run spread: it is inside the spread to expect {spread}"
    return line + f" and {wide} the spread to expect {spread}"


def format_results(results: dict, dataset: str) -> str:
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    lines = [f"\n[main_job] COCO bbox metrics on {dataset}", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
             "| " + " | ".join(f"{results.get(k, float('nan')):.2f}" for k in keys) + " |"]
    per_class = {k: v for k, v in results.items() if k.startswith("AP-")}
    if per_class:
        lines.append("per class: " + ", ".join(f"{k[3:]} {v:.2f}" for k, v in per_class.items()))
    return "\n".join(lines)


def build_parser():
    return study_argument_parser("main_job", __doc__.splitlines()[0], config=f"configs/{CONFIG_REL}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    config_file = args.config_file or default_config(CONFIG_REL)
    # a folder of its own per run (named by its start time), so that a second run loses nothing
    run_dir = os.path.join(args.output_dir, time.strftime("%Y%m%d-%H%M%S"))
    opts = ["OUTPUT_DIR", run_dir, *args.opts]  # an OUTPUT_DIR override wins
    out = dict(zip(opts[::2], opts[1::2]))["OUTPUT_DIR"]

    from detectron2.engine import default_argument_parser

    import train_net

    train_args = default_argument_parser().parse_args(["--config-file", config_file, *opts])
    print("[main_job] train_net " + " ".join(["--config-file", config_file, *opts]), flush=True)
    start = time.time()
    results = bbox_results(train_net.main(train_args))
    wall = time.time() - start
    if not results:
        raise SystemExit(f"[main_job] the run in {out} evaluated nothing (DATASETS.TEST empty?)")
    dataset = load_cfg(config_file, opts).DATASETS.TEST[0]
    print(format_results(results, dataset))
    for line in expected_spread(config_file, opts, results):
        print(line)
    print(f"[main_job] wall time {wall / 60:.1f} min (train + eval), output in {out}")
    return results


if __name__ == "__main__":
    main()
