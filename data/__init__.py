"""Preference data: reading, tokenization, prefix-shared group layout, packing, the loader."""
