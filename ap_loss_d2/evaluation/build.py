"""Evaluators chosen by a dataset's ``evaluator_type`` metadata (Detectron2's convention)."""
import inspect
import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator

__all__ = ["SUPPORTED_EVALUATOR_TYPES", "build_evaluator", "get_evaluator"]

#: Values of ``MetadataCatalog.get(name).evaluator_type`` that :func:`get_evaluator` handles.
SUPPORTED_EVALUATOR_TYPES = ("coco", "pascal_voc")


def _has_compiled_ops():
    """Whether ``detectron2._C`` is the compiled extension (not the offline install's placeholder)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "AP_LOSS_D2_FALLBACK", 0)


def _coco_evaluator(dataset_name, output_dir, distributed, max_dets_per_image):
    kwargs = {"distributed": distributed, "output_dir": output_dir}
    params = inspect.signature(COCOEvaluator.__init__).parameters
    if "use_fast_impl" in params:
        # The fast (C++) COCOeval needs Detectron2's compiled ops.
        kwargs["use_fast_impl"] = _has_compiled_ops()
    if max_dets_per_image is not None and "max_dets_per_image" in params:
        kwargs["max_dets_per_image"] = max_dets_per_image
    return COCOEvaluator(dataset_name, **kwargs)


def get_evaluator(dataset_name, output_dir=None, distributed=True, max_dets_per_image=None):
    """The evaluator of one dataset, selected by its metadata ``evaluator_type``.

    Args:
        dataset_name (str): a registered Detectron2 dataset name (a one-element list is accepted,
            as LazyConfig test loaders may name their dataset that way).
        output_dir (str or None): where ``COCOEvaluator`` writes ``coco_instances_results.json``.
        distributed (bool): gather predictions of all processes (``COCOEvaluator``).
        max_dets_per_image (int or None): detections per image kept by ``COCOEvaluator``
            (Detectron2's default when None).

    Usable from LazyConfig files: ``L(get_evaluator)(dataset_name="${..test.dataset.names}")``.
    """
    if not isinstance(dataset_name, str):
        names = list(dataset_name)
        if len(names) != 1:
            raise ValueError(f"One evaluator evaluates one dataset; got {names}")
        dataset_name = names[0]
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"Dataset {dataset_name!r} is not registered in Detectron2's DatasetCatalog "
            "(call ap_loss_d2.data.register_datasets() for the embedded and _nodifficult sets; the "
            "built-in ones read $DETECTRON2_DATASETS)"
        )
    metadata = MetadataCatalog.get(dataset_name)
    evaluator_type = metadata.get("evaluator_type", None)
    if evaluator_type not in SUPPORTED_EVALUATOR_TYPES:
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} with evaluator_type={evaluator_type!r}; "
            f"supported evaluator types: {', '.join(SUPPORTED_EVALUATOR_TYPES)}"
        )
    json_file = metadata.get("json_file", None)
    if json_file and not Path(json_file).exists():
        DatasetCatalog.get(dataset_name)  # the embedded sets write their files when first loaded
    if evaluator_type == "coco":
        return _coco_evaluator(dataset_name, output_dir, distributed, max_dets_per_image)
    return PascalVOCDetectionEvaluator(dataset_name)


def build_evaluator(cfg, dataset_name, output_folder=None):
    """``DefaultTrainer.build_evaluator`` for yacs configs: :func:`get_evaluator` writing to
    ``output_folder`` (default ``cfg.OUTPUT_DIR/inference``), keeping
    ``cfg.TEST.DETECTIONS_PER_IMAGE`` detections per image for COCO.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    return get_evaluator(
        dataset_name,
        output_dir=output_folder,
        distributed=True,
        max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
    )
