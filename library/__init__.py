"""Shared library of the FLUX.1 training suite: models, loaders, sampling, data and training machinery."""
