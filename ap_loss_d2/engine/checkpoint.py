"""Detectron2's ``DetectionCheckpointer`` plus safety; nothing else differs from Detectron2.

Loading, resuming, fine-tuning (tensors whose shapes differ are skipped with Detectron2's
warning), the restored scheduler state and ``metrics.json`` (appended to) are Detectron2's.
:class:`SafeDetectionCheckpointer` adds (details: ``docs/checkpoints.md``):

* no code runs from a file: ``.pth``/``.pyth`` are read with ``torch.load(weights_only=True)``,
  ``.pkl`` (model zoo) first pass a restricted unpickler (numpy arrays and containers only);
* atomic saves: written to ``<name>.tmp``, synced, renamed; a failed save (disk full) removes
  its ``.tmp`` and leaves the previous files untouched;
* an empty, truncated or corrupt file raises :class:`CorruptCheckpointError` naming it;
* weights holding NaN/Inf raise :class:`NonFiniteCheckpointError` naming the file and tensor;
* ``--resume`` falls back, when the checkpoint ``last_checkpoint`` names cannot be used, to the
  readable one with finite weights and the highest stored iteration (never by file time);
* ``--resume`` into a model the checkpoint does not fit (another class count or classifier
  layout) raises :class:`CheckpointCompatibilityError` naming the tensors and both shapes;
* ``path?matching_heuristics=True`` loads by Detectron2's name-matching heuristics (as on
  Detectron2's main branch, here on every version and file type); other options are errors.
"""
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

__all__ = [
    "CheckpointCompatibilityError", "CorruptCheckpointError", "NonFiniteCheckpointError",
    "SafeDetectionCheckpointer", "UnsafeCheckpointError", "usable_checkpoints",
]

logger = logging.getLogger(__name__)

