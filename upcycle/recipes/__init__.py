"""The recipes that make a CLIP-MoE: assembly from per-expert FFNs, sparse upcycling (CLIP-UP), and Diversified
Multiplet Upcycling (dmu/)."""
