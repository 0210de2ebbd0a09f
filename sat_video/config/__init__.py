"""Configuration: the root schema (one section per layer), the loader that checks a config whole, tool helpers."""
