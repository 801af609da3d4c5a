"""Helpers shared by the studies: runs (config + checkpoint) to models, dataset subsets, tables.

A *run* is given on the command line as ``CONFIG:WEIGHTS[:LABEL]`` (a yacs ``.yaml`` config,
a checkpoint, an optional label) or as a training output folder ``RUN_DIR[:LABEL]`` (its
``config.yaml`` and its last checkpoint, as written by ``train_net.py``). The label defaults to
the registry's label of ``MODEL.CLS_LOSS.NAME`` ("AP-loss", "Focal loss", ...).

Every study writes ``<name>.json`` with ``"study": "<name>"`` at the top, a markdown table
``<name>.md`` and, where useful, PNG figures listed under ``"figures"`` (paths relative to the
JSON's folder); :mod:`ap_loss_d2.studies.report` collects them.
"""
import argparse
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "REPO",
    "check_run_settings",
    "cls_loss_label",
    "default_config",
    "last_bbox_metrics",
    "metrics_by_iteration",
    "read_json",
    "read_metrics_json",
    "scale_iter",
    "scaled_schedule",
    "train_net_command",
    "RUN_SPEC",
    "RunSpec",
    "StudyArgumentParser",
    "study_argument_parser",
    "build_model_for_run",
    "dataset_subset",
    "fmt_num",
    "load_cfg",
    "loss_label",
    "markdown_table",
    "not_finite",
    "parse_run_spec",
    "progress",
    "pyplot",
    "resolve_run",
    "save_checkpoint",
    "to_jsonable",
    "unique_labels",
    "write_json",
]

logger = logging.getLogger(__name__)

#: The repository root of a source checkout (``configs/``, ``train_net.py``); an installed
#: package has no ``configs/``: :func:`default_config` then says where they are expected.
REPO = Path(__file__).resolve().parents[2]


def default_config(relpath: str) -> str:
    """``REPO/configs/<relpath>`` of a source checkout; a clear error when it is missing (the
    package does not ship ``configs/``)."""
    path = REPO / "configs" / relpath
    if not path.is_file():
        raise SystemExit(
            f"default config configs/{relpath} not found under {REPO}: the configs/ folder ships "
            "with the repository, not with the installed package. Run from a checkout "
            "(pip install -e .) or pass --config-file PATH"
        )
    return str(path)


def train_net_command() -> List[str]:
    """The command that runs ``train_net.py``'s logic in a new process (``--num-gpus`` etc.
    appended by the caller); works from an installed package."""
    return [sys.executable, str(Path(__file__).resolve().parents[2] / "train_net.py")]


def scale_iter(value: int, max_iter: int, iters: int) -> int:
    """An iteration count of a ``max_iter`` schedule (a step, ``WARMUP_ITERS``) at ``iters``."""
    return int(round(value * iters / max_iter))


def scaled_schedule(steps: Sequence[int], max_iter: int, iters: int) -> Tuple[int, ...]:
    """``SOLVER.STEPS`` of a ``max_iter`` schedule rescaled to ``iters``, kept strictly
    increasing and inside ``(0, iters)`` (what Detectron2's multi-step scheduler accepts)."""
    out: List[int] = []
    for s in steps:
        s = scale_iter(s, max_iter, iters)
        if 0 < s < iters and (not out or s > out[-1]):
            out.append(s)
    return tuple(out)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def check_run_settings(run_dir, settings: dict, run_file: str = "study_run.json",
                       error=SystemExit) -> bool:
    """Resume by fingerprint: ``run_dir/run_file`` remembers the settings of a run folder.

    Writes them when absent (returns False: a new run); returns True when they are the same
    (the run may be resumed or skipped); refuses other settings with ``error`` (a command
    line's ``SystemExit``, a library's ``RuntimeError``) naming the folder.
    """
    run_dir = Path(run_dir)
    path = run_dir / run_file
    settings = to_jsonable(settings)
    if path.exists():
        previous = read_json(path)
        if previous != settings:
            raise error(
                f"{run_dir} holds a run with other settings:\n  {previous}\nnow:\n  {settings}\n"
                "use another --output-dir or delete that directory"
            )
        return True
    write_json(path, settings)
    return False


