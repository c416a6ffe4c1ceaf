"""File formats: safetensors I/O, atomic writes, dtypes, LoRA layouts, key tables, metadata, writers."""
