"""Evaluation helpers: pick Detectron2's evaluator from a dataset's ``evaluator_type``."""
from .build import SUPPORTED_EVALUATOR_TYPES, build_evaluator, get_evaluator

__all__ = ["SUPPORTED_EVALUATOR_TYPES", "build_evaluator", "get_evaluator"]
