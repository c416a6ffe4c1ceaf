"""Trainable networks loaded by `--network_module` (sd-scripts' module API)."""
