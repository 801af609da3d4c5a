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
"""
import io
import os
import pickle
from urllib.parse import parse_qs, urlparse

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

__all__ = ["SafeDetectionCheckpointer", "UnsafeCheckpointError", "load_options_supported"]

# Options of ``path?key=value`` and their valid values (as parsed by Detectron2 main's
# DetectionCheckpointer.load / _load_file).
LOAD_OPTIONS = {"matching_heuristics": ("True", "False")}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A weights file asks to import something other than numpy arrays and containers."""


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
    """``{"matching_heuristics": bool}`` from the query of ``url``; ValueError on anything else."""
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


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """Drop-in replacement of Detectron2's ``DetectionCheckpointer`` (same arguments)."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk or not _is_local(self.save_dir):
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        _atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self.save_dir or not _is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def load(self, path, *args, **kwargs):
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
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str):
        parsed = getattr(self, "_parsed_url_during_load", None)  # set by main's load()
        options = _parse_load_options(parsed.geturl()) if parsed is not None and parsed.query else {}
        loaded = self._load_file_safely(filename)
        if options.get("matching_heuristics", False):
            loaded["matching_heuristics"] = True  # as main's DetectionCheckpointer._load_file
        return loaded

    def _load_file_safely(self, filename: str):
        if filename.endswith(".pkl"):
            with PathManager.open(filename, "rb") as f:
                try:
                    _RestrictedUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
                except UnsafeCheckpointError as e:
                    raise UnsafeCheckpointError(f"{filename}: {e}") from None
            return super()._load_file(filename)  # now known to hold only arrays
        with PathManager.open(filename, "rb") as f:
            try:
                loaded = torch.load(f, map_location=torch.device("cpu"), weights_only=True)
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(
                    f"{filename} is not a weights-only checkpoint (it would run code when "
                    f"loaded); refusing to load it: {e}"
                ) from None
        if filename.endswith(".pyth"):
            model_state = {
                k: v for k, v in loaded["model_state"].items() if not k.endswith("num_batches_tracked")
            }
            return {"model": model_state, "__author__": "pycls", "matching_heuristics": True}
        return loaded if "model" in loaded else {"model": loaded}


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
