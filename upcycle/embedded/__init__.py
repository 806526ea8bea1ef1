"""The CPU demo and its tiny stand-ins, fenced off the product.

Here lives what shows the toolkit working end to end on a CPU with no downloads, and nothing a user needs to make a
CLIP-MoE from their own CLIP: the main job (`upcycle demo`: main_job.py, its step runner steps.py and report.py),
the small randomly initialised base with its word-level tokenizer (`upcycle init-base`: small_base.py), the
sparse-upcycling check on real digits (`upcycle sparse-demo`: sparse_demo.py), the digit-grid data set
(`upcycle make-digit-grids`: digit_grids.py) and the `eval --digit-positions` wrapper (digit_accuracy.py).

Why fenced: the product (upcycle.eval, .recipes, .train, .data) must work, and be read, without the demo, so none
of it imports this package; the stand-ins here (digit grids, a from-scratch base) are sized for a laptop, not for
real runs. This package never imports upcycle.research either: the research harness builds on the demo (replicate
runs its steps, compare measures digit accuracy), not the other way round. upcycle/cli.py wires both in.
"""
