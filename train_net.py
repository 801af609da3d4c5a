#!/usr/bin/env python
"""Train / evaluate Detectron2 detectors with AP-loss (``--config-file`` a yacs ``.yaml`` or a
LazyConfig ``.py``). The logic lives in :mod:`ap_loss_d2.engine.train_net`; this script (like
``python -m ap_loss_d2.engine.train_net``) only runs its command line."""
from ap_loss_d2.engine.train_net import cli, main  # noqa: F401  (main: studies.main_job)

if __name__ == "__main__":
    cli()
