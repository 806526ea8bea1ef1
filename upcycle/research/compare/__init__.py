"""The papers' comparison at small scale: dense fine-tuning vs sparse upcycling vs DMU vs the base, with equal
training budgets from one base, over several seeds (`python -m upcycle compare`)."""

from .arms import ARMS, ArmSettings, train_arm
from .run import check_fairness, run_compare

__all__ = ["ARMS", "ArmSettings", "check_fairness", "run_compare", "train_arm"]
