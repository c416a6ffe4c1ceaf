"""The public scripting API at the path sd-scripts users know (`library.flux_utils`); it lives in
library/models/loading.py, and `load_for_compute` (it applies fp8) in library/memory/loading.py."""

from library.memory.loading import load_for_compute  # noqa: F401 (public API)
from library.models.loading import *  # noqa: F401,F403
from library.models.loading import __doc__ as _doc

__doc__ = _doc
