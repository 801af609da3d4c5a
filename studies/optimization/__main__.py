"""``python -m studies.optimization``: see :mod:`.cli`."""
from .cli import main

main()
