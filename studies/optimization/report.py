"""Reports of the Fig. 8 study: ``fig8a`` (AP-loss curves) and ``fig8b`` (final AP-loss against
the proposals per image, or against the random background anchors kept per image in the random
mode; solid: default initialisation, dashed: from the snapshot), each as JSON, markdown and PNG."""
from pathlib import Path
from typing import Dict, Optional

from ..common import cls_loss_label, pyplot, write_json


def negatives_label(n: int) -> str:
    return "all" if n < 0 else str(n)


def run_name(method: str, num_negatives: int, negative_mode: str = "random",
             from_snapshot: bool = False) -> str:
    """``<method>_neg<N>`` (random), ``<method>_prop<N>`` (proposals), ``<method>_negall`` (all
    anchors, either mode: part a's run); ``_snap`` appended for a run from the snapshot."""
    kind = "prop" if negative_mode == "proposals" and num_negatives >= 0 else "neg"
    return f"{method}_{kind}{negatives_label(num_negatives)}" + ("_snap" if from_snapshot else "")


def snapshot_name(method: str, num_negatives: int, iters: int, negative_mode: str) -> str:
    """The snapshot run's folder: ``snapshot_<method>_<prop|neg><N>_<iters>it``."""
    return f"snapshot_{run_name(method, num_negatives, negative_mode)}_{iters}it"


# ------------------------------------------------------------------------------------------------


def _label(method):
    label = cls_loss_label(method)
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


def _level_data(method, n, r, negative_mode, from_snapshot):
    anchors = r.get("anchors_per_image")
    proposals = None
    if negative_mode == "proposals":
        proposals = anchors if n < 0 else (min(n, anchors) if anchors else n)
    return dict(
        num_negatives=n,
        proposals_per_image=proposals,
        anchors_per_image=anchors,
        neg_anchors_per_image=r["neg_anchors_per_image"],
        final_ap_loss=r["final_ap_loss"],
        final_ap_loss_all_negatives=r.get("final_ap_loss_all_negatives", r["final_ap_loss"]),
        last_ap_loss=r["last_ap_loss"],
        run=run_name(method, n, negative_mode, from_snapshot),
    )


def report_fig8b(
    results: Dict[str, Dict[int, dict]],
    output_dir: Path,
    *,
    negative_mode: str = "random",
    from_snapshot: Optional[Dict[str, Dict[int, dict]]] = None,
    snapshot: Optional[dict] = None,
):
    """fig8b.json / .md / .png from ``{method: {N: result}}`` (default initialisation) and
    optionally ``from_snapshot`` (same shape: the runs initialised from ``snapshot``). The JSON
    is ``{"study": "optimization", "part": "b", "figures": [...], "negative_mode", "x_axis",
    "settings": {...}, "snapshot": {...} | null, "methods": {method: {"100" | ... | "all":
    {num_negatives, proposals_per_image, anchors_per_image, neg_anchors_per_image,
    final_ap_loss, final_ap_loss_all_negatives, last_ap_loss, run}}}, "methods_from_snapshot":
    same | null}``. x of the plot: ``proposals_per_image`` (proposals; ``all`` = every anchor)
    or ``neg_anchors_per_image`` (random)."""
    proposals = negative_mode == "proposals"

    def table(res, snap):
        return {
            m: {negatives_label(n): _level_data(m, n, r, negative_mode, snap) for n, r in per.items()}
            for m, per in res.items()
        }

    methods = table(results, False)
    methods_snap = table(from_snapshot, True) if from_snapshot is not None else None
    any_r = next(iter(next(iter(results.values())).values()))
    x_key = "proposals_per_image" if proposals else "neg_anchors_per_image"
    x_label = "proposals per image" if proposals else "random background anchors kept per image"
    settings = _common_settings(any_r)
    settings["negative_mode"] = negative_mode
    settings["proposal_weights"] = next(
        (r["settings"].get("proposal_weights") for per in results.values() for r in per.values()
         if r["settings"].get("proposal_weights")),
        None,
    )
    data = dict(
        study="optimization",
        part="b",
        figures=["fig8b.png"],
        negative_mode=negative_mode,
        x_axis=x_key,
        settings=settings,
        snapshot=snapshot,
        methods=methods,
        methods_from_snapshot=methods_snap,
    )
    write_json(output_dir / "fig8b.json", data)
    first = next(iter(methods.values()))
    levels = list(first.keys())
    if proposals:
        lines = [
            "# Fig. 8b: final AP-loss vs proposals per image",
            "",
            "Valid samples of each image: the top-N anchors by the objectness of a frozen, "
            "pre-trained RetinaNet (regression off: the proposals are anchors) united with the "
            "positive anchors; the other anchors are ignored. Final AP-loss of the training "
            "batch over the valid samples (in parentheses: with all negatives). Header: N (mean "
            "background anchors among the valid samples per image).",
        ]
        weights = settings["proposal_weights"]
        if weights:
            lines += ["", f"Proposer: `{weights['path']}` (sha256 {weights['sha256'][:12]})."]
    else:
        lines = [
            "# Fig. 8b (random mode): final AP-loss vs background anchors kept per image",
            "",
            "RANDOM negatives (not the paper's Fig. 8b, which uses RPN proposals): N background "
            "anchors per image drawn at random every iteration. Final AP-loss of the training "
            "batch, ranked with the negatives the loss sees (in parentheses: with all negatives). "
            "The mean number of background anchors kept per image is in the header.",
        ]
    if snapshot is not None:
        lines += [
            "",
            f"Rows \"from snapshot\" (dashed in the plot): initialised from `{snapshot['run']}`, "
            f"trained from the default initialisation with `{snapshot['method']}` and "
            f"N = {negatives_label(snapshot['num_negatives'])} for {snapshot['iters']} iterations "
            "(its final AP-loss: "
            f"{fmt_loss(snapshot.get('final_ap_loss'))}).",
        ]
    lines += [
        "",
        "| method | "
        + " | ".join(f"{lv} ({_fmt_count(first[lv]['neg_anchors_per_image'])})" for lv in levels)
        + " |",
        "|---|" + "---:|" * len(levels),
    ]
    for table_, suffix in ((methods, ""), (methods_snap or {}, ", from snapshot")):
        for m, per_level in table_.items():
            cells = [
                f"{fmt_loss(per_level[lv]['final_ap_loss'])} "
                f"({fmt_loss(per_level[lv]['final_ap_loss_all_negatives'])})"
                if lv in per_level else "not run"
                for lv in levels
            ]
            lines.append(f"| {_label(m)} (`{m}`){suffix} | " + " | ".join(cells) + " |")
    (output_dir / "fig8b.md").write_text("\n".join(lines) + "\n")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {}
    for table_, style, suffix in ((methods, "-", ""), (methods_snap or {}, "--", " (from snapshot)")):
        for m, per_level in table_.items():
            pts = sorted(
                (d[x_key], d["final_ap_loss"])
                for d in per_level.values()
                if d["final_ap_loss"] is not None and d[x_key]
            )
            kw = {"color": colors[m]} if m in colors else {}
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                              label=_label(m) + suffix, **kw)
            colors.setdefault(m, line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("final AP-loss")
    title = "Fig. 8b: imbalance" + (
        " (top-N proposals of a frozen RetinaNet)" if proposals else " (RANDOM negatives)"
    )
    _finish_plot(plt, fig, ax, title, output_dir / "fig8b.png")
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
