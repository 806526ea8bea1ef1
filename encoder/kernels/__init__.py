"""The kernels behind the fast CPU experts path ("segments" in `encoder.experts.EXPERT_DISPATCH`).

- `activations`: the towers' MLP activations (CLIP's quick_gelu, SigLIP's gelu_pytorch_tanh, exact gelu,
  silu) as `out=` kernels whose scales fold into the matmuls.
- `segment_mlp`: per-expert MLP / linear over expert-sorted rows as single autograd nodes that fill
  preallocated buffers segment by segment (eager mode; reads the per-expert counts on the host).
- `ops`: the same kernels registered as the torch custom ops `clip_moe::segment_mlp` /
  `clip_moe::segment_linear`, so torch.compile / torch.export can trace a model that uses them.

They know nothing of modules or routing: inputs are rows already sorted by expert plus stacked weights.
"""
