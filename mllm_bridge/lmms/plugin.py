"""The entry point through which lmms-eval finds `llava_clipmoe` (pyproject: [project.entry-points."lmms_eval.models"]).

lmms-eval loads every registered entry point while `lmms_eval.models` initialises, whatever model is asked for.
So this module imports nothing at import time (importing lmms-eval here would re-enter that initialisation),
and the model module (torch, LLaVA) is imported only when `llava_clipmoe` is chosen.
"""

MODEL_ID = "llava_clipmoe"
MODEL_CLASS = "mllm_bridge.lmms.model.LlavaCLIPMoE"


def manifests() -> list:
    """lmms-eval calls this (a callable entry point) for the manifests to register."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)]
