"""A DetectionCheckpointer that loses no work and runs no code from weight files.

* **Atomic saves.** A checkpoint is written to ``<name>.pth.tmp``, flushed to disk, then renamed
  over ``<name>.pth``; ``last_checkpoint`` is replaced the same way, after the checkpoint. A
  process killed while saving leaves the previous good checkpoint and the previous
  ``last_checkpoint`` untouched (at worst a stray ``.tmp`` file).
* **No code execution on load.** ``.pth``/``.pyth`` files are read with
  ``torch.load(weights_only=True)`` (tensors, numbers, strings and containers only).
  ``.pkl`` files (Detectron2 / Caffe2 model-zoo format) are Python pickles, which cannot be
  read with ``weights_only``: they are first checked with a restricted unpickler that admits
  only numpy arrays and builtin containers, and rejected otherwise, before Detectron2's own
  reader converts them.
* **Loading options as on Detectron2's main branch.** Where Detectron2's ``DetectionCheckpointer``
  parses options from the path (``model.pth?matching_heuristics=True``; main after v0.6), they
  are honoured the same way: ``matching_heuristics=True`` loads by Detectron2's name-matching
  heuristics. Unlike Detectron2, an unknown option or value is rejected for every file type
  (Detectron2 ignores options on ``.pkl``/``.pyth`` files; here ``matching_heuristics=True``
  applies to them too). On a Detectron2 without options (v0.6), a path with options is
  rejected with a ValueError instead of a "file not found".
* **Unreadable files are named.** An empty, text, truncated or otherwise corrupt file raises
  :class:`CorruptCheckpointError` naming the file and what is wrong with it. A ``.pth`` that is a
  plain pickle of numpy arrays (model-zoo content under another suffix) loads like a ``.pkl``.
* **Health and settings recorded at save.** Each save stores, in the checkpoint (key
  ``"ap_loss_d2"``) and in the sidecar index ``checkpoint_health.json`` of the output folder,
  whether all weights were finite, their largest magnitude, and the settings that make the
  checkpoint loadable (:func:`model_settings`: meta-architecture, classification loss, number
  of classes, classifier outputs). :func:`last_healthy_checkpoint` reads the index only (cheap):
  the newest checkpoint whose weights are finite and not exploded (largest parameter magnitude
  at most :data:`EXPLODED_GROWTH` times that of the weights training started from, and below
  :data:`EXPLODED_WEIGHT`).
* **Layout mismatches are errors.** Loading a checkpoint whose recorded classifier differs from
  the model's (K vs K+1 logits, another number of classes, a loss scored otherwise at inference:
  softmax ``ce``/``ce_ohem`` vs sigmoid ``ap``/``auc``/``focal``) raises
  :class:`CheckpointCompatibilityError` naming both, unless the path asks for partial loading:
  ``model.pth?allow_partial=True`` (then Detectron2's usual rules apply: tensors whose shapes
  differ are skipped with a warning). Files without recorded settings (ImageNet / model-zoo
  weights, checkpoints of other tools) load as in Detectron2.
* **Resume falls back.** ``resume_or_load(..., resume=True)`` tries ``last_checkpoint``'s file
  first, then the other ``.pth`` files of the folder, newest first, skipping (with a warning
  naming the file and the reason) unreadable files and files whose weights were recorded
  non-finite or exploded. Nothing is deleted or rewritten. After resuming a training run,
  ``metrics.json`` records past the resumed iteration are removed (a copy of the full file is
  kept first, see :func:`truncate_metrics_after`), so no iteration is logged twice.
"""
import glob
import io
import json
import logging
import math
import os
import pickle
import shutil
import zipfile
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = [
    "CheckpointCompatibilityError",
    "CorruptCheckpointError",
    "EXPLODED_GROWTH",
    "EXPLODED_WEIGHT",
    "HEALTH_INDEX",
    "SafeDetectionCheckpointer",
    "UnsafeCheckpointError",
    "last_healthy_checkpoint",
    "divergence_message",
    "keep_config_lr",
    "load_options_supported",
    "model_settings",
    "truncate_metrics_after",
]

