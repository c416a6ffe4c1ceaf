"""The FLUX.1 models and their files: transformer, autoencoder, ControlNet, text encoders, loaders."""
