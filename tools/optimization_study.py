#!/usr/bin/env python
"""Fig. 8 of the AP-loss paper (optimisation methods): a thin command line over
:mod:`ap_loss_d2.studies.optimization` (same arguments as
``python -m ap_loss_d2.studies.optimization``; ``--help`` lists them)."""
from ap_loss_d2.studies.optimization import main

if __name__ == "__main__":
    main()
