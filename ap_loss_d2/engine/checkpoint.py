"""Detectron2's ``DetectionCheckpointer`` plus weights-only loading, atomic saves, named empty/corrupt/NaN
files, ``--resume`` falling back by stored iteration, and the loss's inference scores saved with the weights
(docs/checkpoints.md)."""
import contextlib
import glob
import io
import logging
import os
import pickle
import re
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from ..losses.base import ClsLoss

__all__ = ["CheckpointCompatibilityError", "CorruptCheckpointError", "NonFiniteCheckpointError",
           "SafeDetectionCheckpointer", "UnsafeCheckpointError"]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A weights file asks to import something other than tensors, arrays and containers."""


class CorruptCheckpointError(ValueError):
    """A weights file is empty, truncated, not a checkpoint, or otherwise unreadable."""


class NonFiniteCheckpointError(ValueError):
    """A weights file holds NaN or Inf weights."""


class CheckpointCompatibilityError(ValueError):
    """A checkpoint does not fit the model it is resumed into, or the scores of its loss."""


_UNREADABLE = (CorruptCheckpointError, UnsafeCheckpointError, NonFiniteCheckpointError)
_ALLOWED = {("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refusing to load {module}.{name} from a weights file: only arrays and containers")


def _unpickle(filename, data, corrupt):
    """The first pickle of ``data``, read by the restricted unpickler: nothing outside ``_ALLOWED`` runs."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{filename}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        error = f"{type(e).__name__}: {e}"
        raise CorruptCheckpointError(f"{filename} {corrupt} (starts with {data[:16]!r}): {error}") from None


