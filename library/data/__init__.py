"""Datasets: TOML schema and config, images, buckets, captions, items, batches, latent and text caches."""

# `logger.warning(..., extra=NOTE)`: a remark on a valid setting (an option without effect here, a value rounded),
# not a problem; tools/inspect_dataset.py lists these as notes and fails only on the other warnings.
NOTE = {"note": True}
