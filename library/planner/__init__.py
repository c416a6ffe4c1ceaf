"""The memory planner: a training step simulated on meta tensors, its report and swap-speed model."""