logger = logging.getLogger(__name__)

# Options of ``path?key=value`` and their valid values (as parsed by Detectron2 main's
# DetectionCheckpointer.load / _load_file), plus ours (handled here on every Detectron2).
LOAD_OPTIONS = {"matching_heuristics": ("True", "False"), "allow_partial": ("True", "False")}
OWN_OPTIONS = ("allow_partial",)

#: A checkpoint whose largest parameter magnitude exceeds this counts as diverged ("exploded"):
#: trained detectors stay orders of magnitude below it.
EXPLODED_WEIGHT = 1e6
#: ... or grew more than this factor over the largest parameter magnitude of the weights training
#: started from (recorded when ``resume_or_load`` loads ``MODEL.WEIGHTS``; floor 1.0): a jump by
#: an order of magnitude is the signature of a diverging run.
EXPLODED_GROWTH = 10.0
_START = "__start__"  # index entry of the weights training started from
#: Sidecar index of the checkpoints' health and settings, in the checkpoint folder.
HEALTH_INDEX = "checkpoint_health.json"
_META_KEY = "ap_loss_d2"  # key of the recorded health and settings inside a checkpoint


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A weights file asks to import something other than numpy arrays and containers."""


class CorruptCheckpointError(ValueError):
    """A weights file is empty, truncated, not a checkpoint, or otherwise unreadable."""


class CheckpointCompatibilityError(ValueError):
    """A checkpoint's recorded settings differ from the model it is loaded into."""


# (module, name) pairs a model-zoo .pkl may reference
_PKL_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PKL_ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load {module}.{name} from a weights file: only numpy arrays and "
            f"builtin containers are allowed"
        )


def _is_local(path: str) -> bool:
    return "://" not in path


def load_options_supported() -> bool:
    """Whether this Detectron2's ``DetectionCheckpointer.load`` parses ``path?key=value`` options
    (feature-detected: main keeps the parsed path in ``_parsed_url_during_load`` while loading)."""
    return hasattr(DetectionCheckpointer(torch.nn.Module()), "_parsed_url_during_load")


def _parse_load_options(url: str) -> dict:
    """``{"matching_heuristics": bool, "allow_partial": bool}`` (those present) from the query of
    ``url``; ValueError on anything else."""
    queries = parse_qs(urlparse(url).query, keep_blank_values=True)
    unknown = sorted(set(queries) - set(LOAD_OPTIONS))
    if unknown:
        raise ValueError(
            f"checkpoint {url!r}: unknown loading option(s) {', '.join(unknown)}; supported: "
            + ", ".join(f"{k}={'|'.join(v)}" for k, v in LOAD_OPTIONS.items())
        )
    options = {}
    for key, values in queries.items():
        if len(values) != 1 or values[0] not in LOAD_OPTIONS[key]:
            raise ValueError(
                f"checkpoint {url!r}: {key}={'&'.join(values)!r} is not valid; "
                f"use {key}={' or '.join(LOAD_OPTIONS[key])}"
            )
        options[key] = values[0] == "True"
    return options


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel


def model_settings(model) -> dict:
    """The settings a checkpoint of ``model`` needs to load meaningfully: ``arch`` (class name),
    ``cls_loss`` (``MODEL.CLS_LOSS.NAME`` of ap_loss_d2 models; ``"default"`` for stock
    Detectron2 heads), ``num_classes`` and ``cls_logits`` (outputs of the classifier per anchor
    or RoI: K for sigmoid/ranking losses, K + 1 for softmax with a background column) and
    ``scores`` (how logits become class scores at inference: ``"sigmoid"`` or ``"softmax"``).
    Checkpoints load across losses that agree on the last three (e.g. ``ap``, ``auc``,
    ``focal`` RetinaNets); see :meth:`SafeDetectionCheckpointer._load_model`.
    Empty for models without a RetinaNet head or an R-CNN box predictor."""
    m = _unwrap(model)
    settings = {"arch": type(m).__name__}
    head = getattr(m, "head", None)
    predictor = getattr(getattr(m, "roi_heads", None), "box_predictor", None)
    if head is not None and hasattr(head, "cls_score") and hasattr(m, "num_classes"):
        anchors = getattr(getattr(m, "anchor_generator", None), "num_cell_anchors", None)
        out = head.cls_score.out_channels
        if anchors:
            out //= anchors[0]
        loss = getattr(getattr(m, "cls_loss", None), "name", "default")
        settings.update(
            cls_loss=loss,
            num_classes=int(m.num_classes),
            cls_logits=int(out),
            scores="softmax" if loss == "ce_ohem" else "sigmoid",
        )
    elif predictor is not None and hasattr(predictor, "cls_score"):
        logits = int(predictor.cls_score.out_features)
        settings.update(
            cls_loss=getattr(getattr(predictor, "cls_loss", None), "name", "default"),
            num_classes=int(predictor.num_classes),
            cls_logits=logits,
            scores="softmax" if logits == int(predictor.num_classes) + 1 else "sigmoid",
        )
    else:
        return {}
    return settings


