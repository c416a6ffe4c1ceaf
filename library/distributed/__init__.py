"""Several processes training one model: the engine a run uses (single, DDP, gradient reducer, DeepSpeed, FSDP2)."""
