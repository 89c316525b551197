"""Training, evaluation and data tooling for atop-serve (needs the `train` extra: torch)."""