def _describe(settings: dict) -> str:
    return (
        f"{settings.get('arch')} with cls_loss={settings.get('cls_loss')!r}, "
        f"num_classes={settings.get('num_classes')}, {settings.get('cls_logits')} classifier "
        f"logits per anchor/RoI scored by {settings.get('scores', '?')}"
    )


def _weights_health(model) -> dict:
    """``finite``: every floating-point tensor of the state dict is finite; ``max_abs``: the
    largest parameter magnitude (one reduction per tensor, cheap next to writing the file)."""
    finite, max_abs = True, 0.0
    params = {id(p) for p in model.parameters()}
    for t in list(model.parameters()) + [b for b in model.buffers() if id(b) not in params]:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        t = t.detach()
        if not bool(torch.isfinite(t).all()):
            finite = False
            break
    if finite:
        for p in model.parameters():
            if p.is_floating_point() and p.numel():
                max_abs = max(max_abs, float(p.detach().abs().max()))
    return {"finite": finite, "max_abs": max_abs if finite else float("inf")}


def _limit(start) -> float:
    """Largest healthy parameter magnitude, given the index entry of the starting weights."""
    if isinstance(start, dict) and isinstance(start.get("max_abs"), (int, float)):
        return min(EXPLODED_WEIGHT, EXPLODED_GROWTH * max(1.0, start["max_abs"]))
    return EXPLODED_WEIGHT


def _healthy(record: dict, start=None) -> bool:
    max_abs = record.get("max_abs")
    return bool(record.get("finite")) and max_abs is not None and max_abs <= _limit(start)


def _unhealthy_reason(record: dict, start=None) -> str:
    if not record.get("finite"):
        return "its weights held NaN or Inf when it was saved"
    return (
        f"its weights had exploded when it was saved (largest |weight| {record['max_abs']:.3g}, "
        f"above {_limit(start):.3g})"
    )


def _read_index(save_dir: str) -> dict:
    path = os.path.join(save_dir, HEALTH_INDEX)
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("Ignoring unreadable checkpoint health index %s: %s", path, e)
        return {}
    return index if isinstance(index, dict) else {}


def last_healthy_checkpoint(save_dir: str):
    """Path of the newest checkpoint in ``save_dir`` recorded (at save time, in
    ``checkpoint_health.json``) with finite, not exploded weights, that still exists; None if there is none. Does not open any checkpoint."""
    index = _read_index(save_dir)
    start = index.get(_START)
    best = None
    for name, rec in index.items():
        path = os.path.join(save_dir, name)
        if name != _START and isinstance(rec, dict) and _healthy(rec, start) and os.path.isfile(path):
            key = (rec.get("iteration", -1), rec.get("saved_at", 0))
            if best is None or key > best[0]:
                best = (key, path)
    return best[1] if best else None


