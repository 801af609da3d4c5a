"""Checks of loaded dataset dicts and of image reading that name the offending file and record.

* :func:`check_dataset_dicts`: ValueError for a box of negative width or height; one warning per
  dataset and process, with counts, about zero-area boxes and images without annotations.
* :class:`NamingReadErrors`: wraps a dataset mapper; an image that fails to decode raises
  ``OSError`` naming its file.
* :func:`hint_filter_empty`: Detectron2's "No valid data found in X" with the key to change.
"""
import contextlib
import json
import logging
from typing import Iterable, List

__all__ = ["NamingReadErrors", "check_dataset_dicts", "hint_filter_empty"]

logger = logging.getLogger(__name__)

_warned = set()  # dataset names already warned about in this process


def _where(name: str, record: dict) -> str:
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    source = meta.get("json_file", None) or meta.get("dirname", None)
    where = f"dataset {name!r}" + (f" ({source})" if source else "")
    return f"{where}: image {record.get('file_name')} (image_id {record.get('image_id')!r})"


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
    """Check the loaded dataset dicts of the dataset ``name``; returns ``dicts`` unchanged."""
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
        parts = [
            f"{zero_boxes} of {boxes} boxes have zero width or height (they match no anchor or "
            "proposal and train nothing)" if zero_boxes else "",
            f"{empty} of {len(dicts)} images have no (non-crowd) annotations (dropped from training "
            "while DATALOADER.FILTER_EMPTY_ANNOTATIONS is True)" if empty else "",
        ]
        logger.warning("Dataset %r: %s.", name, "; ".join(p for p in parts if p))
    return dicts


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
