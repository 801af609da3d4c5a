"""The paper's reproduction commands, beside the package and not installed: each is
``python -m studies.<name>`` from the repository root (docs/studies.md), with one argument parser
(:func:`.common.study_argument_parser`). They use only the public API of ``ap_loss_d2`` and
Detectron2, and train through the repository's ``train_net.py``."""
