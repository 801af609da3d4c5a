"""One markdown page from several training runs and their studies (the paper's Table 2 & co).

Details: docs/studies.md#studiesreport."""
import json
import os
import re
from collections import Counter, OrderedDict
from pathlib import Path
from typing import List

from .common import (
    cls_loss_label, fmt_num, last_bbox_metrics, markdown_table, not_finite, progress,
    study_argument_parser, timestamp
)

STUDY = "report"
STUDY_FILES = ("robustness.json", "score_distribution.json", "cost.json")
METRICS = ("AP", "AP50", "AP75")
#: Row order of Table 2 (loss names).
PAPER_ORDER = ("ce_ohem", "ce", "focal", "auc", "ap")
DETECTOR_NAMES = {"APLossRetinaNet": "RetinaNet", "RetinaNet": "RetinaNet",
                  "GeneralizedRCNN": "Faster R-CNN"}


def collect_run(run_dir: Path) -> List[dict]:
    """Table-2 rows of one run folder (one per evaluated dataset; one with no numbers if none)."""
    import yaml

    cfg = {}
    if (run_dir / "config.yaml").is_file():
        try:
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except yaml.YAMLError as e:
            progress(STUDY, f"cannot parse {run_dir / 'config.yaml'}: {e}")
    model = cfg.get("MODEL") or {}
    loss = (model.get("CLS_LOSS") or {}).get("NAME")
    arch = model.get("META_ARCHITECTURE", "?")
    tests = list((cfg.get("DATASETS") or {}).get("TEST") or [])
    label = cls_loss_label(loss) if loss else run_dir.name
    return [{"run_dir": str(run_dir), "label": label, "cls_loss": loss, "detector": DETECTOR_NAMES.get(arch, arch),
             "dataset": prefix or (tests[0] if tests else "?"), "iteration": values.get("iteration"),
             "status": run_status(values), **{m: values.get(m) for m in METRICS}}
            for prefix, values in (last_bbox_metrics(run_dir / "metrics.json", METRICS) or {"": {}}).items()]


def run_status(values: dict) -> str:
    """``ok`` (AP, AP50, AP75 finite), ``no evaluation`` (none logged) or ``failed: ...`` (an
    evaluation with NaN AP: no detections)."""
    bad = not_finite(values, METRICS)
    if not any(m in values for m in METRICS):
        return "no evaluation"
    return f"failed: no detections ({', '.join(bad)} NaN or missing)" if bad else "ok"


def find_studies(folder: Path, max_depth: int = 3) -> List[Path]:
    """Study JSON files (:data:`STUDY_FILES`) in ``folder`` and up to ``max_depth`` levels below."""
    found, base_depth = [], len(folder.resolve().parts)
    for root, dirs, files in os.walk(folder):
        dirs[:] = [] if len(Path(root).resolve().parts) - base_depth >= max_depth else sorted(dirs)
        found += [Path(root) / name for name in sorted(files) if name in STUDY_FILES]
    return found


def _ordered_labels(labels):
    known = [lab for lab in map(cls_loss_label, PAPER_ORDER) if lab in labels]
    return known + [lab for lab in labels if lab not in known]


def table2(rows, digits) -> str:
    """Rows: losses; column groups: (detector, dataset), each with AP, AP50, AP75."""
    groups = list(OrderedDict.fromkeys((r["detector"], r["dataset"]) for r in rows))
    seen = Counter((r["label"], r["detector"], r["dataset"]) for r in rows)  # rows sharing a label
    for r in rows:
        dup = seen[(r["label"], r["detector"], r["dataset"])] > 1
        r["row"] = f"{r['label']} ({Path(r['run_dir']).name})" if dup else r["label"]
    row_names = _ordered_labels(list(OrderedDict.fromkeys(r["row"] for r in rows)))
    headers = ["Training Loss"] + [f"{m} ({det} + {ds})" for det, ds in groups for m in METRICS]
    table = []
    for name in row_names:
        cells = [name]
        for det, ds in groups:
            match = [r for r in rows if r["row"] == name and (r["detector"], r["dataset"]) == (det, ds)]
            failed = match and match[0]["status"].startswith("failed")
            cells += ["failed" if failed else fmt_num(match[0][m], digits) if match else "-" for m in METRICS]
        table.append(cells)
    return markdown_table(headers, table)


