"""Command line of the Fig. 8 study: ``python -m ap_loss_d2.studies.optimization``."""
import argparse
from pathlib import Path

import torch
from detectron2.utils.logger import setup_logger

from ...losses import cls_loss_names
from ..common import default_config
from .runner import CONFIG_REL, DEFAULT_METHODS, DEFAULT_NEGATIVES, run_study


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m ap_loss_d2.studies.optimization",
        description="Fig. 8 of the AP-loss paper: AP-loss optimised by the error-driven update, "
        "the approximate gradient and the structured hinge loss (classification branch only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config-file", "--config", dest="config", default=None,
        help=f"yaml config of an APLossRetinaNet (default: configs/{CONFIG_REL} of the repository)",
    )
    p.add_argument("--output-dir", default="output/optimization_study")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=cls_loss_names("retinanet"))
    p.add_argument("--parts", nargs="+", default=["a", "b"], choices=["a", "b"])
    p.add_argument(
        "--negatives",
        nargs="+",
        default=list(DEFAULT_NEGATIVES),
        help="part b: background anchors kept per image ('all' keeps all)",
    )
    p.add_argument("--iters", type=int, default=200, help="SOLVER.MAX_ITER of each run")
    p.add_argument(
        "--record-period", type=int, default=5, help="record the exact AP-loss every N iterations"
    )
    p.add_argument("--checkpoint-period", type=int, default=100)
    p.add_argument(
        "--final-fraction",
        type=float,
        default=0.2,
        help="final AP-loss = mean of this last fraction of the records",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="same initialisation and data order for every run"
    )
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument(
        "--num-threads",
        type=int,
        default=0,
        help="torch.set_num_threads for the runs (0: PyTorch's default); on a CPU shared "
        "with other jobs, 1 avoids oversubscription",
    )
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ..."
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    setup_logger(args.output_dir, name="detectron2")
    setup_logger(args.output_dir, name="ap_loss_d2")
    out = run_study(
        args.output_dir,
        config_file=args.config or default_config(CONFIG_REL),
        methods=args.methods,
        parts=args.parts,
        negatives=args.negatives,
        iters=args.iters,
        record_period=args.record_period,
        checkpoint_period=args.checkpoint_period,
        seed=args.seed,
        opts=args.opts,
        final_fraction=args.final_fraction,
        keep_checkpoints=args.keep_checkpoints,
    )
    for part in sorted(out):
        print((Path(args.output_dir) / f"fig8{part}.md").read_text())
    return out
