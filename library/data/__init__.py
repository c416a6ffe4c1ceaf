"""Datasets: TOML schema and config, images, buckets, captions, items, batches, latent and text caches."""
