"""Command line of the Fig. 8 study: ``python -m studies.optimization``."""
from pathlib import Path

import torch
from detectron2.utils.logger import setup_logger

from ap_loss_d2.losses.registry import cls_loss_names
from ..common import default_config, study_argument_parser
from .model import NEGATIVE_MODES
from .runner import CONFIG_REL, DEFAULT_METHODS, DEFAULT_NEGATIVE_MODE, DEFAULT_NEGATIVES, run_study


def build_parser():
    p = study_argument_parser(
        "optimization",
        "Fig. 8 of the AP-loss paper: AP-loss optimised by the error-driven update, the "
        "approximate gradient and the structured hinge loss (classification branch only).",
        config=f"configs/{CONFIG_REL}, an APLossRetinaNet",
    )
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=cls_loss_names("retinanet"))
    p.add_argument("--parts", nargs="+", default=["a", "b"], choices=["a", "b"])
    p.add_argument(
        "--negatives",
        nargs="+",
        default=list(DEFAULT_NEGATIVES),
        help="part b: N per image, proposals (--negative-mode proposals) or random background "
        "anchors (random); 'all' keeps every anchor (part a's run)",
    )
    p.add_argument(
        "--negative-mode",
        default=DEFAULT_NEGATIVE_MODE,
        choices=NEGATIVE_MODES,
        help="part b: 'proposals' (the paper's Fig. 8b: the top-N anchors of a frozen pre-trained "
        "RetinaNet, --proposal-weights, united with the positives are the valid samples) or "
        "'random' (N random background anchors per image, re-drawn every iteration; Table 8's "
        "random sampling, not Fig. 8b)",
    )
    p.add_argument(
        "--proposal-weights",
        default=None,
        help="checkpoint of a RetinaNet trained with the same config, the frozen proposer "
        "(e.g. output/main_job/model_final.pth written by `make main`)",
    )
    p.add_argument(
        "--snapshot-proposals",
        default=None,
        help="the dashed lines: first train AP-loss with this N for --snapshot-iters, then run "
        "every (method, N) again initialised from that snapshot",
    )
    p.add_argument(
        "--snapshot-iters", type=int, default=None,
        help="iterations of the snapshot run (default: --iters)",
    )
    p.add_argument(
        "--snapshot-negatives", nargs="+", default=None,
        help="the N of --negatives run again from the snapshot (default: all of them)",
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
        config_file=args.config_file or default_config(CONFIG_REL),
        methods=args.methods,
        parts=args.parts,
        negatives=args.negatives,
        negative_mode=args.negative_mode,
        proposal_weights=args.proposal_weights,
        snapshot_proposals=args.snapshot_proposals,
        snapshot_iters=args.snapshot_iters,
        snapshot_negatives=args.snapshot_negatives,
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
