"""One module per experiment of `make reproduce` (see reproduce/run.py for the shape each one has)."""
