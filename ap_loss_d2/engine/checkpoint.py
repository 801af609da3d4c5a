"""A ``DetectionCheckpointer`` that loads weights only and keeps checkpoints usable (docs/checkpoints.md)."""
import glob
import io
import os
import pickle
import re

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from ..losses.base import ClsLoss


class CorruptCheckpointError(ValueError):
    """A weights file is empty, truncated, not a checkpoint, unsafe or non-finite (the subclasses)."""


class UnsafeCheckpointError(CorruptCheckpointError, pickle.UnpicklingError):
    """A weights file asks to import something other than tensors, arrays and containers."""


class NonFiniteCheckpointError(CorruptCheckpointError):
    """A weights file holds NaN or Inf weights."""


class CheckpointCompatibilityError(ValueError):
    """A checkpoint does not fit the model it is resumed into, or the scores of its loss."""


_ALLOWED = {("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refusing to load {module}.{name} from a weights file: only arrays and containers")


def _unpickle(filename, data):
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{filename}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"{filename} is not a readable weights pickle (truncated, corrupt, or another "
                                     f"kind of file; it starts with {data[:16]!r}): {type(e).__name__}: {e}") from None


def _torch_load(filename, data):
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        if not unsafe:
            raise CorruptCheckpointError(f"{filename} is a truncated or corrupt weights pickle") from None
        raise UnsafeCheckpointError(f"{filename} is not a weights-only checkpoint: it references {', '.join(unsafe)}; "
                                    "refusing to load it. Re-save its weights from a trusted copy with torch.save("
                                    "model.state_dict(), path) (model-zoo numpy arrays: name the file .pkl).") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as e:
        reason = (str(e).split(". This is an internal")[0].strip().splitlines() or [""])[0]
        raise CorruptCheckpointError(f"{filename} is truncated or corrupt ({len(data)} bytes): {type(e).__name__}: "
                                     f"{reason}. Use an earlier checkpoint or a fresh copy.") from None


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """Detectron2's ``DetectionCheckpointer`` (same arguments) with weights-only loading, atomic saves, named corrupt
    files, ``--resume`` falling back by stored iteration, and the loss's inference scores saved with the weights."""

    _resuming = None  # the file being resumed from

    def _loss_record(self):
        loss = next((m for m in self.model.modules() if isinstance(m, ClsLoss)), None)
        return loss and {"name": loss.name, "scores": type(loss).scores.__qualname__}

    def save(self, name, **kwargs):
        kwargs = {"cls_loss": record, **kwargs} if (record := self._loss_record()) else kwargs
        if "://" in self.save_dir or not (self.save_dir and self.save_to_disk):  # not a local folder: Detectron2's save
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict(), **{k: v.state_dict() for k, v in self.checkpointables.items()}}
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {path}")
        os.makedirs(self.save_dir, exist_ok=True)
        try:  # atomic: a failed save (disk full, killed) leaves the previous files as they were
            with open(f"{path}.tmp", "wb") as f:
                torch.save({**data, **kwargs}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(f"{path}.tmp", path)
        finally:
            if os.path.exists(f"{path}.tmp"):
                os.remove(f"{path}.tmp")
        self.tag_last_checkpoint(f"{name}.pth")

    def load(self, path, *args, **kwargs):
        # loading options in the path, as on Detectron2's main branch, on every version
        path, _, query = path.partition("?") if path and not os.path.isfile(path) else (path, "", "")
        if query not in ("", "matching_heuristics=True", "matching_heuristics=False"):
            raise ValueError(f"checkpoint {f'{path}?{query}'!r}: loading option {query!r} is not valid; supported: "
                             "matching_heuristics=True|False")
        self._heuristics = query == "matching_heuristics=True"
        return super().load(path, *args, **kwargs)

    def resume_or_load(self, path, *, resume=True):
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        tag = os.path.join(self.save_dir, "last_checkpoint")
        try:
            name = self.get_checkpoint_file()[len(self.save_dir):].strip(os.sep)
            problem = f"{tag} is empty (it should hold a checkpoint file name)"
        except UnicodeDecodeError:
            name, problem = "", f"{tag} is not text (it should hold a checkpoint file name)"
        candidate = os.path.join(self.save_dir, name)
        if name and not os.path.isfile(candidate):
            problem = f"{tag} names {name}, which does not exist in {self.save_dir}"
        elif name:  # read before Detectron2's load, which must not fail half-way: its loading state would stay set
            problem = self._iteration(candidate)
        if not isinstance(problem, int):  # the readable one with finite weights and the highest stored iteration
            others = sorted(set(glob.glob(os.path.join(self.save_dir, "*.pth"))) - {candidate})
            usable = sorted((i, p) for p, i in zip(others, map(self._iteration, others)) if isinstance(i, int))
            if not usable:
                raise CorruptCheckpointError(f"--resume: no readable checkpoint with finite weights in {self.save_dir} "
                                             f"({problem}); start without --resume to train from MODEL.WEIGHTS")
            candidate = usable[-1][1]
            self.logger.warning(f"--resume: the latest checkpoint cannot be used ({problem}); resuming from "
                                f"{candidate}, the readable, finite one of highest iteration (nothing was deleted)")
        self._resuming = candidate
        try:
            return self.load(candidate)
        finally:
            self._resuming = None

    def _iteration(self, path):
        try:
            iteration = self.read(path).get("iteration")
        except CorruptCheckpointError as e:
            self.logger.warning(f"Skipping checkpoint {path}: {e}")
            return e
        return iteration if isinstance(iteration, int) else -1

    def _load_model(self, checkpoint):
        recorded, own = checkpoint.get("cls_loss") or {}, self._loss_record()
        result = super()._load_model(checkpoint)
        differ = [f"{k}: {tuple(a)} in the checkpoint, {tuple(b)} in the model" for k, a, b in result.incorrect_shapes]
        differ += [f"{k}: only in the model" for k in result.missing_keys] if self._resuming else []
        if self._resuming and differ:
            raise CheckpointCompatibilityError(
                f"--resume: {self._resuming} was saved from another model:\n  " + "\n  ".join(differ[:5]) + "\nResume "
                "with its settings (classes, loss, ...) or fine-tune from it (MODEL.WEIGHTS, train.init_checkpoint).")
        if own and recorded.get("scores", own["scores"]) != own["scores"] and not differ:
            raise CheckpointCompatibilityError(
                f"The checkpoint was trained with MODEL.CLS_LOSS.NAME={recorded['name']!r}, whose inference scores "
                f"({recorded['scores']}) differ from those of this model's loss {own['name']!r} ({own['scores']}): "
                f"set MODEL.CLS_LOSS.NAME {recorded['name']} (LazyConfig: model.cls_loss of that name).")
        backbone = [k for k, _ in self.model.named_parameters() if k.startswith("backbone.")]
        skipped = set(result.missing_keys) | {k for k, _, _ in result.incorrect_shapes}
        if backbone and skipped.issuperset(backbone):
            self.logger.warning(f"0 of {len(backbone)} backbone tensors loaded from the checkpoint: is it converted to "
                                "this model's names (e.g. tools/convert_vgg16_to_d2.py for torchvision's VGG-16)?")
        return result

    def read(self, filename):
        """The checked checkpoint dict of ``filename``; runs no code from the file."""
        with PathManager.open(filename, "rb") as f:
            data = f.read()
        if not data:
            raise CorruptCheckpointError(f"{filename} is empty (0 bytes): the save that wrote it did not finish")
        if filename.endswith(".pkl"):
            _unpickle(filename, data)
            loaded = super()._load_file(filename)  # Detectron2's model-zoo conversions of the checked pickle
        elif data[:4] != b"PK\x03\x04" and data[:1] != b"\x80":
            raise CorruptCheckpointError(f"{filename} is not a PyTorch checkpoint: it is neither a zip archive "
                                         f"written by torch.save nor a pickle (it starts with {data[:16]!r})")
        else:  # a plain pickle of containers is used as it is; torch's legacy format starts with an int
            plain = data[:1] == b"\x80" and _unpickle(filename, data)
            loaded = plain if isinstance(plain, dict) else _torch_load(filename, data)
            if not isinstance(loaded, dict):
                raise CorruptCheckpointError(f"{filename} holds a {type(loaded).__name__}, not a checkpoint")
            loaded = loaded if "model" in loaded else {"model": loaded}
        for key, value in loaded["model"].items():
            if not isinstance(value, (torch.Tensor, np.ndarray)):
                raise CorruptCheckpointError(f"{filename} is not a checkpoint of weights: {key!r} holds a "
                                             f"{type(value).__name__}, not a tensor (give a state dict)")
            bad = int((~torch.as_tensor(value).isfinite()).sum())
            if bad:
                raise NonFiniteCheckpointError(f"{filename}: tensor {key!r} holds {bad} NaN/Inf value(s); refusing "
                                               "to load the weights of a diverged run. Use an earlier checkpoint.")
        return loaded

    def _load_file(self, filename):
        return {**self.read(filename), "matching_heuristics": True} if self._heuristics else self.read(filename)
