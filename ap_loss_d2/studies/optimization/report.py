"""Reports of the Fig. 8 study: ``fig8a`` (AP-loss curves) and ``fig8b`` (final AP-loss against
the background anchors kept per image), each as JSON, markdown and PNG."""
from pathlib import Path
from typing import Dict

from ..common import LOSS_LABELS, pyplot, write_json


def negatives_label(n: int) -> str:
    return "all" if n < 0 else str(n)


def run_name(method: str, num_negatives: int) -> str:
    return f"{method}_neg{negatives_label(num_negatives)}"


# ------------------------------------------------------------------------------------------------


def _label(method):
    label = LOSS_LABELS.get(method, method)
    return f"{label}, error-driven update" if method in ("ap", "auc") else label


def fmt_loss(v):
    """An AP-loss value with 4 decimals ("n/a" for None)."""
    return "n/a" if v is None else f"{v:.4f}"


def _common_settings(result):
    keys = ("config_file", "iters", "record_period", "seed", "opts", "final_fraction")
    return {k: result["settings"][k] for k in keys}


def report_fig8a(results: Dict[str, dict], output_dir: Path):
    """fig8a.json / .md / .png from ``{method: result}`` (all negatives kept). The JSON is
    ``{"study": "optimization", "part": "a", "figures": [...], "settings": {...},
    "methods": {method: {iterations, ap_loss, final_ap_loss, ...}}}``."""
    methods = {
        m: dict(
            iterations=r["iterations"],
            ap_loss=r["ap_loss"],
            final_ap_loss=r["final_ap_loss"],
            final_window=r["final_window"],
            last_ap_loss=r["last_ap_loss"],
            min_ap_loss=min(r["ap_loss"]) if r["ap_loss"] else None,
            run=run_name(m, -1),
        )
        for m, r in results.items()
    }
    any_r = next(iter(results.values()))
    data = dict(
        study="optimization",
        part="a",
        figures=["fig8a.png"],
        settings=_common_settings(any_r),
        methods=methods,
    )
    write_json(output_dir / "fig8a.json", data)
    lines = [
        "# Fig. 8a: exact AP-loss (1 - AP, Heaviside, not interpolated) of the training batch",
        "",
        f"Box regression off; {any_r['settings']['iters']} iterations, recorded every "
        f"{any_r['settings']['record_period']}; config `{any_r['settings']['config_file']}`. "
        f"Final = mean of the last {int(any_r['settings']['final_fraction'] * 100)}% of the "
        "records.",
        "",
        "| method | final AP-loss | last | min | records |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, d in methods.items():
        lines.append(
            f"| {_label(m)} (`{m}`) | {fmt_loss(d['final_ap_loss'])} | {fmt_loss(d['last_ap_loss'])} | "
            f"{fmt_loss(d['min_ap_loss'])} | {len(d['ap_loss'])} |"
        )
    (output_dir / "fig8a.md").write_text("\n".join(lines) + "\n")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, d in methods.items():
        ax.plot([i + 1 for i in d["iterations"]], d["ap_loss"], marker=".", ms=3, label=_label(m))
    ax.set_xlabel("iteration")
    ax.set_ylabel("AP-loss of the training batch")
    _finish_plot(plt, fig, ax, "Fig. 8a: convergence (classification only)", output_dir / "fig8a.png")
    return data


def report_fig8b(results: Dict[str, Dict[int, dict]], output_dir: Path):
    """fig8b.json / .md / .png from ``{method: {num_negatives: result}}``. The JSON is
    ``{"study": "optimization", "part": "b", "figures": [...], "settings": {...},
    "methods": {method: {"100" | ... | "all": {num_negatives, neg_anchors_per_image,
    final_ap_loss, final_ap_loss_all_negatives, last_ap_loss, run}}}}``."""
    methods = {
        m: {
            negatives_label(n): dict(
                num_negatives=n,
                neg_anchors_per_image=r["neg_anchors_per_image"],
                final_ap_loss=r["final_ap_loss"],
                final_ap_loss_all_negatives=r.get(
                    "final_ap_loss_all_negatives", r["final_ap_loss"]
                ),
                last_ap_loss=r["last_ap_loss"],
                run=run_name(m, n),
            )
            for n, r in per_level.items()
        }
        for m, per_level in results.items()
    }
    any_r = next(iter(next(iter(results.values())).values()))
    data = dict(
        study="optimization",
        part="b",
        figures=["fig8b.png"],
        settings=_common_settings(any_r),
        methods=methods,
    )
    write_json(output_dir / "fig8b.json", data)
    first = next(iter(methods.values()))
    levels = list(first.keys())
    lines = [
        "# Fig. 8b: final AP-loss vs background anchors kept per image",
        "",
        "Final AP-loss of the training batch, ranked with the negatives the loss sees "
        "(in parentheses: with all negatives). The mean number of background anchors kept per "
        "image is in the header.",
        "",
        "| method | "
        + " | ".join(f"{lv} ({_fmt_count(first[lv]['neg_anchors_per_image'])})" for lv in levels)
        + " |",
        "|---|" + "---:|" * len(levels),
    ]
    for m, per_level in methods.items():
        cells = [
            f"{fmt_loss(d['final_ap_loss'])} ({fmt_loss(d['final_ap_loss_all_negatives'])})"
            for d in per_level.values()
        ]
        lines.append(f"| {_label(m)} (`{m}`) | " + " | ".join(cells) + " |")
    (output_dir / "fig8b.md").write_text("\n".join(lines) + "\n")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, per_level in methods.items():
        pts = sorted(
            (d["neg_anchors_per_image"], d["final_ap_loss"])
            for d in per_level.values()
            if d["final_ap_loss"] is not None and d["neg_anchors_per_image"]
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=_label(m))
    ax.set_xscale("log")
    ax.set_xlabel("background anchors kept per image")
    ax.set_ylabel("final AP-loss")
    _finish_plot(plt, fig, ax, "Fig. 8b: imbalance", output_dir / "fig8b.png")
    return data


def _finish_plot(plt, fig, ax, title, path):
    """Common styling of the Fig. 8 plots (AP-loss axis in [0, 1]), saved to ``path``."""
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt_count(v):
    return "n/a" if v is None else f"{v:.0f}"
