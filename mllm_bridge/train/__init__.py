"""LLaVA-1.5 training around a CLIP(-MoE) or SigLIP(-MoE) tower, with llava-torch's `LlavaLlamaForCausalLM` and our loop.

LLaVA's own `train.py` does not import on transformers 5, so the recipe is rebuilt here with LLaVA's flags,
templates, masking and output layouts (`python -m mllm_bridge.train pretrain | finetune`):

- `arguments`: LLaVA's flags; `stages`: stage 1 / stage 2 defaults; `cli`: the command line.
- `conversation`: the 'plain' and 'v1' templates and their labels; `data`: LLaVA JSON -> batches.
- `model_setup`: the model and tokenizer, frozen per stage; `projector`: mm_projector.bin, checked loading.
- `loop`: the accelerate loop with checkpoints and resume; metrics via `encoder.training.run_log`; `outputs`: what is saved.
- `run`: one run from flags. The CPU run of the bare scripts is `mllm_bridge.embedded.training`'s; `cli` runs it
  when no data flag is given.
"""
