"""Checks of dataset dicts and image reading that name the offending file and record.

* :func:`check_dataset_dicts`: raises ``ValueError`` for a box with negative width or height
  (naming the dataset, the image file, the image id, the annotation index and the annotation
  file when the metadata has one); warns once per dataset and process, with counts, about
  zero-area boxes (they never match an anchor or proposal, so they train nothing) and images
  without annotations (dropped from training while ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` is
  True).
* :func:`install_dataset_checks`: wraps the ``DatasetCatalog`` functions of the given names
  (embedded, built-in or user-registered) so that every ``DatasetCatalog.get`` runs the check,
  and an annotation file that is not valid JSON (truncated, corrupt) raises ``ValueError``
  naming the dataset and the file. Idempotent. Called at start-up (``ap_loss_d2.engine.validation``) for the configured datasets.
* :class:`NamingReadErrors`: wraps any dataset mapper; an image that fails to decode
  (truncated JPEG, not an image, missing) raises ``OSError`` naming its file.
* :func:`hint_filter_empty`: turns Detectron2's "No valid data found in X" into a message that
  names ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``.
"""
import contextlib
import json
import logging
from typing import Iterable, List

__all__ = [
    "NamingReadErrors",
    "check_dataset_dicts",
    "hint_filter_empty",
    "install_dataset_checks",
]

logger = logging.getLogger(__name__)

_warned = set()  # dataset names already warned about in this process


def _where(name: str, record: dict) -> str:
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    source = meta.get("json_file", None) or meta.get("dirname", None)
    return (
        f"dataset {name!r}"
        + (f" ({source})" if source else "")
        + f": image {record.get('file_name')} (image_id {record.get('image_id')!r})"
    )


def _width_height(ann: dict):
    from detectron2.structures import BoxMode

    box = ann.get("bbox")
    if box is None or len(box) != 4:
        return None
    mode = ann.get("bbox_mode", BoxMode.XYWH_ABS)
    if mode in (BoxMode.XYWH_ABS, BoxMode.XYWH_REL):
        return float(box[2]), float(box[3])
    if mode in (BoxMode.XYXY_ABS, BoxMode.XYXY_REL):
        return float(box[2]) - float(box[0]), float(box[3]) - float(box[1])
    return None  # rotated boxes: not checked


def check_dataset_dicts(dicts: List[dict], name: str) -> List[dict]:
    """Check the dataset dicts of ``name`` (see the module doc); returns ``dicts`` unchanged."""
    if not isinstance(dicts, list):
        return dicts  # e.g. a torch Dataset: nothing to inspect cheaply
    zero_boxes = boxes = empty = 0
    for record in dicts:
        annos = record.get("annotations", None)
        if annos is None:
            continue
        if not any(a.get("iscrowd", 0) == 0 for a in annos):
            empty += 1
        for k, ann in enumerate(annos):
            wh = _width_height(ann)
            if wh is None:
                continue
            boxes += 1
            w, h = wh
            if w < 0 or h < 0:
                raise ValueError(
                    f"{_where(name, record)}, annotation {k}: box {list(ann['bbox'])} has negative "
                    f"{'width' if w < 0 else 'height'} ({w:g} x {h:g}); fix the annotation "
                    "(COCO boxes are [x, y, width, height]; VOC needs xmax >= xmin, ymax >= ymin)"
                )
            if w == 0 or h == 0:
                zero_boxes += 1
    if (zero_boxes or empty) and name not in _warned:
        _warned.add(name)
        parts = []
        if zero_boxes:
            parts.append(
                f"{zero_boxes} of {boxes} boxes have zero width or height (they match no anchor "
                "or proposal and train nothing)"
            )
        if empty:
            parts.append(
                f"{empty} of {len(dicts)} images have no (non-crowd) annotations (dropped from "
                "training while DATALOADER.FILTER_EMPTY_ANNOTATIONS is True)"
            )
        logger.warning("Dataset %r: %s.", name, "; ".join(parts))
    return dicts


def install_dataset_checks(names: Iterable[str]) -> None:
    """Make ``DatasetCatalog.get(name)`` run :func:`check_dataset_dicts` for each of ``names``
    (registered names only; already wrapped ones are left alone)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in names:
        if name not in DatasetCatalog:
            continue
        func = DatasetCatalog[name]
        if getattr(func, "_ap_loss_d2_checked", False):
            continue

        def checked(func=func, name=name):
            try:
                dicts = func()
            except json.JSONDecodeError as e:
                source = MetadataCatalog.get(name).get("json_file", None) or "its annotation file"
                raise ValueError(
                    f"dataset {name!r}: {source} is not valid JSON ({e}); the file is truncated "
                    "or corrupt. Restore it (download or copy it again)."
                ) from e
            return check_dataset_dicts(dicts, name)

        checked._ap_loss_d2_checked = True
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, checked)


class NamingReadErrors:
    """Wraps a dataset mapper: an ``OSError`` / ``SyntaxError`` (PIL's decode errors, e.g.
    "image file is truncated") raised while mapping a record is re-raised as ``OSError`` naming
    the record's ``file_name``."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, dataset_dict):
        try:
            return self.mapper(dataset_dict)
        except (OSError, SyntaxError) as e:
            file_name = dataset_dict.get("file_name", "<no file_name>")
            if str(file_name) in str(e):
                raise
            raise OSError(f"{file_name}: cannot read this image ({type(e).__name__}: {e})") from e

    def __getattr__(self, name):  # behave like the wrapped mapper for attribute access
        if name == "mapper":
            raise AttributeError(name)
        return getattr(self.mapper, name)


@contextlib.contextmanager
def hint_filter_empty(key: str = "DATALOADER.FILTER_EMPTY_ANNOTATIONS"):
    """Re-raise Detectron2's "No valid data found in X" as a ValueError naming ``key``."""
    try:
        yield
    except AssertionError as e:
        if "No valid data found" not in str(e):
            raise
        raise ValueError(
            f"{e} Every image has no (non-crowd) annotations, and {key} is True, so all were "
            f"dropped. Check the annotation files, or set {key} False to train on the images "
            "anyway (as negatives only)."
        ) from e
