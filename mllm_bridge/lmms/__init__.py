"""lmms-eval: the `llava_clipmoe` model plugin and what it needs (requests, results, expert usage), eval-lmms runs
and their comparison (`run`, `checkpoints`), and tasks/ (the digit-grid task YAML, which saved task folders name by
module path). What a bare `scripts/eval_lmms.sh` evaluates and make-lmms-task's data are `mllm_bridge.embedded`'s."""