def divergence_message(iteration: int, save_dir: str, cause, lr_key: str = "SOLVER.BASE_LR") -> str:
    """The message that stops a diverged run: the iteration, and the newest checkpoint recorded
    healthy (:func:`last_healthy_checkpoint`), which ``--resume`` starts from."""
    good = last_healthy_checkpoint(save_dir) if save_dir else None
    if good is None:
        advice = (
            "no checkpoint with finite, non-exploded weights was saved yet: start again without "
            f"--resume, e.g. with a lower {lr_key} or a longer warm-up"
        )
    else:
        advice = (
            f"the last good checkpoint (weights finite and not exploded, checked when saved) is "
            f"{good}; --resume starts from it, skipping later ones (continue with --resume, e.g. "
            f"with a lower {lr_key})"
        )
    return (
        f"Training stopped at iteration {iteration}: NaN or Inf in the model's outputs or losses. "
        f"Nothing was saved for this iteration; {advice}.\nCause: {cause}"
    )


def keep_config_lr(optimizer, scheduler, config_base_lrs) -> bool:
    """After resuming, use the base learning rates of the current config (``config_base_lrs``,
    the scheduler's ``base_lrs`` before loading) instead of the checkpoint's, so that resuming
    with a lower ``SOLVER.BASE_LR`` takes effect (Detectron2 restores the old one). Returns
    whether anything changed."""
    loaded = list(getattr(scheduler, "base_lrs", []))
    if not loaded or len(loaded) != len(config_base_lrs) or loaded == list(config_base_lrs):
        return False
    scheduler.base_lrs = list(config_base_lrs)
    lrs = scheduler.get_lr() if hasattr(scheduler, "_multiplier") else None
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = config_base_lrs[i]
        group["lr"] = lrs[i] if lrs else group["lr"] * config_base_lrs[i] / loaded[i]
    logger.warning(
        "Resumed with the config's base learning rate(s) %s instead of the checkpoint's %s",
        sorted(set(config_base_lrs)), sorted(set(loaded)),
    )
    return True


def _metrics_iteration(line: str):
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec.get("iteration") if isinstance(rec, dict) else None


def truncate_metrics_after(output_dir: str, start_iter: int):
    """Remove the records of ``output_dir/metrics.json`` with ``iteration >= start_iter`` (they
    are logged again by the resumed run), after copying the whole file to
    ``metrics.json.before-resume-at-<start_iter>[.N]``. Lines that are not JSON records (a line
    cut by a kill) are dropped from ``metrics.json`` too (the copy keeps them). Rewrites in
    place, so a writer that already holds the file open in append mode keeps appending to it.
    Returns the path of the copy, or None when nothing had to be removed."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    keep = []
    for line in lines:
        it = _metrics_iteration(line)
        if it is not None and it < start_iter:
            keep.append(line if line.endswith("\n") else line + "\n")
        elif it is None and not line.strip():
            continue
    if len(keep) == len(lines) and all(a == b for a, b in zip(keep, lines)):
        return None
    backup = f"{path}.before-resume-at-{start_iter}"
    n = 1
    while os.path.exists(backup):
        backup = f"{path}.before-resume-at-{start_iter}.{n}"
        n += 1
    shutil.copy2(path, backup)
    with open(path, "r+") as f:
        f.seek(0)
        f.write("".join(keep))
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
    logger.warning(
        "Resuming at iteration %d: removed %d record(s) at or past it from %s (logged again by "
        "this run); the file as it was is kept in %s",
        start_iter, len(lines) - len(keep), path, backup,
    )
    return backup


def _torch_reason(e: Exception) -> str:
    """PyTorch's error without its advice to load with ``weights_only=False``."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    text = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return text.split(". This is an internal")[0][:300]


_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.dtypes")


def _numpy_only(names) -> bool:
    for full in names:
        module, _, name = full.rpartition(".")
        if (module, name) in _PKL_ALLOWED or module == "numpy.dtypes":
            continue
        return False
    return True


