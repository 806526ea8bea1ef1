"""The research harness, fenced off the product: what measures the methods against each other, not what makes a
model.

`upcycle compare` (compare/: arms, experts, measure, report, run; equal-budget dense fine-tuning vs sparse
upcycling vs DMU over seeds), `upcycle replicate` (replicate.py: the papers' comparison at tiny scale, CLIP arms
then LLaVA towers), the seed-list parser (seeds.py) and the statistics of both reports (intervals.py: Wilson
intervals and paired bootstrap differences from per-query hits).

Why fenced: a user making a CLIP-MoE needs none of it, so the product (upcycle.eval, .recipes, .train, .data)
never imports this package, and a change here cannot break a recipe. It may import the product and
upcycle.embedded (replicate runs the demo's steps through its step runner, compare measures digit accuracy with
the demo's wrapper); within upcycle only cli.py imports it.
"""
