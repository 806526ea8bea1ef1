"""lmms-eval tasks shipped with clip-moe-toolkit: task YAML and the functions it names (`!function` paths).

A task folder becomes usable once its data is written next to its YAML (the YAML names its data file relative to
itself): `python -m mllm_bridge make-lmms-task --data DIGIT_GRIDS_DIR --out TASK_DIR`, then
`python -m lmms_eval --include_path TASK_DIR --tasks digit_grids_qa ...`.
"""