def _numpy_globals(names):
    """The numpy objects named by ``names`` (all pass :func:`_numpy_only`) and numpy's dtype
    classes, to allow-list for ``torch.load(weights_only=True)``."""
    import importlib

    import numpy as np

    allowed = [getattr(importlib.import_module(m), n) for m, _, n in (x.rpartition(".") for x in names)]
    # the class of each dtype instance (numpy.dtype[float32], numpy.dtypes.Float32DType, ...)
    allowed += sorted({type(np.dtype(t)) for t in set(np.sctypeDict.values())}, key=str)
    return allowed


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """Drop-in replacement of Detectron2's ``DetectionCheckpointer`` (same arguments)."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk or not _is_local(self.save_dir):
            return super().save(name, **kwargs)
        health = _weights_health(_unwrap(self.model))
        settings = model_settings(self.model)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        data[_META_KEY] = {"settings": settings, **health}
        basename = f"{name}.pth"
        os.makedirs(self.save_dir, exist_ok=True)
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        start = _read_index(self.save_dir).get(_START)
        if not _healthy(health, start):
            self.logger.warning(f"{path}: {_unhealthy_reason(health, start)}; --resume will skip it")
        _atomic_write(path, lambda f: torch.save(data, f))
        self._record_health(basename, kwargs.get("iteration"), health, settings)
        self.tag_last_checkpoint(basename)

    def _record_health(self, basename, iteration, health, settings) -> None:
        index = _read_index(self.save_dir)
        index[basename] = {
            "iteration": iteration if isinstance(iteration, int) else -1,
            "saved_at": os.path.getmtime(os.path.join(self.save_dir, basename)),
            "finite": health["finite"],
            "max_abs": health["max_abs"] if math.isfinite(health["max_abs"]) else None,
            "settings": settings,
        }
        path = os.path.join(self.save_dir, HEALTH_INDEX)
        _atomic_write(path, lambda f: f.write(json.dumps(index, indent=1, sort_keys=True).encode()))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self.save_dir or not _is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    # ------------------------------------------------------------------------------ resume

    def _last_checkpoint_target(self):
        """(path or None, problem or None) from the ``last_checkpoint`` file."""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        try:
            with open(tag, "rb") as f:
                raw = f.read()
        except OSError as e:
            return None, f"{tag} cannot be read ({e})"
        try:
            name = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, f"{tag} is not text (it should hold a checkpoint file name)"
        if not name:
            return None, f"{tag} is empty (it should hold a checkpoint file name)"
        if os.sep in name or name in (".", ".."):
            return None, f"{tag} holds {name!r}, not a checkpoint file name"
        path = os.path.join(self.save_dir, name)
        if not os.path.isfile(path):
            return None, f"{tag} names {name}, which does not exist in {self.save_dir}"
        return path, None

    def _resume_candidates(self):
        first, problem = self._last_checkpoint_target()
        others = [p for p in glob.glob(os.path.join(self.save_dir, "*.pth")) if p != first]
        others.sort(key=lambda p: (os.path.getmtime(p), p), reverse=True)
        return ([first] if first else []), others, problem

    def _record_start(self) -> None:
        """Record the magnitude of the weights training starts from (growth reference)."""
        if not (self.save_dir and self.save_to_disk and _is_local(self.save_dir)) or not comm.is_main_process():
            return
        if "trainer" not in self.checkpointables:
            return  # not a training run (evaluation)
        os.makedirs(self.save_dir, exist_ok=True)
        index = _read_index(self.save_dir)
        index[_START] = _weights_health(_unwrap(self.model))
        path = os.path.join(self.save_dir, HEALTH_INDEX)
        _atomic_write(path, lambda f: f.write(json.dumps(index, indent=1, sort_keys=True).encode()))

    def resume_or_load(self, path: str, *, resume: bool = True):
        if not (resume and self.save_dir and _is_local(self.save_dir) and self.has_checkpoint()):
            ret = super().resume_or_load(path, resume=resume)
            self._record_start()
            return ret
        first, others, problem = self._resume_candidates()
        if problem:
            self.logger.warning(f"--resume: {problem}; trying the other checkpoints in {self.save_dir}")
        index = _read_index(self.save_dir)
        start = index.get(_START)
        skipped = []
        for candidate in first + others:
            name = os.path.basename(candidate)
            record = index.get(name)
            if isinstance(record, dict) and not _healthy(record, start):
                skipped.append(f"{name}: {_unhealthy_reason(record, start)}")
                continue
            try:
                checkpoint = self._load_file(candidate)
            except (CorruptCheckpointError, UnsafeCheckpointError) as e:
                skipped.append(str(e))
                continue
            if skipped or problem:
                self.logger.warning(
                    "--resume: resuming from %s instead of the latest checkpoint; skipped (kept "
                    "on disk, nothing deleted):\n  %s",
                    candidate,
                    "\n  ".join(skipped) or problem,
                )
            return self._apply_loaded(candidate, checkpoint)
        raise CorruptCheckpointError(
            f"--resume: no usable checkpoint in {self.save_dir}"
            + (f" ({problem})" if problem else "")
            + ("; tried:\n  " + "\n  ".join(skipped) if skipped else "")
            + "\nStart without --resume (or set another OUTPUT_DIR) to train from MODEL.WEIGHTS."
        )

    def _apply_loaded(self, path, checkpoint):
        """fvcore's ``Checkpointer.load`` after ``_load_file``: model, then all checkpointables."""
        self.logger.info(f"[Checkpointer] Loading from {path} ...")
        incompatible = self._load_model(checkpoint)
        if incompatible is not None:
            self._log_incompatible_keys(incompatible)
        for key in self.checkpointables:
            if key in checkpoint:
                self.logger.info(f"Loading {key} from {path} ...")
                self.checkpointables[key].load_state_dict(checkpoint.pop(key))
        if "trainer" in self.checkpointables and comm.is_main_process():
            iteration = checkpoint.get("iteration")
            if isinstance(iteration, int):
                truncate_metrics_after(self.save_dir, iteration + 1)
        return checkpoint

    # ------------------------------------------------------------------------------ load

    def load(self, path, *args, **kwargs):
        self._allow_partial = False
        if path and _is_local(path) and urlparse(path).query and not os.path.isfile(path):
            path = self._take_own_options(path)
        if (
            path
            and _is_local(path)
            and urlparse(path).query
            and not os.path.isfile(path)
            and not hasattr(self, "_parsed_url_during_load")
        ):
            raise ValueError(
                f"checkpoint {path!r}: loading options (?{urlparse(path).query}) need a Detectron2 "
                "whose DetectionCheckpointer parses them (the main branch after v0.6); this "
                "Detectron2 does not. Install Detectron2 from its main branch, or load the file "
                "without options."
            )
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._allow_partial = False

    def _take_own_options(self, path: str) -> str:
        """Handle and remove ``allow_partial`` from the query of ``path`` (any Detectron2)."""
        parsed = urlparse(path)
        queries = parse_qs(parsed.query, keep_blank_values=True)
        own = {k: v for k, v in queries.items() if k in OWN_OPTIONS}
        if not own:
            return path
        for key, values in own.items():
            if len(values) != 1 or values[0] not in LOAD_OPTIONS[key]:
                raise ValueError(
                    f"checkpoint {path!r}: {key}={'&'.join(values)!r} is not valid; "
                    f"use {key}={' or '.join(LOAD_OPTIONS[key])}"
                )
        self._allow_partial = own.get("allow_partial", ["False"])[0] == "True"
        rest = [(k, v) for k, vs in queries.items() if k not in OWN_OPTIONS for v in vs]
        return urlunparse(parsed._replace(query=urlencode(rest)))

    def _load_model(self, checkpoint):
        meta = checkpoint.pop(_META_KEY, None)
        saved = meta.get("settings") if isinstance(meta, dict) else None
        current = model_settings(self.model)
        if saved and current:
            # the classifier's meaning: the losses themselves may differ (ap <-> auc <-> focal)
            keys = ("num_classes", "cls_logits", "scores")
            differs = [k for k in keys if saved.get(k) != current.get(k)]
            if differs and not getattr(self, "_allow_partial", False):
                raise CheckpointCompatibilityError(
                    f"checkpoint was saved from {_describe(saved)}, but the model is "
                    f"{_describe(current)} (differs in: {', '.join(differs)}). Use the settings "
                    "it was trained with (e.g. MODEL.CLS_LOSS.NAME / MODEL.*.NUM_CLASSES), or, to "
                    "load only the tensors whose shapes match (fine-tuning), append "
                    "'?allow_partial=True' to the checkpoint path."
                )
        return super()._load_model(checkpoint)

    def _load_file(self, filename: str):
        parsed = getattr(self, "_parsed_url_during_load", None)  # set by main's load()
        options = _parse_load_options(parsed.geturl()) if parsed is not None and parsed.query else {}
        loaded = self._load_file_safely(filename)
        if options.get("matching_heuristics", False):
            loaded["matching_heuristics"] = True  # as main's DetectionCheckpointer._load_file
        if options.get("allow_partial", False):
            self._allow_partial = True
        return loaded

    def _load_file_safely(self, filename: str):
        with PathManager.open(filename, "rb") as f:
            data = f.read()
        if not data:
            raise CorruptCheckpointError(f"{filename} is empty (0 bytes): the save that wrote it did not finish")
        if filename.endswith(".pkl"):
            _check_pickle(filename, data)
            return super()._load_file(filename)  # now known to hold only arrays
        loaded = _load_torch_bytes(filename, data)
        if not isinstance(loaded, dict):
            raise CorruptCheckpointError(
                f"{filename} holds a {type(loaded).__name__}, not a checkpoint (a dict of weights)"
            )
        if filename.endswith(".pyth"):
            model_state = {
                k: v for k, v in loaded["model_state"].items() if not k.endswith("num_batches_tracked")
            }
            return {"model": model_state, "__author__": "pycls", "matching_heuristics": True}
        return loaded if "model" in loaded else {"model": loaded}


