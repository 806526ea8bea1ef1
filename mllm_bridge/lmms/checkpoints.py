"""The checkpoint an eval-lmms run compares: a value type of its own, so the runner (`run`) and the embedded default
(`mllm_bridge.embedded.evaluation`), which both make them, depend on it and not on each other."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Checkpoint:
    """One column of the comparison: a name, a LLaVA checkpoint directory and its extra plugin model args."""

    name: str
    pretrained: str
    args: dict[str, str] = field(default_factory=dict)

    def model_args(self) -> str:
        return ",".join(f"{k}={v}" for k, v in {"pretrained": self.pretrained, **self.args}.items())
