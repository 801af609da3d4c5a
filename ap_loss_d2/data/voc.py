"""Pascal VOC training sets without the "difficult" objects, as the authors' loader reads them.

Detectron2's ``load_voc_instances`` keeps objects marked ``<difficult>1</difficult>`` as ordinary
positives (its comment: "We include difficult samples in training"); the authors' VOC loader
(``use_diff = False``) drops them. For every Pascal VOC dataset registered when this module is
imported (Detectron2's built-in ``voc_2007_trainval``, ``voc_2012_trainval``, ... and the
embedded ``synth_shapes_voc_*``), ``<name>_nodifficult`` is registered: the same dataset dicts,
same images and box conventions, minus the difficult instances (images keep their place even
when all their objects were difficult; ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` then drops them
from training, as Detectron2 does for any image without annotations).

Evaluation is unaffected: ``PascalVOCDetectionEvaluator`` reads the XML files itself and applies
the official protocol (difficult objects are neither required nor counted as false positives).
Use the ``_nodifficult`` names in ``DATASETS.TRAIN`` only.
"""
import os
import xml.etree.ElementTree as ET
from typing import List

__all__ = ["NODIFFICULT_SUFFIX", "drop_difficult", "register_voc_nodifficult", "voc_difficult_flags"]

NODIFFICULT_SUFFIX = "_nodifficult"


def voc_difficult_flags(xml_path: str) -> List[bool]:
    """``difficult`` of every ``<object>`` of one VOC annotation file, in file order (a missing
    ``<difficult>`` element counts as 0, as in the VOC devkit)."""
    from detectron2.utils.file_io import PathManager

    with PathManager.open(xml_path) as f:
        root = ET.parse(f).getroot()
    flags = []
    for obj in root.findall("object"):
        d = obj.find("difficult")
        flags.append(d is not None and d.text is not None and int(d.text.strip()) == 1)
    return flags


def drop_difficult(dataset_dicts: List[dict], dirname: str) -> List[dict]:
    """Copies of VOC dataset dicts (as built by Detectron2's ``load_voc_instances``: one
    annotation per ``<object>``, in file order, ``image_id`` = file id) without the annotations
    of difficult objects, read from ``dirname/Annotations/<image_id>.xml``."""
    out = []
    for record in dataset_dicts:
        xml_path = os.path.join(dirname, "Annotations", f"{record['image_id']}.xml")
        flags = voc_difficult_flags(xml_path)
        annos = record.get("annotations", [])
        if len(flags) != len(annos):
            raise ValueError(
                f"{xml_path}: {len(flags)} <object> elements but {len(annos)} annotations in the "
                "dataset dict; the _nodifficult filter needs one annotation per object, in order"
            )
        record = dict(record)
        record["annotations"] = [a for a, hard in zip(annos, flags) if not hard]
        out.append(record)
    return out


def _load_nodifficult(base_name: str) -> List[dict]:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    dirname = MetadataCatalog.get(base_name).dirname
    return drop_difficult(DatasetCatalog.get(base_name), dirname)


def register_voc_nodifficult(base_name: str) -> str:
    """Register ``<base_name>_nodifficult`` for a registered Pascal VOC dataset (metadata
    ``dirname``; other metadata copied). Idempotent; returns the new name."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = base_name + NODIFFICULT_SUFFIX
    if name in DatasetCatalog.list():
        return name
    meta = MetadataCatalog.get(base_name)
    if base_name not in DatasetCatalog.list() or meta.get("dirname", None) is None:
        raise ValueError(
            f"{base_name!r} is not a registered Pascal VOC dataset (needs metadata 'dirname'); "
            "register it with detectron2.data.datasets.register_pascal_voc first"
        )
    DatasetCatalog.register(name, lambda: _load_nodifficult(base_name))
    values = {k: v for k, v in meta.as_dict().items() if k != "name"}
    MetadataCatalog.get(name).set(**values, difficult_dropped_from=base_name)
    return name


def register_all_voc_nodifficult() -> List[str]:
    """Register ``_nodifficult`` twins of every Pascal VOC dataset registered now."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = []
    for base in DatasetCatalog.list():
        if base.endswith(NODIFFICULT_SUFFIX):
            continue
        meta = MetadataCatalog.get(base)
        if meta.get("evaluator_type", None) == "pascal_voc" and meta.get("dirname", None):
            names.append(register_voc_nodifficult(base))
    return names
