"""lmms-eval: the `llava_clipmoe` model plugin and what it needs (requests, results, expert usage), the digit-grid
task data and tasks/, eval-lmms runs and their comparison, and what a bare `scripts/eval_lmms.sh` evaluates."""
