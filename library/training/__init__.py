"""The one training loop, its setup, arguments, optimizers, the loss step and the recipes."""
