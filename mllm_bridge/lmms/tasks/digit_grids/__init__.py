"""Digit-grid QA for lmms-eval: which handwritten digit sits at a grid position (`upcycle make-digit-grids` data)."""
