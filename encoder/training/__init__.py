"""Training plumbing shared by the two packages that train (upcycle: CLIP / CLIP-MoE; mllm_bridge: LLaVA).

The loop core both trainers subclass is `encoder.training.loop`.

Not imported by `import encoder`: the model stays importable without accelerate or any training machinery.
"""

from .distributed import make_accelerator, on_cpu, process_state
from .run_log import NullLog, RunLog
from .sampler import ClusterBatchSampler, endless_batches

__all__ = ["ClusterBatchSampler", "NullLog", "RunLog", "endless_batches", "make_accelerator", "on_cpu", "process_state"]
