"""The model and its I/O: the typed config, the pure transformer with streams, Hugging Face folders, conversion."""
