#!/usr/bin/env bash
# The papers' comparison at tiny scale on this CPU (about 90 min): dense fine-tuning vs sparse upcycling vs DMU
# vs the base (3 seeds, equal budgets), then the MLLM comparison; report in runs/replicate/report.md.
# Interrupted? Run it again: finished steps, arms and seeds are reused. Arguments go to `python -m upcycle replicate`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "${CLIP_MOE_VENV:-$root/.venv}/bin/python" -m upcycle replicate "$@"
