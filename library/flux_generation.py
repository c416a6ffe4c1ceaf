"""Prompt -> image with loaded models, at the path the README documents; it lives in library/flow/generation.py."""

from library.flow.generation import *  # noqa: F401,F403
