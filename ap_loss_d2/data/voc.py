"""Pascal VOC training sets without the "difficult" objects, as the authors' loader reads them
(``use_diff = False``; Detectron2's ``load_voc_instances`` keeps them as positives). Images left
without objects are dropped from training by ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``. For
``DATASETS.TRAIN`` only: ``PascalVOCDetectionEvaluator`` reads the XML files itself.
"""
import os
import xml.etree.ElementTree as ET
from typing import List

__all__ = ["BUILTIN_VOC_DATASETS", "NODIFFICULT_SUFFIX", "drop_difficult", "register_voc_nodifficult"]

NODIFFICULT_SUFFIX = "_nodifficult"
#: The Pascal VOC sets that Detectron2 registers on import (``detectron2/data/datasets/builtin.py``).
BUILTIN_VOC_DATASETS = (
    "voc_2007_trainval",
    "voc_2007_train",
    "voc_2007_val",
    "voc_2007_test",
    "voc_2012_trainval",
    "voc_2012_train",
    "voc_2012_val",
)


def _difficult_flags(xml_path: str) -> List[bool]:
    from detectron2.utils.file_io import PathManager

    with PathManager.open(xml_path) as f:
        objects = ET.parse(f).getroot().findall("object")
    return [(o.findtext("difficult") or "0").strip() == "1" for o in objects]


def drop_difficult(dataset_dicts: List[dict], dirname: str) -> List[dict]:
    """Copies of VOC dataset dicts (Detectron2's ``load_voc_instances``: one annotation per
    ``<object>``, in file order) without the difficult objects of
    ``dirname/Annotations/<image_id>.xml``."""
    out = []
    for record in dataset_dicts:
        xml_path = os.path.join(dirname, "Annotations", f"{record['image_id']}.xml")
        flags = _difficult_flags(xml_path)
        annos = record.get("annotations", [])
        if len(flags) != len(annos):
            raise ValueError(
                f"{xml_path}: {len(flags)} <object> elements but {len(annos)} annotations in the "
                "dataset dict; the _nodifficult filter needs one annotation per object, in order"
            )
        out.append({**record, "annotations": [a for a, hard in zip(annos, flags) if not hard]})
    return out


def _load_nodifficult(base_name: str) -> List[dict]:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    return drop_difficult(DatasetCatalog.get(base_name), MetadataCatalog.get(base_name).dirname)


def register_voc_nodifficult(base_name: str) -> str:
    """Register ``<base_name>_nodifficult`` for the registered Pascal VOC dataset ``base_name``
    (metadata copied, ``dirname`` needed). Idempotent; returns the new name."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = base_name + NODIFFICULT_SUFFIX
    if name in DatasetCatalog.list():
        return name
    if base_name not in DatasetCatalog.list() or MetadataCatalog.get(base_name).get("dirname", None) is None:
        raise ValueError(
            f"{base_name!r} is not a registered Pascal VOC dataset (needs metadata 'dirname'); "
            "register it with detectron2.data.datasets.register_pascal_voc first"
        )
    DatasetCatalog.register(name, lambda: _load_nodifficult(base_name))
    values = {k: v for k, v in MetadataCatalog.get(base_name).as_dict().items() if k != "name"}
    MetadataCatalog.get(name).set(**values, difficult_dropped_from=base_name)
    return name
