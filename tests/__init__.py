"""ap_loss_d2's tests (a package: helpers such as ``tests.ap_oracle`` import without sys.path edits)."""
