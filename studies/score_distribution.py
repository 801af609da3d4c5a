"""IoU vs. classification score of anchors (the paper's Fig. 7).

Details: docs/studies.md#studiesscore_distribution."""
import re
from typing import Dict

import numpy as np
import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.detection_utils import build_augmentation
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes, pairwise_iou

from .common import (
    RUN_SPEC, build_model_for_run, fmt_num, markdown_table, prepare_runs, progress, save_figure,
    study_argument_parser, subplots, timestamp, write_study_outputs
)

STUDY = "score_distribution"
#: IoU bin edges: [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0] (the last bin includes 1).
BIN_EDGES = np.linspace(0.0, 1.0, 11)
PAIR_KEYS = ("iou", "score", "max_score", "match_label", "weight", "image_index")


@torch.no_grad()
def image_scores(model, inputs):
    """``(anchors Boxes (R, 4), scores (R, K))`` of one mapped input dict: the scores the model
    detects with (its loss's ``scores``: sigmoids, or ``ce_ohem``'s softmax)."""
    images = model.preprocess_image([inputs])
    feats = model.backbone(images.tensor)
    feats = [feats[f] for f in model.head_in_features]
    anchors = Boxes.cat(model.anchor_generator(feats))
    logits, _ = model.head(feats)
    logits = torch.cat([permute_to_N_HWA_K(x, model.num_classes) for x in logits], dim=1)[0].float()
    return anchors, model.cls_loss.scores(logits)


def collect_pairs(model, cfg, dicts, zero_iou_samples=200, seed=0, high_score=0.5, log_every=10):
    """``(pairs, totals)`` of ``model`` on ``dicts`` (docs/studies.md): equal-length arrays of
    :data:`PAIR_KEYS`, and exact counts over all anchors."""
    for attr in ("anchor_generator", "head", "head_in_features", "anchor_matcher", "cls_loss", "backbone"):
        if not hasattr(model, attr):
            raise TypeError(f"{type(model).__name__} has no {attr!r}: the score distribution supports "
                            "ap_loss_d2's RetinaNet (APLossRetinaNet) only")
    mapper = DatasetMapper(cfg, is_train=True, augmentations=build_augmentation(cfg, False))
    device = next(model.parameters()).device
    acc = {k: [] for k in PAIR_KEYS}
    totals = dict(images=0, images_without_gt=0, anchors=0, zero_iou_anchors=0,
                  zero_iou_score_sum=0.0, zero_iou_high_score=0)
    for i, record in enumerate(dicts):
        inputs = mapper(record)
        gt = inputs["instances"]
        totals["images"] += 1
        if len(gt) == 0:
            totals["images_without_gt"] += 1
            continue
        anchors, probs = image_scores(model, inputs)
        gt_classes = gt.gt_classes.to(device)
        iou = pairwise_iou(gt.gt_boxes.to(device), anchors)  # (G, R)
        matched, labels = model.anchor_matcher(iou)
        best_iou = iou.max(dim=0).values
        totals["anchors"] += len(best_iou)
        idx, zero = torch.nonzero(best_iou > 0).squeeze(1), torch.nonzero(best_iou <= 0).squeeze(1)
        cls = gt_classes[matched[idx]]
        zero_scores = probs[zero][:, torch.unique(gt_classes)].max(dim=1).values if len(zero) else probs.new_zeros(0)
        totals["zero_iou_anchors"] += len(zero)
        totals["zero_iou_score_sum"] += float(zero_scores.double().sum())
        totals["zero_iou_high_score"] += int((zero_scores >= high_score).sum())
        k = len(zero) if zero_iou_samples < 0 else min(zero_iou_samples, len(zero))
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
        pick = torch.randperm(len(zero), generator=g)[:k].to(zero.device)
        all_idx = torch.cat([idx, zero[pick]])
        acc["iou"].append(best_iou[all_idx].cpu().numpy())
        acc["score"].append(torch.cat([probs[idx, cls], zero_scores[pick]]).cpu().numpy())
        acc["max_score"].append(probs[all_idx].max(dim=1).values.cpu().numpy())
        acc["match_label"].append(labels[all_idx].cpu().numpy().astype(np.int8))
        acc["weight"].append(np.concatenate([np.ones(len(idx)), np.full(k, len(zero) / k if k else 0.0)]))
        acc["image_index"].append(np.full(len(all_idx), i, dtype=np.int32))
        if log_every and (i + 1) % log_every == 0:
            progress(STUDY, f"    {i + 1}/{len(dicts)} images")
    dtypes = dict(iou=np.float32, score=np.float32, max_score=np.float32, match_label=np.int8,
                  weight=np.float64, image_index=np.int32)
    return {k: (np.concatenate(v).astype(dtypes[k]) if v else np.zeros(0, dtypes[k])) for k, v in acc.items()}, totals


