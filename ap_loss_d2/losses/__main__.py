"""``python -m ap_loss_d2.losses``: print the registry of classification losses (markdown)."""
from .registry import registry_table

print(registry_table())
