"""GPU memory machinery that wraps or hooks a model from outside: block swap, fp8, offloaded checkpointing."""
