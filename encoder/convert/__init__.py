"""Dense CLIPs and released CLIP-MoEs in: transformers directories and hub ids, open_clip models, the official
CLIP-MoE release."""