def progress(study: str, msg: str) -> None:
    """One progress line on stderr, ``[study] msg``."""
    print(f"[{study}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One model to study: a config file, a checkpoint ("" = the config's MODEL.WEIGHTS) and an
    optional label."""

    config: str
    weights: str = ""
    label: Optional[str] = None


def _last_checkpoint(run_dir: Path) -> str:
    marker = run_dir / "last_checkpoint"  # written by Detectron2's Checkpointer
    if marker.is_file():
        name = marker.read_text().strip()
        if name and (run_dir / name).is_file():
            return str(run_dir / name)
    final = run_dir / "model_final.pth"
    if final.is_file():
        return str(final)
    ckpts = sorted(run_dir.glob("model_*.pth"))
    if ckpts:
        return str(ckpts[-1])
    raise FileNotFoundError(f"{run_dir} holds no checkpoint (last_checkpoint, model_*.pth)")


def parse_run_spec(text: str) -> RunSpec:
    """``CONFIG:WEIGHTS[:LABEL]`` or ``RUN_DIR[:LABEL]`` -> :class:`RunSpec`.

    ``WEIGHTS`` may be empty (``CONFIG:``, ``CONFIG::LABEL``): the config's ``MODEL.WEIGHTS``
    is used. A ``RUN_DIR`` is a training output folder with ``config.yaml`` and checkpoints.
    """
    parts = text.split(":")
    if os.path.isdir(parts[0]):
        if len(parts) > 2:
            raise ValueError(f"run {text!r}: expected RUN_DIR[:LABEL]")
        run_dir = Path(parts[0])
        config = run_dir / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"run {text!r}: {config} does not exist")
        label = parts[1] if len(parts) == 2 and parts[1] else None
        return RunSpec(str(config), _last_checkpoint(run_dir), label)
    if len(parts) not in (2, 3):
        raise ValueError(
            f"run {text!r}: expected CONFIG:WEIGHTS[:LABEL] (WEIGHTS may be empty) or RUN_DIR"
        )
    config, weights = parts[0], parts[1]
    label = parts[2] if len(parts) == 3 and parts[2] else None
    if not os.path.isfile(config):
        raise FileNotFoundError(f"run {text!r}: config {config} does not exist")
    # the file, without the checkpointer's query options (e.g. "?allow_partial=True")
    if weights and not os.path.isfile(weights.split("?", 1)[0]):
        raise FileNotFoundError(f"run {text!r}: weights {weights} do not exist")
    return RunSpec(config, weights, label)


def load_cfg(config_file: str, opts: Sequence[str] = (), device: Optional[str] = None):
    """ap_loss_d2's yacs config of ``config_file`` with ``opts`` (``KEY VALUE`` ...) merged,
    validated and frozen. ``device`` overrides ``MODEL.DEVICE``."""
    if not str(config_file).endswith((".yaml", ".yml")):
        raise ValueError(
            f"{config_file}: the studies take yacs (.yaml) configs; for a LazyConfig run use "
            "the config.yaml that train_net.py wrote into its output folder"
        )
    from ..engine import get_ap_loss_cfg, validate_cfg

    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    if device:
        cfg.MODEL.DEVICE = device
    validate_cfg(cfg)
    cfg.freeze()
    return cfg


def cls_loss_label(name: str) -> str:
    """The registry's label of the loss ``name`` (``MODEL.CLS_LOSS.NAME``), ``name`` itself when
    no loss of that name is registered."""
    from ..losses import registry

    return registry.cls_loss_label(name) if name in registry.cls_loss_names() else name


def loss_label(cfg) -> str:
    """The label of the classification loss of ``cfg`` (or the meta-architecture)."""
    name = cfg.MODEL.get("CLS_LOSS", {}).get("NAME", None) if hasattr(cfg, "MODEL") else None
    if name is None:
        return str(cfg.MODEL.META_ARCHITECTURE)
    return cls_loss_label(name)


def build_model_for_run(cfg, weights: str):
    """Detectron2's ``build_model(cfg)`` in eval mode with ``weights`` (or ``cfg.MODEL.WEIGHTS``)
    loaded by ``DetectionCheckpointer``; random initialisation when both are empty."""
    from ap_loss_d2.engine.checkpoint import SafeDetectionCheckpointer as DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(cfg)
    weights = weights or cfg.MODEL.WEIGHTS
    if weights:
        DetectionCheckpointer(model).load(weights)
    else:
        logger.warning("No weights given: the model keeps its random initialisation")
    model.eval()
    return model


def resolve_run(spec: RunSpec, opts: Sequence[str] = (), device: Optional[str] = None):
    """``(cfg, label)`` of a :class:`RunSpec`."""
    cfg = load_cfg(spec.config, opts, device)
    return cfg, spec.label or loss_label(cfg)


def unique_labels(labels: Iterable[str]) -> List[str]:
    """Make labels unique by appending `` (2)``, `` (3)``... to repeats."""
    seen, out = {}, []
    for lab in labels:
        n = seen.get(lab, 0) + 1
        seen[lab] = n
        out.append(lab if n == 1 else f"{lab} ({n})")
    return out


def save_checkpoint(model, path) -> str:
    """Save ``model``'s weights with ``DetectionCheckpointer`` as ``path`` (a ``.pth``)."""
    from ap_loss_d2.engine.checkpoint import SafeDetectionCheckpointer as DetectionCheckpointer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    DetectionCheckpointer(model, save_dir=str(path.parent)).save(path.stem)
    return str(path.parent / (path.stem + ".pth"))


# ---------------------------------------------------------------------------------------------
# Dataset subsets (evaluate on the first N images with the dataset's own evaluator)
# ---------------------------------------------------------------------------------------------
def _reregister(name, loader, metadata):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def dataset_subset(dataset_name: str, max_images: Optional[int], workdir) -> str:
    """Name of a registered dataset holding the first ``max_images`` images of ``dataset_name``
    (``dataset_name`` itself when ``max_images`` is None or not smaller than the dataset).

    The subset keeps the metadata of the original, with the evaluator's ground truth restricted
    to the same images: for ``evaluator_type == "coco"`` a filtered copy of ``json_file`` in
    ``workdir``; for ``"pascal_voc"`` a folder in ``workdir`` with a link to the original
    ``Annotations`` and its own ``ImageSets/Main/<split>.txt``.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if max_images is None:
        return dataset_name
    dicts = DatasetCatalog.get(dataset_name)
    if max_images >= len(dicts):
        return dataset_name
    if max_images < 1:
        raise ValueError(f"max_images={max_images} must be >= 1")
    subset = dicts[:max_images]
    meta = MetadataCatalog.get(dataset_name).as_dict()
    meta.pop("name", None)
    kind = meta.get("evaluator_type")
    name = f"{dataset_name}__first{max_images}"
    workdir = Path(workdir) / name
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "coco":
        # (DatasetCatalog.get above generated an embedded synthetic dataset if needed)
        with open(meta["json_file"]) as f:
            raw = json.load(f)
        ids = {d["image_id"] for d in subset}
        raw["images"] = [im for im in raw["images"] if im["id"] in ids]
        raw["annotations"] = [a for a in raw.get("annotations", []) if a["image_id"] in ids]
        json_file = workdir / "instances.json"
        json_file.write_text(json.dumps(raw))
        meta["json_file"] = str(json_file)
    elif kind == "pascal_voc":
        voc = workdir / "VOC"
        (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        link = voc / "Annotations"
        if not link.exists():
            os.symlink(os.path.abspath(os.path.join(meta["dirname"], "Annotations")), link)
        (voc / "ImageSets" / "Main" / f"{meta['split']}.txt").write_text(
            "".join(f"{d['image_id']}\n" for d in subset)
        )
        meta["dirname"] = str(voc)
    else:
        raise NotImplementedError(
            f"Cannot take a subset of {dataset_name!r} (evaluator_type={kind!r}); "
            "supported: coco, pascal_voc"
        )
    _reregister(name, lambda: subset, meta)
    return name


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def fmt_num(x, digits: int = 1) -> str:
    """``x`` with ``digits`` decimals; "-" for None/NaN; integers as integers."""
    if x is None:
        return "-"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return "-"
    return f"{x:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence],
                   align: Optional[str] = None) -> str:
    """A GitHub markdown table. ``align``: one of "l"/"r"/"c" per column (default: first column
    left, the others right)."""
    if align is None:
        align = "l" + "r" * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |",
             "| " + " | ".join(marks[a] for a in align) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(esc(v) for v in r) + " |")
    return "\n".join(lines)


def to_jsonable(obj):
    """Recursively convert numpy / torch scalars and arrays, paths and tuples for ``json``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if hasattr(obj, "item") and hasattr(obj, "dim") and obj.dim() == 0:  # torch scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path, obj) -> None:
    """Write ``obj`` as strict JSON (NaN/Inf -> null) atomically: a temporary file renamed over
    ``path``, so an interrupted write never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=2) + "\n")
    os.replace(tmp, path)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def read_metrics_json(path) -> Tuple[List[dict], int]:
    """Entries of a Detectron2 ``metrics.json`` (one JSON object a line) and the number of
    unreadable lines skipped (e.g. a line cut by an interrupted run)."""
    entries, skipped = [], 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(entry, dict):
                entries.append(entry)
            else:
                skipped += 1
    return entries, skipped


def not_finite(values: dict, keys: Sequence[str]) -> List[str]:
    """The ``keys`` whose value in ``values`` is missing, not a number, NaN or infinite (an
    evaluation of a model that detects nothing logs AP NaN)."""
    return [k for k in keys if not isinstance(values.get(k), (int, float))
            or not math.isfinite(values[k])]


def last_bbox_metrics(path, metrics: Sequence[str] = ("AP", "AP50", "AP75")) -> dict:
    """The last logged COCO-style bbox metrics of a ``metrics.json``:
    ``{dataset prefix ("" for single-dataset keys): {metric: value, "iteration": it}}``
    (``{}`` when the file is missing or logged no evaluation). ``metrics=None``: every
    ``bbox/*`` key (``AP``, ``AP50``, ..., ``AP-<class>``)."""
    out: dict = {}
    path = Path(path)
    if not path.is_file():
        return out
    for entry in read_metrics_json(path)[0]:
        for key, value in entry.items():
            prefix, sep, name = key.rpartition("bbox/")
            if not sep or (prefix and not prefix.endswith("/")):
                continue
            if metrics is not None and name not in metrics:
                continue
            d = out.setdefault(prefix.rstrip("/"), {})
            d[name] = value
            d["iteration"] = entry.get("iteration")
    return out


#: A yacs config key (``SOLVER.MAX_ITER``, ``SEED``): where the trailing overrides start.
CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*")


#: The form of ``--run`` of the studies that take checkpoints (:func:`parse_run_spec`).
RUN_SPEC = "CONFIG:WEIGHTS[:LABEL] or RUN_DIR[:LABEL]"


class StudyArgumentParser(argparse.ArgumentParser):
    """``argparse`` with Detectron2's trailing config overrides (``opts``, ``argparse.REMAINDER``).

    The overrides start at ``--`` or at the first config key (:data:`CONFIG_KEY`) that is not the
    value of a one-value option, so they may follow a multi-value option
    (``--seeds 0 1 SOLVER.MAX_ITER 10``), which argparse alone would feed them to.
    """

    def _split_overrides(self, argv: List[str]) -> Tuple[List[str], List[str]]:
        one_value = {s for a in self._actions if a.option_strings and a.nargs is None
                     for s in a.option_strings}
        i = 0
        while i < len(argv):
            if argv[i] == "--":
                return argv[:i], argv[i + 1:]
            if argv[i] in one_value:
                i += 2
                continue
            if CONFIG_KEY.fullmatch(argv[i]):
                return argv[:i], argv[i:]
            i += 1
        return argv, []

    def parse_known_args(self, args=None, namespace=None):
        if not any(a.dest == "opts" for a in self._actions):
            return super().parse_known_args(args, namespace)
        argv = list(sys.argv[1:] if args is None else args)
        head, tail = self._split_overrides(argv)
        namespace, extras = super().parse_known_args(head, namespace)
        extras += namespace.opts or []  # before the first config key: not an override
        namespace.opts = tail
        if len(tail) % 2:
            self.error(f"config overrides must be KEY VALUE pairs, got {namespace.opts}")
        return namespace, extras


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; an option's default after its help unless the help names
    one or the default is None / False."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and default is not None and default is not False
                and default is not argparse.SUPPRESS and "default" not in text):
            text += " (default: %(default)s)"
        return text


def study_argument_parser(study: str, description: str, *, config: Optional[str] = None,
                          num_gpus: bool = False, runs: Optional[str] = None, opts: bool = True):
    """The argument parser of every study command (``python -m ap_loss_d2.studies.<study>``).

    Options are spelled out in full (no abbreviations). Every command gets ``--output-dir``
    (default ``output/<study>``); ``config``: a
    ``--config-file`` whose help names that default; ``num_gpus``: ``--num-gpus``, processes per
    launched training run; ``runs``: the checkpoint studies' ``--run`` (repeatable, ``runs`` is its
    form, e.g. :data:`RUN_SPEC`), ``--dataset``, ``--device`` (read by :func:`prepare_runs`); ``opts``: trailing ``KEY VALUE``
    config overrides, after any option or after ``--`` (:class:`StudyArgumentParser`).
    """
    p = StudyArgumentParser(prog=f"python -m ap_loss_d2.studies.{study}", description=description,
                            formatter_class=_HelpFormatter, allow_abbrev=False)
    p.add_argument("--output-dir", default=f"output/{study}", help="folder of the outputs")
    if config is not None:
        p.add_argument("--config-file", default=None, metavar="FILE",
                       help=f"yacs config (default: {config})")
    if num_gpus:
        p.add_argument("--num-gpus", type=int, default=1,
                       help="processes per training run (train_net.py's --num-gpus)")
    if runs:
        p.add_argument("--run", action="append", required=True, metavar=runs,
                       help="a run to study (repeatable)")
        p.add_argument("--dataset", default=None,
                       help="registered test dataset (default: the first run's DATASETS.TEST[0])")
        p.add_argument("--device", default=None, help="override MODEL.DEVICE")
    if opts:
        p.add_argument("opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                       help="config overrides for every run, after the options or after --")
    return p


def prepare_runs(args):
    """Shared set-up of the checkpoint studies from the arguments of
    ``study_argument_parser(..., runs=True)``.

    Returns ``(output dir, run specs, [(cfg, weights)], labels, dataset name)``.
    """
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [parse_run_spec(r) for r in args.run]
    resolved = [resolve_run(s, args.opts, args.device) for s in specs]
    labels = unique_labels([lab for _, lab in resolved])
    dataset = args.dataset or resolved[0][0].DATASETS.TEST[0]
    return out, specs, resolved, labels, dataset


def metrics_by_iteration(path) -> Tuple[dict, int]:
    """``metrics.json`` as ``({iteration: merged entries}, unreadable lines skipped)``; a later
    line for the same iteration wins (e.g. after a resumed run)."""
    entries, skipped = read_metrics_json(path)
    by_iter: dict = {}
    for entry in entries:
        if "iteration" not in entry:
            skipped += 1
            continue
        by_iter.setdefault(int(entry["iteration"]), {}).update(entry)
    return dict(sorted(by_iter.items())), skipped


def write_study_outputs(out: Path, name: str, study: str, report: dict, md_lines, table: str):
    """Write ``<name>.json`` and ``<name>.md`` into ``out``, print the table and say so."""
    write_json(out / f"{name}.json", report)
    (out / f"{name}.md").write_text("\n".join(md_lines) + "\n")
    print(table, flush=True)
    progress(study, f"wrote {out / (name + '.json')}, {out / (name + '.md')}")