def bin_index(iou: np.ndarray) -> np.ndarray:
    """Bin of each IoU: i for ``BIN_EDGES[i] <= iou < BIN_EDGES[i + 1]``; IoU 1 in the last."""
    return np.clip(np.searchsorted(BIN_EDGES, iou, side="right") - 1, 0, len(BIN_EDGES) - 2)


def summarize(pairs: Dict[str, np.ndarray], totals: dict, high_score=0.5, low_iou=0.4) -> dict:
    """Summary numbers of one run's pairs (all weighted by ``pairs["weight"]``)."""
    iou, score, w = pairs["iou"].astype(np.float64), pairs["score"].astype(np.float64), pairs["weight"]
    bins, b = [], bin_index(iou)
    for i in range(len(BIN_EDGES) - 1):
        m = b == i
        wc = float(w[m].sum())
        bins.append(dict(lo=float(BIN_EDGES[i]), hi=float(BIN_EDGES[i + 1]), count=int(m.sum()), weighted_count=wc,
                         mean_score=float((w[m] * score[m]).sum() / wc) if wc > 0 else None,
                         frac_high_score=float(w[m & (score >= high_score)].sum() / wc) if wc > 0 else None))
    low_nonzero = (iou > 0) & (iou < low_iou)
    hs_nonzero = int((low_nonzero & (score >= high_score)).sum())
    low_total = int(low_nonzero.sum()) + totals["zero_iou_anchors"]
    hs_total = hs_nonzero + totals["zero_iou_high_score"]
    fg, nz = pairs["match_label"] == 1, totals["zero_iou_anchors"]
    return {
        "bins": bins, "positives": dict(count=int(fg.sum()), mean_score=float(score[fg].mean()) if fg.any() else None),
        "zero_iou": dict(anchors=nz, recorded=int((iou == 0).sum()), high_score=totals["zero_iou_high_score"],
                         mean_score=totals["zero_iou_score_sum"] / nz if nz else None),
        "high_score_low_iou": dict(
            iou_below=low_iou, score_at_least=high_score, count_nonzero_iou=hs_nonzero,
            count_zero_iou=totals["zero_iou_high_score"], count=hs_total, low_iou_anchors=low_total,
            fraction=hs_total / low_total if low_total else None),
    }


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "run"


def _bin_means(summary):
    return ((BIN_EDGES[:-1] + BIN_EDGES[1:]) / 2,
            [np.nan if b["mean_score"] is None else b["mean_score"] for b in summary["bins"]])


def _scatter(ax, pairs, summary, label, high_score, max_points, seed):
    n = len(pairs["iou"])
    sel = np.arange(n)
    if n > max_points:
        sel = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    fg = pairs["match_label"][sel] == 1
    for m, color, alpha, what in ((~fg, "tab:blue", 0.25, "bg / ignored anchors"), (fg, "tab:red", 0.35, "fg anchors")):
        ax.scatter(pairs["iou"][sel][m], pairs["score"][sel][m], s=2, alpha=alpha, c=color, linewidths=0,
                   rasterized=True, label=what)
    ax.plot(*_bin_means(summary), "k-o", ms=3, lw=1, label="mean score per IoU bin")
    ax.axhline(high_score, color="gray", lw=0.6, ls="--")
    ax.set(xlim=(-0.02, 1.0), ylim=(-0.02, 1.02), xlabel="IoU with matched ground truth",
           ylabel="score of the ground-truth class")
    hs = summary["high_score_low_iou"]
    ax.set_title(f"{label}\nscore>={hs['score_at_least']} at IoU<{hs['iou_below']}: {hs['count']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", markerscale=3)


def plot_run(pairs, summary, label, path, high_score, max_points=50000, seed=0):
    fig, ax = subplots(figsize=(5.0, 4.2))
    _scatter(ax, pairs, summary, label, high_score, max_points, seed)
    save_figure(fig, path)


