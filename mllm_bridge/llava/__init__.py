"""LLaVA: the import hook that makes LLaVA build our tower, checkpoint config, tower info, checks, swap-tower, model
assembly, loading, init-llava, and shims for moved releases (the tiny Llama of the demos is `mllm_bridge.embedded`'s).

Importing this package stays cheap (no torch): the start-up .pth file imports the hook in every interpreter.
"""
