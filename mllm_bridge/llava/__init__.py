"""LLaVA: the import hook that makes LLaVA build our tower, checkpoint config, tower info, checks, swap-tower, model
assembly, loading, init-llava, shims for moved releases, and a tiny Llama for tests and demos.

Importing this package stays cheap (no torch): the start-up .pth file imports the hook in every interpreter.
"""
