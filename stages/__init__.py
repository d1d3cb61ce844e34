"""Thin entry points, one per DVC stage: `python -m stages.<name> --params params.yaml ...`."""
