"""Helpers shared by the studies: runs to models, training processes, dataset subsets, tables,
the shared argument parser. Conventions (run specs, outputs): docs/studies.md."""
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

logger = logging.getLogger(__name__)

#: The repository root (``configs/``, ``train_net.py``); the studies run from a checkout.
REPO = Path(__file__).resolve().parents[1]


def default_config(relpath: str) -> str:
    return str(REPO / "configs" / relpath)


#: ``python -c`` program: import the modules before ``--``, then run train_net.py with the rest.
_IMPORT_THEN_TRAIN = (
    "import importlib, runpy, sys\n"
    "cut = sys.argv.index('--')\n"
    "for name in sys.argv[2:cut]:\n"
    "    importlib.import_module(name)\n"
    "sys.argv = [sys.argv[1], *sys.argv[cut + 1:]]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def train_net_command(imports: Sequence[str] = ()) -> List[str]:
    """The command that runs ``train_net.py`` in a new process, importing ``imports`` first."""
    if not imports:
        return [sys.executable, str(REPO / "train_net.py")]
    return [sys.executable, "-c", _IMPORT_THEN_TRAIN, str(REPO / "train_net.py"), *imports, "--"]


def train_net_process(run_dir, config, opts: Sequence[str], *, log: str, imports: Sequence[str] = (),
                      num_gpus: int = 1, train_net=None, env=None, echo: bool = False):
    """Train (or resume) one run in a new process into ``run_dir``, output appended to ``run_dir/log``."""
    cmd = [*(train_net_command(imports) if train_net is None else [sys.executable, str(train_net)]),
           *(["--num-gpus", str(num_gpus)] if num_gpus > 1 else []), "--config-file", str(config),
           "--resume", *opts, "OUTPUT_DIR", str(Path(run_dir).resolve())]
    return cmd, run_logged(cmd, Path(run_dir) / log, env=env, echo=echo)


def run_logged(cmd: Sequence[str], log_path, env=None, echo: bool = False) -> int:
    """Run ``cmd`` with its output appended to ``log_path`` (and echoed); returns its exit code."""
    import subprocess

    with open(log_path, "a") as log:
        log.write("$ " + " ".join(map(str, cmd)) + "\n")
        log.flush()
        proc = subprocess.Popen(list(map(str, cmd)), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        try:
            for line in proc.stdout:
                log.write(line)
                if echo:
                    sys.stdout.write(line)
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()


BBOX_METRICS = ("AP", "AP50", "AP75")
#: Messages of a run stopped by NaN/Inf: Detectron2's (with the iteration), the ranking losses'.
DIVERGED_PATTERNS = (re.compile(r"Loss became infinite or NaN at iteration=(\d+)"), re.compile(r"NonFiniteLogitsError"))


def parse_divergence(log: str, last_logged: Optional[int] = None) -> Optional[int]:
    """The iteration at which a run stopped on NaN/Inf, from its output (else the one after the
    ``last_logged`` iteration of its metrics.json); None if it did not."""
    for pattern in DIVERGED_PATTERNS:
        m = pattern.search(log)
        if m:
            return int(m.group(1)) if m.groups() else (-1 if last_logged is None else last_logged) + 1
    return None


def run_status(returncode: int, log: str, metrics: dict, last_logged: Optional[int] = None) -> dict:
    """``ok`` with finite AP / AP50 / AP75, ``diverged`` with the iteration, ``failed`` with a
    ``reason`` (no detections: kept) or the ``log_tail`` (retried on the next call)."""
    diverged_at = parse_divergence(log, last_logged) if returncode != 0 else None
    if diverged_at is not None:
        return {"status": "diverged", "diverged_at": diverged_at}
    if returncode != 0:
        return {"status": "failed", "log_tail": "\n".join(log.splitlines()[-15:])}
    bad = not_finite(metrics, BBOX_METRICS)
    if bad:
        return {"status": "failed", "reason": f"no detections: {', '.join(bad)} "
                                              f"{'is' if len(bad) == 1 else 'are'} NaN or missing"}
    return {"status": "ok", **{m: metrics[m] for m in BBOX_METRICS}}


def sweep_run(study: str, out: Path, config, opts: Sequence[str], settings: dict, *, imports: Sequence[str] = (),
              num_gpus: int = 1, train_net=None, env=None) -> dict:
    """Train (or resume, or skip when finished) one run of a study's set into ``out`` with
    train_net.py, which evaluates it at the end; its record: ``settings``, ``status`` (:func:`run_status`),
    AP / AP50 / AP75 and ``bbox`` (every metric of the first test set). Finished runs are
    recorded in ``out/sweep_run.json``; a run failed for another reason than no detections is not."""
    done = out / "sweep_run.json"
    settings = to_jsonable(settings)
    if done.is_file():
        record = read_json(done)
        if record.get("settings") != settings:
            raise SystemExit(f"[{study}] {out} holds a run with other settings ({record.get('settings')}); "
                             "use another --output-dir")
        progress(study, f"{out.name}: finished earlier ({record['status']})")
        return record
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last_checkpoint"
    progress(study, f"{out.name}: " + (f"resuming from {last.read_text().strip()}" if last.is_file() else "training"))
    cmd, returncode = train_net_process(out, config, opts, log="sweep_log.txt", imports=imports,
                                        num_gpus=num_gpus, train_net=train_net, env=env)
    bbox = next(iter(last_bbox_metrics(out / "metrics.json", None).values()), {})
    bbox.pop("iteration", None)
    logged = list(metrics_by_iteration(out / "metrics.json")[0]) if (out / "metrics.json").is_file() else []
    record = {"settings": settings, "run_dir": str(out), "command": cmd, "returncode": returncode,
              **run_status(returncode, (out / "sweep_log.txt").read_text(errors="replace"), bbox,
                           logged[-1] if logged else None), "bbox": bbox}
    if record["status"] == "failed" and "reason" not in record:
        progress(study, f"{out.name}: FAILED (exit {returncode}); see {out / 'sweep_log.txt'}\n{record['log_tail']}")
        return record  # not marked finished: retried next time
    write_json(done, record)
    status = record["status"]
    progress(study, f"{out.name}: " + (f"ok, AP {record['AP']:.2f}" if status == "ok" else
                                       f"diverged at iteration {record['diverged_at']}" if status == "diverged"
                                       else f"FAILED, {record['reason']}"))
    return record


def import_modules(names: Sequence[str], error=SystemExit) -> None:
    """Import the modules ``names`` (``--import``); a clear ``error`` naming the one that fails."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise error(f"--import {name}: cannot import it ({e}); give a module importable from "
                        "the current folder or PYTHONPATH") from e


def check_loss_names(names: Sequence[str], imports: Sequence[str] = (), error=SystemExit) -> None:
    """Refuse a ``MODEL.CLS_LOSS.NAME`` that no loss registers, naming ``--import``."""
    from ap_loss_d2.losses.registry import cls_loss_names

    known = cls_loss_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        imported = f" (imported: {', '.join(imports)})" if imports else ""
        raise error(f"--losses {' '.join(unknown)}: not a registered classification loss{imported}; "
                    f"registered: {', '.join(known)}. A loss that your own module registers needs "
                    "--import MODULE, which this command and its training processes import first")


def scale_iter(value: int, max_iter: int, iters: int) -> int:
    return int(round(value * iters / max_iter))


def scaled_schedule(steps: Sequence[int], max_iter: int, iters: int) -> Tuple[int, ...]:
    """``SOLVER.STEPS`` rescaled to ``iters``, strictly increasing inside ``(0, iters)``."""
    out: List[int] = []
    for s in steps:
        s = scale_iter(s, max_iter, iters)
        if 0 < s < iters and (not out or s > out[-1]):
            out.append(s)
    return tuple(out)


def read_json(path):
    return json.loads(Path(path).read_text())


def check_run_settings(run_dir, settings: dict, run_file: str = "study_run.json",
                       error=SystemExit) -> bool:
    """False (settings written) for a new run folder, True for the same settings, ``error`` for others."""
    run_dir, settings = Path(run_dir), to_jsonable(settings)
    path = run_dir / run_file
    if path.exists():
        previous = read_json(path)
        if previous != settings:
            raise error(f"{run_dir} holds a run with other settings:\n  {previous}\nnow:\n  {settings}\n"
                        "use another --output-dir or delete that directory")
        return True
    write_json(path, settings)
    return False


def progress(study: str, msg: str) -> None:
    print(f"[{study}] {msg}", file=sys.stderr, flush=True)


@dataclass
class RunSpec:
    """A config file, a checkpoint ("" = the config's MODEL.WEIGHTS) and an optional label."""

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
    """``CONFIG:WEIGHTS[:LABEL]`` (WEIGHTS may be empty) or ``RUN_DIR[:LABEL]`` -> RunSpec."""
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
        raise ValueError(f"run {text!r}: expected CONFIG:WEIGHTS[:LABEL] (WEIGHTS may be empty) or RUN_DIR")
    config, weights = parts[0], parts[1]
    label = parts[2] if len(parts) == 3 and parts[2] else None
    if not os.path.isfile(config):
        raise FileNotFoundError(f"run {text!r}: config {config} does not exist")
    # the file, without the checkpointer's query options (e.g. "?allow_partial=True")
    if weights and not os.path.isfile(weights.split("?", 1)[0]):
        raise FileNotFoundError(f"run {text!r}: weights {weights} do not exist")
    return RunSpec(config, weights, label)


def load_cfg(config_file: str, opts: Sequence[str] = (), device: Optional[str] = None):
    """The validated, frozen yacs config of ``config_file`` with ``opts`` and ``device``."""
    if not str(config_file).endswith((".yaml", ".yml")):
        raise ValueError(f"{config_file}: the studies take yacs (.yaml) configs; for a LazyConfig run use "
                         "the config.yaml that train_net.py wrote into its output folder")
    from ap_loss_d2.engine import get_ap_loss_cfg, validate_cfg

    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    if device:
        cfg.MODEL.DEVICE = device
    validate_cfg(cfg)
    cfg.freeze()
    return cfg


def cls_loss_label(name: str) -> str:
    """The registry's label of the loss ``name``, else ``name``."""
    from ap_loss_d2.losses import registry

    return registry.cls_loss_label(name) if name in registry.cls_loss_names() else name


def loss_label(cfg) -> str:
    """The label of the classification loss of ``cfg`` (or the meta-architecture)."""
    name = cfg.MODEL.get("CLS_LOSS", {}).get("NAME", None)
    return str(cfg.MODEL.META_ARCHITECTURE) if name is None else cls_loss_label(name)


def build_model_for_run(cfg, weights: str):
    """``build_model(cfg)`` in eval mode with ``weights`` (or ``cfg.MODEL.WEIGHTS``) loaded."""
    from ap_loss_d2.engine import SafeDetectionCheckpointer as DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(cfg)
    if weights or cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(weights or cfg.MODEL.WEIGHTS)
    else:
        logger.warning("No weights given: the model keeps its random initialisation")
    return model.eval()


def unique_labels(labels: Iterable[str]) -> List[str]:
    """The labels with `` (2)``, `` (3)``... appended to repeats."""
    seen, out = {}, []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab} ({seen[lab]})")
    return out


def dataset_subset(dataset_name: str, max_images: Optional[int], workdir) -> str:
    """A registered dataset of the first ``max_images`` images of ``dataset_name``, its ground truth too."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if max_images is None:
        return dataset_name
    dicts = DatasetCatalog.get(dataset_name)
    if max_images >= len(dicts):
        return dataset_name
    if max_images < 1:
        raise ValueError(f"max_images={max_images} must be >= 1")
    name = f"{dataset_name}__first{max_images}"
    if name in DatasetCatalog.list():  # the same records, registered by an earlier call
        return name
    subset = dicts[:max_images]
    meta = MetadataCatalog.get(dataset_name).as_dict()
    meta.pop("name", None)
    kind = meta.get("evaluator_type")
    workdir = Path(workdir) / name
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "coco":
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
        (voc / "ImageSets" / "Main" / f"{meta['split']}.txt").write_text("".join(f"{d['image_id']}\n" for d in subset))
        meta["dirname"] = str(voc)
    else:
        raise NotImplementedError(f"Cannot take a subset of {dataset_name!r} (evaluator_type={kind!r}); "
                                  "supported: coco, pascal_voc")
    DatasetCatalog.register(name, lambda: subset)
    MetadataCatalog.get(name).set(**meta)
    return name


def bbox_results(results) -> dict:
    """The ``bbox`` metrics of Detectron2's test results (of the first test set)."""
    if not results:
        return {}
    return dict((results if "bbox" in results else next(iter(results.values()))).get("bbox", {}))


def fmt_num(x, digits: int = 1) -> str:
    """``x`` with ``digits`` decimals; "-" for None/NaN; integers as integers."""
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return "-" if x is None or math.isnan(float(x)) else f"{float(x):.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence],
                   align: Optional[str] = None) -> str:
    """A GitHub markdown table; ``align``: "l"/"r"/"c" per column (default "lrr...")."""
    def line(cells):
        return "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in cells) + " |"

    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    return "\n".join([line(headers), "| " + " | ".join(marks[a] for a in align) + " |", *map(line, rows)])


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
    """Write ``obj`` as strict JSON (NaN/Inf -> null) atomically (a temporary file renamed)."""
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


def subplots(*args, **kwargs):
    """``(figure, axes)`` of ``pyplot().subplots``."""
    return pyplot().subplots(*args, **kwargs)


def save_figure(fig, path, dpi: int = 120) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def read_metrics_json(path) -> Tuple[List[dict], int]:
    """Entries of a Detectron2 ``metrics.json`` and the number of unreadable lines skipped."""
    entries, skipped = [], 0
    for line in filter(str.strip, Path(path).read_text(errors="replace").splitlines()):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            skipped += 1
    return entries, skipped


def not_finite(values: dict, keys: Sequence[str]) -> List[str]:
    """The ``keys`` whose value in ``values`` is missing, not a number, NaN or infinite."""
    return [k for k in keys if not isinstance(values.get(k), (int, float))
            or not math.isfinite(values[k])]


def last_bbox_metrics(path, metrics: Sequence[str] = ("AP", "AP50", "AP75")) -> dict:
    """The last logged ``bbox/<metric>`` values of a ``metrics.json`` per dataset prefix."""
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


CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*")
RUN_SPEC = "CONFIG:WEIGHTS[:LABEL] or RUN_DIR[:LABEL]"


class StudyArgumentParser(argparse.ArgumentParser):
    """``argparse`` with trailing ``KEY VALUE`` config overrides (``opts``), from ``--`` or the first key."""

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
    """An option's default after its help, unless the help names one or it is None / False."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and default is not None and default is not False
                and default is not argparse.SUPPRESS and "default" not in text):
            text += " (default: %(default)s)"
        return text


def study_argument_parser(study: str, description: str, *, config: Optional[str] = None,
                          num_gpus: bool = False, runs: Optional[str] = None, opts: bool = True):
    """The parser of ``python -m studies.<study>`` with the options the study asks for."""
    p = StudyArgumentParser(prog=f"python -m studies.{study}", description=description,
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
    """``(output dir, run specs, [(cfg, label)], labels, dataset name)`` of ``--run`` ..."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [parse_run_spec(r) for r in args.run]
    resolved = [(cfg, s.label or loss_label(cfg)) for s in specs
                for cfg in [load_cfg(s.config, args.opts, args.device)]]
    labels = unique_labels([lab for _, lab in resolved])
    dataset = args.dataset or resolved[0][0].DATASETS.TEST[0]
    return out, specs, resolved, labels, dataset


def metrics_by_iteration(path) -> Tuple[dict, int]:
    """``metrics.json`` as ``({iteration: merged entries}, lines skipped)``; later lines win."""
    entries, skipped = read_metrics_json(path)
    by_iter: dict = {}
    for entry in entries:
        if "iteration" not in entry:
            skipped += 1
            continue
        by_iter.setdefault(int(entry["iteration"]), {}).update(entry)
    return dict(sorted(by_iter.items())), skipped


def write_study_outputs(out: Path, study: str, report: dict, md_lines, table: Optional[str] = None):
    """Write ``<study>.json`` and ``<study>.md``, print ``table`` (default: the markdown), say so."""
    write_json(out / f"{study}.json", report)
    (out / f"{study}.md").write_text("\n".join(md_lines) + "\n")
    print("\n".join(md_lines) if table is None else table, flush=True)
    progress(study, f"wrote {out / (study + '.json')}, {out / (study + '.md')}")


def number(kind, low=None):
    """An argparse type: a ``kind`` number > 0, or >= ``low``."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not math.isfinite(value) or not (value > 0 if low is None else value >= low):
            bound = "> 0" if low is None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number {bound}")
        return value

    parse.__name__ = f"{kind.__name__} {'> 0' if low is None else f'>= {low}'}"
    return parse