def _check_pickle(filename: str, data: bytes) -> None:
    """Raise UnsafeCheckpointError / CorruptCheckpointError unless ``data`` is a pickle of numpy
    arrays and builtin containers only."""
    try:
        _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{filename}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(
            f"{filename} is not a readable weights pickle (truncated, corrupt, or another kind "
            f"of file; starts with {data[:16]!r}): {type(e).__name__}: {e}"
        ) from None


def _load_torch_bytes(filename: str, data: bytes):
    zipped = data[:4] == b"PK\x03\x04"
    if not zipped and data[:1] != b"\x80":
        raise CorruptCheckpointError(
            f"{filename} is not a PyTorch checkpoint: it is neither a zip archive written by "
            f"torch.save nor a pickle (it starts with {data[:16]!r})"
        )
    if zipped:
        try:
            zipfile.ZipFile(io.BytesIO(data)).close()
        except zipfile.BadZipFile as e:
            raise CorruptCheckpointError(
                f"{filename} is truncated or corrupt ({len(data)} bytes; its zip archive cannot "
                f"be read: {e}). Use an earlier checkpoint."
            ) from None
    try:
        return torch.load(io.BytesIO(data), map_location=torch.device("cpu"), weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _torch_reason(e)
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as e:
        raise CorruptCheckpointError(
            f"{filename} is truncated or corrupt ({len(data)} bytes): {type(e).__name__}: "
            f"{_torch_reason(e)}"
        ) from None
    # Not weights-only: numpy arrays (allowed), code (refused), or garbage (corrupt).
    if zipped:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
        except (RuntimeError, pickle.UnpicklingError, ValueError) as e:
            raise CorruptCheckpointError(f"{filename} is corrupt: {_torch_reason(e)}") from None
        if names and _numpy_only(names):
            try:
                with torch.serialization.safe_globals(_numpy_globals(names)):
                    return torch.load(io.BytesIO(data), map_location=torch.device("cpu"), weights_only=True)
            except pickle.UnpicklingError as e:
                reason = _torch_reason(e)
                names = []  # numpy content PyTorch still refuses: report below
        if names:
            raise UnsafeCheckpointError(
                f"{filename} is not a weights-only checkpoint: it references "
                f"{', '.join(n for n in names if not _numpy_only([n]))}, which would run code when "
                "loaded; refusing to load it. Re-save the weights from a trusted copy with "
                "torch.save(model.state_dict(), path)."
            )
        raise CorruptCheckpointError(f"{filename} is corrupt: {reason}")
    _check_pickle(filename, data)  # a plain pickle: allowed when it holds only numpy arrays
    with open(filename, "rb") as f:
        return pickle.load(f, encoding="latin1")  # checked above: arrays and containers only


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
