"""What one finetune run actually uses: its lambda, recipe and seeds (the paper's protocol).

The reference trains each dataset and variant with its own lambda and schedule (method.md
section 3: BP4D FMAE 20 epochs / 2 warmup at blr 2e-4, BP4D FMAE-IAT 30 / 3 at 5e-4, ...;
lambda BP4D 2.0, BP4D+ 1.0, DISFA 0.5) and repeats every run with seeds 0, 1 and 2. The
``finetune`` params section holds one default recipe; these functions resolve the effective
values of a (dataset, variant) run from it:

- :func:`effective_lambda`: ``finetune.lambda_per_dataset[dataset]``, else the top-level
  ``lambda`` (the one number ``dvc exp run -S lambda=...`` sets).
- :func:`effective_recipe`: ``finetune`` with ``finetune.recipes[variant][dataset]``'s
  ``epochs``, ``warmup_epochs`` and ``blr`` laid over it; saved-backbone epochs past the
  run's last epoch are dropped.
- :func:`run_seeds`: the top-level ``seed`` (the main stages' runs), then
  ``finetune.extra_seeds``.

Validation of the mappings is in pipeline/params.py, so a bad key fails before any work.
"""
from __future__ import annotations

import dataclasses

from pipeline.params import FINETUNE_VARIANTS, FinetuneParams, Params, ParamsError


def effective_lambda(params: Params, dataset: str) -> float:
    """The IAT lambda of ``dataset``'s runs: the per-dataset override, else ``lambda``."""
    return float(params.finetune.lambda_per_dataset.get(dataset, params.lambda_))


def effective_recipe(cfg: FinetuneParams, dataset: str, variant: str) -> FinetuneParams:
    """``cfg`` with the (variant, dataset) recipe of ``cfg.recipes`` applied.

    ``save_backbone_epochs`` keeps only epochs the run reaches (<= its effective epochs), so
    one list serves runs of different lengths. The returned section is validated again (a
    frozen dataclass built by ``dataclasses.replace``).
    """
    if variant not in FINETUNE_VARIANTS:
        raise ParamsError(f"variant {variant!r} is not one of {', '.join(FINETUNE_VARIANTS)}")
    override = dict(cfg.recipes.get(variant, {}).get(dataset, {}))
    epochs = override.get("epochs", cfg.epochs)
    saves = [e for e in cfg.save_backbone_epochs if e <= epochs]
    return dataclasses.replace(cfg, **override, save_backbone_epochs=saves)


def recipe_summary(cfg: FinetuneParams) -> dict:
    """The recipe keys of an (effective) finetune section, for metrics.json."""
    return {"epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs, "blr": cfg.blr}


def run_seeds(params: Params) -> list[int]:
    """Every seed a finetune run is trained with: the top-level seed first."""
    return [params.seed] + list(params.finetune.extra_seeds)
