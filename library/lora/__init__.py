"""Applying, merging and extracting LoRAs on the models."""