LOAD_OPTIONS = {"matching_heuristics": ("True", "False")}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A weights file asks to import something other than tensors, arrays and containers."""


class CorruptCheckpointError(ValueError):
    """A weights file is empty, truncated, not a checkpoint, or otherwise unreadable."""


class NonFiniteCheckpointError(ValueError):
    """A weights file holds NaN or Inf weights."""


class CheckpointCompatibilityError(ValueError):
    """``--resume`` found a checkpoint whose tensors do not fit the model."""


_UNREADABLE = (CorruptCheckpointError, UnsafeCheckpointError, NonFiniteCheckpointError)
# (module, name) pairs a model-zoo .pkl may reference
_PKL_ALLOWED = {
    ("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")
} | {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PKL_ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load {module}.{name} from a weights file: only numpy arrays and "
            "builtin containers are allowed"
        )


def _check_pickle(filename: str, data: bytes) -> None:
    try:
        _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{filename}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError,
            AttributeError) as e:
        raise CorruptCheckpointError(
            f"{filename} is not a readable weights pickle (truncated, corrupt, or another kind "
            f"of file; starts with {data[:16]!r}): {type(e).__name__}: {e}"
        ) from None


def _load_torch(filename: str, data: bytes):
    if data[:4] != b"PK\x03\x04" and data[:1] != b"\x80":
        raise CorruptCheckpointError(
            f"{filename} is not a PyTorch checkpoint: it is neither a zip archive written by "
            f"torch.save nor a pickle (it starts with {data[:16]!r})"
        )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        if unsafe:
            raise UnsafeCheckpointError(
                f"{filename} is not a weights-only checkpoint: it references {', '.join(unsafe)}, "
                "which a plain state dict does not; refusing to load it. Re-save the weights from "
                "a trusted copy with torch.save(model.state_dict(), path) (numpy arrays in "
                "Detectron2's model-zoo format: name the file .pkl)."
            ) from None
        raise CorruptCheckpointError(
            f"{filename} is truncated or corrupt: not a readable weights pickle"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as e:
        reason = str(e).split(". This is an internal")[0].strip().splitlines()
        raise CorruptCheckpointError(
            f"{filename} is truncated or corrupt ({len(data)} bytes): {type(e).__name__}: "
            f"{reason[0] if reason else ''}. Use an earlier checkpoint or a fresh copy."
        ) from None


def _check_finite(filename: str, state) -> None:
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
        elif isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
            bad = int((~np.isfinite(value)).sum())
        else:
            continue
        if bad:
            raise NonFiniteCheckpointError(
                f"{filename}: tensor {name!r} holds {bad} NaN/Inf value(s); refusing to load the "
                "weights of a diverged run. Use an earlier checkpoint."
            )


def _split_options(path: str):
    """``(file, {"matching_heuristics": bool})`` from ``file?key=value``; ValueError on anything else."""
    parsed = urlparse(path)
    options = {}
    for key, values in parse_qs(parsed.query, keep_blank_values=True).items():
        if key not in LOAD_OPTIONS:
            raise ValueError(
                f"checkpoint {path!r}: unknown loading option {key!r}; supported: "
                + ", ".join(f"{k}={'|'.join(v)}" for k, v in LOAD_OPTIONS.items())
            )
        if len(values) != 1 or values[0] not in LOAD_OPTIONS[key]:
            raise ValueError(
                f"checkpoint {path!r}: {key}={'&'.join(values)!r} is not valid; use "
                f"{key}={' or '.join(LOAD_OPTIONS[key])}"
            )
        options[key] = values[0] == "True"
    return path[: -len(parsed.query) - 1], options


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """Drop-in replacement of Detectron2's ``DetectionCheckpointer`` (same arguments)."""

    _options: dict = {}
    _resuming = None  # the file being resumed from

    def _local(self) -> bool:
        return bool(self.save_dir) and "://" not in self.save_dir

    def save(self, name: str, **kwargs) -> None:
        if not (self._local() and self.save_to_disk):
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        os.makedirs(self.save_dir, exist_ok=True)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {path}")
        _atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(f"{name}.pth")

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._local():
            return super().tag_last_checkpoint(last_filename_basename)
        tag = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(tag, lambda f: f.write(last_filename_basename.encode()))

    def load(self, path, *args, **kwargs):
        self._options = {}
        if path and "?" in path and not os.path.isfile(path):
            path, self._options = _split_options(path)
        return super().load(path, *args, **kwargs)

    def resume_or_load(self, path: str, *, resume: bool = True):
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        try:
            last, problem = self._last_checkpoint()
            if last is not None:
                try:
                    return self._resume(last)
                except _UNREADABLE as e:
                    problem = e
            usable = usable_checkpoints(self.save_dir, exclude=(last,))
            if not usable:
                raise CorruptCheckpointError(
                    f"--resume: no readable checkpoint with finite weights in {self.save_dir} "
                    f"({problem}). Start without --resume (or set another OUTPUT_DIR) to train "
                    "from MODEL.WEIGHTS."
                ) from None
            self.logger.warning(
                f"--resume: the latest checkpoint cannot be used ({problem}); resuming from "
                f"{usable[-1][1]}, the readable one with finite weights and the highest iteration "
                "(nothing was deleted)"
            )
            return self._resume(usable[-1][1])
        finally:
            self._resuming = None

    def _resume(self, path):
        self._resuming = path
        return self.load(path)

    def _last_checkpoint(self):
        """(the file ``last_checkpoint`` names, None) or (None, what is wrong with it)."""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        try:
            name = self.get_checkpoint_file()[len(self.save_dir) :].strip(os.sep)
        except UnicodeDecodeError:
            return None, f"{tag} is not text (it should hold a checkpoint file name)"
        if not name:
            return None, f"{tag} is empty (it should hold a checkpoint file name)"
        path = os.path.join(self.save_dir, name)
        if not os.path.isfile(path):
            return None, f"{tag} names {name}, which does not exist in {self.save_dir}"
        return path, None

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        differences = [
            f"{k}: {tuple(a)} in the checkpoint, {tuple(b)} in the model"
            for k, a, b in incompatible.incorrect_shapes
        ]
        differences += [f"{k}: only in the model" for k in incompatible.missing_keys]
        differences += [f"{k}: only in the checkpoint" for k in incompatible.unexpected_keys]
        if self._resuming and differences:
            raise CheckpointCompatibilityError(
                f"--resume: {self._resuming} was saved from another model than the one built "
                f"from the config ({len(differences)} tensor(s) differ):\n  "
                + "\n  ".join(differences[:5])
                + "\nResume with the settings it was trained with (class count, MODEL.CLS_LOSS.NAME, "
                "...), or use another OUTPUT_DIR; to fine-tune from its weights, load it as "
                "MODEL.WEIGHTS (train.init_checkpoint) without --resume."
            )
        return incompatible

    def _load_file(self, filename: str):
        with PathManager.open(filename, "rb") as f:
            data = f.read()
        if not data:
            raise CorruptCheckpointError(
                f"{filename} is empty (0 bytes): the save that wrote it did not finish"
            )
        if filename.endswith(".pkl"):
            _check_pickle(filename, data)
            loaded = super()._load_file(filename)  # Detectron2's conversions; arrays only
        else:
            loaded = _load_torch(filename, data)
            if not isinstance(loaded, dict):
                raise CorruptCheckpointError(
                    f"{filename} holds a {type(loaded).__name__}, not a checkpoint (a dict of weights)"
                )
            if filename.endswith(".pyth"):  # pycls, as Detectron2 reads it
                state = loaded["model_state"]
                state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
                loaded = {"model": state, "__author__": "pycls", "matching_heuristics": True}
            elif "model" not in loaded:
                loaded = {"model": loaded}
        if self._options.get("matching_heuristics"):
            loaded["matching_heuristics"] = True
        _check_finite(filename, loaded["model"])
        return loaded


def usable_checkpoints(save_dir: str, exclude=()):
    """``[(iteration, path, largest |weight|)]`` of the readable ``.pth`` files of ``save_dir``
    with finite weights (files in ``exclude`` aside), by stored ``iteration`` (-1 if none), then
    name. Reads every file."""
    reader = SafeDetectionCheckpointer(torch.nn.Module())
    found = []
    for path in sorted(glob.glob(os.path.join(save_dir, "*.pth"))):
        if path in exclude:
            continue
        try:
            loaded = reader._load_file(path)
        except _UNREADABLE as e:
            logger.warning(f"Skipping checkpoint {path}: {e}")
            continue
        iteration = loaded.get("iteration")
        tensors = [v for v in loaded["model"].values() if isinstance(v, torch.Tensor)]
        largest = max((float(v.abs().max()) for v in tensors if v.is_floating_point() and v.numel()), default=0.0)
        found.append((iteration if isinstance(iteration, int) else -1, path, largest))
    return sorted(found)

