"""Scripts of the repository (not installed), each run from its root: ``python -m tools.<name>``
(``benchmark``, ``env``) or ``python tools/<name>.py``. A package so that ``python -m tools.<name>``
finds these rather than the ``tools`` package that Detectron2's build installs."""
