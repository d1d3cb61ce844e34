"""FMAE-IAT pipeline: facial MAE pretraining and identity adversarial AU training.

The importable library behind the DVC stages in ``stages/``; see docs/design.md for the map.
"""
__version__ = "0.1.0"
