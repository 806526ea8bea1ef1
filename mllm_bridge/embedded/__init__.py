"""The embedded CPU demo and its tiny stand-ins: what bare `scripts/pretrain_projector.sh`, `finetune.sh` and
`eval_lmms.sh` run with no flags, built here from nothing, offline, in minutes.

- `tiny_lm`: a tiny random Llama and a tokenizer trained offline (also the tests' language model);
- `training`: the embedded training run: its parts (digit grids, a sparse-upcycled CLIP-MoE tower, the tiny Llama),
  its flag values, stage 1 before stage 2, and `make-tiny-llm`;
- `evaluation`: what a bare eval-lmms evaluates (the embedded run's checkpoints, CLIP-MoE and dense towers);
- `task_data`: `make-lmms-task`, digit-grid data -> an lmms-eval task folder (the task YAML itself stays in
  `mllm_bridge/lmms/tasks/digit_grids`, where saved task folders find it).

Fenced off from the product: nothing in `llava/`, `lmms/` or `train/` imports this package, except the command
lines (`cli.py`, `__main__.py`), which wire the demo in as their defaults. This package may import the product, so
a change to the demo never reaches what a real run uses, and the product can be read without the demo.
"""
