"""The `lorafleet` command: one entry point over the producer and the workers (see cli.py)."""
