"""``python -m ap_loss_d2.studies.optimization``: see :mod:`.cli`."""
from .cli import main

main()