def details_table(rows, digits, rel) -> str:
    body = [[r["label"], r["detector"], r["dataset"], fmt_num(r["iteration"]),
             *(fmt_num(r[m], digits) for m in METRICS),
             r["status"], f"`{rel(r['run_dir'])}`"] for r in rows]
    return markdown_table(["Training Loss", "detector", "test set", "iteration", *METRICS, "status", "run folder"],
                          body, align="lllrrrrll")


def study_page(json_path: Path, rel) -> List[str]:
    """The study's own page (``<study>.md`` beside its JSON), its headings one level down and its
    pictures linked relative to the report."""
    page = json_path.with_suffix(".md")
    if not page.is_file():
        return [f"`{rel(page)}` is missing: rerun the study to write it.", ""]
    text = re.sub(r"^(#+) ", r"#\1 ", page.read_text(), flags=re.M)
    text = re.sub(r"\]\(([^)/:]+\.png)\)", lambda m: f"]({rel(json_path.parent / m.group(1))})", text)
    return [text.rstrip(), "", f"Source: [`{rel(json_path)}`]({rel(json_path)})", ""]


def render_report(rows, studies, output: Path, digits=1, title="AP-loss: results") -> str:
    def rel(p):
        return os.path.relpath(Path(p).resolve(), output.parent.resolve())

    md = [f"# {title}", "", f"Generated {timestamp()} by `python -m studies.report`.",
          "", "## Detection accuracy (Table 2)", ""]
    md += [table2(rows, digits), "", "Last evaluation logged in each run's metrics.json (bbox AP over IoU "
           "0.50:0.95, AP50, AP75; %).", "", details_table(rows, digits, rel), ""] if rows else ["No runs.", ""]
    by_kind = OrderedDict((k, []) for k in ("robustness", "score_distribution", "cost"))
    for path, data in studies:
        by_kind.setdefault(data.get("study"), []).append((path, data))
    headings = {"robustness": "## Robustness", "score_distribution": "## Score distribution",
                "cost": "## Memory and time cost"}
    for kind, items in by_kind.items():
        if not items:
            continue
        md += [headings.get(kind, f"## {kind}"), ""]
        for path, _ in items:
            md += study_page(path, rel)
    return "\n".join(md).rstrip() + "\n"


def parse_args(argv=None):
    p = study_argument_parser(STUDY, __doc__.split("\n\n")[0], opts=False)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="train_net.py output folders")
    p.add_argument("--studies", nargs="*", default=[], metavar="DIR",
                   help="more folders with study outputs (robustness.json, ...)")
    p.add_argument("--digits", type=int, default=1, help="decimals of AP numbers")
    p.add_argument("--title", default="AP-loss: results")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    output = Path(args.output_dir) / "report.md"
    rows, study_paths = [], []
    for d in map(Path, args.run_dirs):
        if not d.is_dir():
            raise SystemExit(f"{d} is not a folder")
        r = collect_run(d)
        progress(STUDY, f"{d}: {r[0]['label']}, {len(r)} evaluated dataset(s)")
        rows += r
        study_paths += find_studies(d)
    for d in args.studies:
        study_paths += find_studies(Path(d))
    studies, seen = [], set()
    for p in study_paths:
        if p.resolve() in seen:
            continue
        seen.add(p.resolve())
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            progress(STUDY, f"skipping {p}: {e}")
            continue
        if isinstance(data, dict) and data.get("study") in ("robustness", "score_distribution", "cost"):
            studies.append((p, data))
            progress(STUDY, f"found {data['study']} study {p}")
    text = render_report(rows, studies, output, args.digits, args.title)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    progress(STUDY, f"wrote {output} ({len(rows)} rows, {len(studies)} studies)")
    return text


if __name__ == "__main__":
    main()
