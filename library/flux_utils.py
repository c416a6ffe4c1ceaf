"""The public scripting API at the path sd-scripts users know (`library.flux_utils`); it lives in
library/models/loading.py, `load_for_compute` (it applies fp8) in library/memory/loading.py and
`load_gguf_transformer` (a .gguf transformer kept quantized) in library/memory/gguf_linear.py."""

from library.memory.gguf_linear import load_gguf_transformer  # noqa: F401 (public API)
from library.memory.loading import load_for_compute  # noqa: F401 (public API)
from library.models.loading import *  # noqa: F401,F403
from library.models.loading import __doc__ as _doc

__doc__ = _doc