def combined_figure(runs_data, high_score, max_points=50000, seed=0):
    """One scatter panel per run of ``[(label, pairs, summary)]``, then their mean score per IoU bin."""
    fig, axes = subplots(1, len(runs_data) + 1, figsize=(4.2 * (len(runs_data) + 1), 4.0), squeeze=False)
    for ax, (label, pairs, summary) in zip(axes[0], runs_data):
        _scatter(ax, pairs, summary, label, high_score, max_points, seed)
        axes[0][-1].plot(*_bin_means(summary), "-o", ms=3, label=label)
    axes[0][-1].set(xlabel="IoU bin", ylabel="mean score (weighted)", ylim=(-0.02, 1.02))
    axes[0][-1].set_title("mean score per IoU bin", fontsize=9)
    axes[0][-1].grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    return fig


def build_table(report, digits=3):
    bins = report["runs"][0]["summary"]["bins"] if report["runs"] else []
    headers = (["Training Loss"] + [f"[{b['lo']:.1f}, {b['hi']:.1f}" + ("]" if b["hi"] >= 1 else ")") for b in bins]
               + ["high score, low IoU", "fraction"])
    rows = [[run["label"]] + [fmt_num(b["mean_score"], digits) for b in s["bins"]]
            + [fmt_num(s["high_score_low_iou"]["count"]), fmt_num(s["high_score_low_iou"]["fraction"], 5)]
            for run in report["runs"] for s in [run["summary"]]]
    return markdown_table(headers, rows)


def parse_args(argv=None):
    p = study_argument_parser(STUDY, __doc__.split("\n\n")[0], runs=RUN_SPEC)
    p.add_argument("--max-images", type=int, default=50, help="first N images (-1: all)")
    p.add_argument("--zero-iou-samples", type=int, default=200,
                   help="IoU-0 anchors recorded per image (-1: all)")
    p.add_argument("--high-score", type=float, default=0.5, help="'high score' threshold")
    p.add_argument("--low-iou", type=float, default=0.4,
                   help="'low IoU' threshold (RetinaNet's background threshold)")
    p.add_argument("--max-plot-points", type=int, default=50000)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out, specs, resolved, labels, dataset = prepare_runs(args)
    dicts = DatasetCatalog.get(dataset)
    if args.max_images is not None and args.max_images >= 0:
        dicts = dicts[:args.max_images]
    report = {"study": STUDY, "created": timestamp(), "dataset": dataset, "images": len(dicts),
              "zero_iou_samples": args.zero_iou_samples, "high_score": args.high_score, "low_iou": args.low_iou,
              "seed": args.seed, "bin_edges": BIN_EDGES.tolist(), "runs": [], "figures": []}
    runs_data = []
    for k, (spec, (cfg, _), label) in enumerate(zip(specs, resolved, labels)):
        progress(STUDY, f"({k + 1}/{len(specs)}) {label}: {len(dicts)} images of {dataset}")
        model = build_model_for_run(cfg, spec.weights)
        pairs, totals = collect_pairs(model, cfg, dicts, args.zero_iou_samples, args.seed, args.high_score)
        summary = summarize(pairs, totals, args.high_score, args.low_iou)
        slug = _slug(label)
        np.savez_compressed(out / f"score_{slug}.npz", **pairs)
        plot_run(pairs, summary, label, out / f"score_{slug}.png", args.high_score, args.max_plot_points, args.seed)
        report["figures"].append(f"score_{slug}.png")
        report["runs"].append({
            "label": label, "config": spec.config, "weights": spec.weights or cfg.MODEL.WEIGHTS,
            "cls_loss": cfg.MODEL.CLS_LOSS.NAME, "pairs": f"score_{slug}.npz",
            "figure": f"score_{slug}.png", "totals": totals, "summary": summary,
        })
        runs_data.append((label, pairs, summary))
        hs = summary["high_score_low_iou"]
        progress(STUDY, f"    {len(pairs['iou'])} pairs recorded; {hs['count']} anchors with "
                        f"score >= {args.high_score} at IoU < {args.low_iou}")
        del model
    save_figure(combined_figure(runs_data, args.high_score, args.max_plot_points, args.seed),
                out / "score_distribution.png", dpi=110)
    report["figures"].insert(0, "score_distribution.png")
    table = build_table(report)
    md = [f"## Score distribution (Fig. 7) on `{dataset}` ({len(dicts)} images)", "",
          "Mean score of the ground-truth class per IoU bin (IoU-0 anchors weighted by their "
          f"sampling rate), and anchors with score >= {args.high_score} at IoU < {args.low_iou} "
          "(exact count; fraction of all anchors with IoU below that).", "", table, "",
          "![score distribution](score_distribution.png)"]
    write_study_outputs(out, STUDY, report, md, table)
    return report


if __name__ == "__main__":
    main()
