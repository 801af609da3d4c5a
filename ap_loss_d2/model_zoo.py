"""Detectron2's built-in configs, found without importing ``detectron2.model_zoo``.

``detectron2.model_zoo`` (v0.6 and main) does ``import pkg_resources`` to locate its config files;
setuptools >= 81 no longer ships ``pkg_resources``, so importing it fails on an up-to-date
environment. The project's LazyConfigs use this module instead: the config files are looked up in
the directory of the ``detectron2.model_zoo`` package (``importlib.util.find_spec`` imports the
parent ``detectron2`` but not ``detectron2.model_zoo`` itself).
"""
import importlib.util
import os

__all__ = ["get_config", "get_config_file"]


def _configs_dir():
    spec = importlib.util.find_spec("detectron2.model_zoo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("detectron2.model_zoo is not installed: Detectron2 is required for its configs")
    return os.path.join(list(spec.submodule_search_locations)[0], "configs")


def get_config_file(config_path: str) -> str:
    """Path of a built-in config, e.g. ``"common/models/retinanet.py"`` (same argument and result as
    ``detectron2.model_zoo.get_config_file``)."""
    root = _configs_dir()
    path = os.path.join(root, config_path)
    if not os.path.isfile(path):
        raise RuntimeError(
            f"{config_path!r} is not among Detectron2's model-zoo configs (looked in {root}); "
            "a Detectron2 installed without them (e.g. a wheel built without configs/) needs a "
            "reinstall from its source tree"
        )
    return path


def get_config(config_path: str):
    """A built-in config: a ``DictConfig`` for ``.py`` files (LazyConfig), a ``CfgNode`` for ``.yaml``.

    Same as ``detectron2.model_zoo.get_config(config_path)`` (``trained=False``).
    """
    path = get_config_file(config_path)
    if path.endswith(".py"):
        from detectron2.config import LazyConfig

        return LazyConfig.load(path)
    if path.endswith(".yaml"):
        from detectron2.config import get_cfg

        cfg = get_cfg()
        cfg.merge_from_file(path)
        return cfg
    raise ValueError(f"{config_path!r}: expected a .py (LazyConfig) or .yaml config")