def _torch_load(filename, data):
    """A ``torch.save`` file (zip, or the legacy format) with ``weights_only=True``, its errors named."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        if not unsafe:
            raise CorruptCheckpointError(f"{filename} is truncated or corrupt: not a readable weights pickle") from None
        raise UnsafeCheckpointError(
            f"{filename} is not a weights-only checkpoint: it references {', '.join(unsafe)}, which a plain state "
            "dict does not; refusing to load it. Re-save the weights from a trusted copy with "
            "torch.save(model.state_dict(), path) (numpy arrays in Detectron2's model-zoo format: name the file .pkl)."
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as e:
        reason = (str(e).split(". This is an internal")[0].strip().splitlines() or [""])[0]
        raise CorruptCheckpointError(f"{filename} is truncated or corrupt ({len(data)} bytes): {type(e).__name__}: "
                                     f"{reason}. Use an earlier checkpoint or a fresh copy.") from None


def _check_weights(filename, state):
    for name, value in state.items():
        if not isinstance(value, (torch.Tensor, np.ndarray)):
            raise CorruptCheckpointError(
                f"{filename} is not a checkpoint of weights: {name!r} holds a {type(value).__name__}, not a tensor. "
                "Give a state dict (name -> tensor) or Detectron2's {'model': state dict, ...}.")
        value = torch.as_tensor(value)
        bad = int((~torch.isfinite(value)).sum()) if value.is_floating_point() else 0
        if bad:
            raise NonFiniteCheckpointError(f"{filename}: tensor {name!r} holds {bad} NaN/Inf value(s); refusing to "
                                           "load the weights of a diverged run. Use an earlier checkpoint.")


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """Detectron2's ``DetectionCheckpointer`` (same arguments) with the guarantees of the module doc."""

    _heuristics = False
    _resuming = None  # the file being resumed from

    def _cls_loss(self):
        return next((m for m in self.model.modules() if isinstance(m, ClsLoss)), None)

    def save(self, name, **kwargs):
        loss = self._cls_loss()
        if loss is not None:
            kwargs["cls_loss"] = {"name": loss.name, "scores": type(loss).scores.__qualname__}  # its inference scores
        if "://" in self.save_dir or not (self.save_dir and self.save_to_disk):  # not a local folder: Detectron2's save
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict(), **{k: v.state_dict() for k, v in self.checkpointables.items()}}
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {path}")
        os.makedirs(self.save_dir, exist_ok=True)
        try:  # atomic: a failed save (disk full, killed) leaves the previous files as they were
            with open(f"{path}.tmp", "wb") as f:
                torch.save(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(f"{path}.tmp", path)
        finally:
            with contextlib.suppress(OSError):
                os.remove(f"{path}.tmp")
        self.tag_last_checkpoint(f"{name}.pth")

    def load(self, path, *args, **kwargs):
        # loading options in the path, as on Detectron2's main branch, on every version
        query = urlparse(path).query if path and "?" in path and not os.path.isfile(path) else ""
        options = parse_qs(query, keep_blank_values=True)
        heuristics = options.pop("matching_heuristics", ["False"])
        if options or heuristics not in (["True"], ["False"]):
            raise ValueError(f"checkpoint {path!r}: loading option {query!r} is not valid; supported: "
                             "matching_heuristics=True|False")
        self._heuristics = heuristics == ["True"]
        return super().load(path[: -len(query) - 1] if query else path, *args, **kwargs)

    def resume_or_load(self, path, *, resume=True):
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        tag = os.path.join(self.save_dir, "last_checkpoint")
        try:
            name = self.get_checkpoint_file()[len(self.save_dir):].strip(os.sep)
            problem = None if name else f"{tag} is empty (it should hold a checkpoint file name)"
        except UnicodeDecodeError:
            name, problem = "", f"{tag} is not text (it should hold a checkpoint file name)"
        candidate = named = os.path.join(self.save_dir, name) if name else None
        try:  # read before Detectron2's load, which must not fail half-way: its loading state would stay set
            if named is not None and not os.path.isfile(named):
                candidate, problem = None, f"{tag} names {name}, which does not exist in {self.save_dir}"
            elif named is not None:
                self.read(named)
        except _UNREADABLE as e:
            candidate, problem = None, e
        if candidate is None:
            usable = self.usable(exclude=(named,))
            if not usable:
                raise CorruptCheckpointError(
                    f"--resume: no readable checkpoint with finite weights in {self.save_dir} ({problem}). Start "
                    "without --resume (or set another OUTPUT_DIR) to train from MODEL.WEIGHTS.")
            candidate = usable[-1][1]
            self.logger.warning(f"--resume: the latest checkpoint cannot be used ({problem}); resuming from "
                                f"{candidate}, the readable one with finite weights and the highest iteration "
                                "(nothing was deleted)")
        self._resuming = candidate
        try:
            return self.load(candidate)
        finally:
            self._resuming = None

    def _load_model(self, checkpoint):
        recorded, loss = checkpoint.get("cls_loss") or {}, self._cls_loss()
        scores = type(loss).scores.__qualname__ if loss is not None else None
        incompatible = super()._load_model(checkpoint)
        differ = [f"{k}: {tuple(a)} in the checkpoint, {tuple(b)} in the model"
                  for k, a, b in incompatible.incorrect_shapes]
        differ += [f"{k}: only in the model" for k in incompatible.missing_keys] if self._resuming else []
        if self._resuming and differ:
            raise CheckpointCompatibilityError(
                f"--resume: {self._resuming} was saved from another model than the config's ({len(differ)} "
                "tensor(s) differ):\n  " + "\n  ".join(differ[:5]) + "\nResume with its settings (class count, "
                "MODEL.CLS_LOSS.NAME, ...) or use another OUTPUT_DIR; to fine-tune from it, load it as MODEL.WEIGHTS "
                "(train.init_checkpoint).")
        if recorded and scores and recorded.get("scores") != scores and not differ:
            raise CheckpointCompatibilityError(
                f"The checkpoint was trained with MODEL.CLS_LOSS.NAME={recorded.get('name')!r}, whose inference scores "
                f"({recorded.get('scores')}) differ from those of this model's loss {loss.name!r} ({scores}): "
                f"set MODEL.CLS_LOSS.NAME {recorded.get('name')} (LazyConfig: model.cls_loss of that name).")
        backbone = [k for k, _ in self.model.named_parameters() if k.startswith("backbone.")]
        skipped = set(incompatible.missing_keys) | {k for k, _, _ in incompatible.incorrect_shapes}
        if backbone and skipped.issuperset(backbone):
            self.logger.warning(f"0 of {len(backbone)} backbone tensors loaded from the checkpoint: is it converted to "
                                "this model's names (e.g. tools/convert_vgg16_to_d2.py for torchvision's VGG-16)?")
        return incompatible

    def read(self, filename):
        """The checked checkpoint dict of ``filename`` (module doc); runs no code from the file."""
        with PathManager.open(filename, "rb") as f:
            data = f.read()
        if not data:
            raise CorruptCheckpointError(f"{filename} is empty (0 bytes): the save that wrote it did not finish")
        if filename.endswith(".pkl"):
            _unpickle(filename, data, "is not a readable weights pickle (truncated, corrupt, or another kind of file;")
            loaded = super()._load_file(filename)  # Detectron2's model-zoo conversions of the checked pickle
        elif data[:4] != b"PK\x03\x04" and data[:1] != b"\x80":
            raise CorruptCheckpointError(f"{filename} is not a PyTorch checkpoint: it is neither a zip archive "
                                         f"written by torch.save nor a pickle (it starts with {data[:16]!r})")
        else:  # a plain pickle of containers is used as it is; torch's legacy format starts with an int
            corrupt = "is truncated or corrupt: not a readable weights pickle"
            plain = data[:1] == b"\x80" and _unpickle(filename, data, corrupt)
            loaded = plain if isinstance(plain, dict) else _torch_load(filename, data)
            if not isinstance(loaded, dict):
                raise CorruptCheckpointError(f"{filename} holds a {type(loaded).__name__}, not a checkpoint")
            loaded = loaded if "model" in loaded else {"model": loaded}
        _check_weights(filename, loaded["model"])
        return loaded

    def _load_file(self, filename):
        loaded = self.read(filename)
        return {**loaded, "matching_heuristics": True} if self._heuristics else loaded

    def usable(self, exclude=()):
        """``[(iteration, path)]`` of the readable ``.pth`` files of ``save_dir`` with finite weights (``exclude``
        aside), by stored ``iteration`` (-1 if none), then name. Reads every file."""
        found = []
        for path in sorted(set(glob.glob(os.path.join(self.save_dir, "*.pth"))) - set(exclude)):
            try:
                iteration = self.read(path).get("iteration")
                found.append((iteration if isinstance(iteration, int) else -1, path))
            except _UNREADABLE as e:
                logging.getLogger(__name__).warning(f"Skipping checkpoint {path}: {e}")
        return sorted(found)
