"""Identity probing of AU backbones (paper section 5.1, Figures 3 and 4).

The paper's evidence for identity shortcut learning: freeze the backbone of an AU model
(encoder + fc_norm), train a linear classifier on its pooled features to recognise the
subject, and watch that accuracy over the AU model's training epochs (Figure 3: FMAE goes
above 50% after one epoch and reaches 83% on BP4D; FMAE-IAT stays at 4.6% after one epoch and
27.9% at epoch 19; chance 1/41). Figure 4 shows a t-SNE of the same features coloured by
subject. See method.md section 4.

Every backbone gets two probes (pipeline/linear_probe.py): the authors' recipe (what Figure 3
measured) and a converged probe on standardised features (whether identity is linearly
decodable at all). Each reports its training accuracy beside its test accuracy; a probe whose
training accuracy stays below ``probe.underfit_below`` is flagged as underfitting, since its
low test accuracy then says more about the probe than about the features.

Protocol (as the paper): every subject of the dataset (not only one fold's), a seeded random
``frames_per_subject`` frames each, split per subject into ``train_fraction`` train / rest
test. The same frames are used for every checkpoint, variant and fold of a dataset, so the
curves differ only by the backbone. Identical backbones (every run's epoch 0 is the same
pretrained encoder) are probed once.

Inputs follow docs/design.md: ``data/finetune/<variant>/<dataset>-<fold>/backbones/
epoch_<E:03d>.pt`` and the AU shards ``data/au_shards/<dataset>/``. Accuracies are written in
percent (``"unit": "percent"``), like the paper and like the finetune stage's F1.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.distributed import (DistInfo, all_gather_objects, broadcast_object,
                                  gather_objects_to_main)
from pipeline.io import atomic_write_json, read_json, round_floats, save_figure
from pipeline.linear_probe import (JpegFrames, Recipe, converged_probe, extract_features,
                                   recipe_probe)
from pipeline.models.vit import build_vit
from pipeline.params import FinetuneParams, ProbeParams, parse_run

log = logging.getLogger(__name__)

VARIANTS = ("fmae", "iat")
VARIANT_NAMES = {"fmae": "FMAE", "iat": "FMAE-IAT"}
VARIANT_COLORS = {"fmae": "tab:red", "iat": "tab:blue"}  # Figure 3: FMAE is the red line
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")


# --------------------------------------------------------------------------- probe frames
@dataclass
class ProbeFrames:
    """The frames one dataset is probed on, shared by all checkpoints, variants and folds.

    ``labels`` index into ``subjects``; ``is_train`` marks the per-subject training share.
    ``jpegs`` holds the encoded frames (small), decoded per checkpoint at its image size.
    """
    keys: list[str]
    subjects: list[str]
    labels: np.ndarray    # (N,) int64 subject index
    is_train: np.ndarray  # (N,) bool
    jpegs: list[bytes]

    @property
    def n_subjects(self) -> int:
        return len(self.subjects)

    @property
    def chance(self) -> float:
        """Chance accuracy in percent (the paper's 1/41 = 2.4% on BP4D)."""
        return 100.0 / self.n_subjects


def select_frames(index: pd.DataFrame, frames_per_subject: int, train_fraction: float,
                  seed: int) -> pd.DataFrame:
    """Pick ``frames_per_subject`` random frames per subject and split them train/test.

    Args:
        index: the AU shards' ``index.parquet`` (needs ``key``, ``subject``, ``shard``).
        frames_per_subject: frames drawn per subject (all of them when a subject has fewer).
        train_fraction: share of each subject's frames used to train the probe (paper 0.7).
        seed: the draw depends only on this seed and the index, so every run of a dataset
            sees the same frames.

    Returns:
        The selected rows with an added bool column ``is_train``, subjects in sorted order.
    """
    missing = {"key", "subject", "shard"} - set(index.columns)
    if missing:
        raise ValueError(f"AU index lacks columns {sorted(missing)}; re-run the au_shards stage")
    rng = np.random.default_rng(seed)
    parts = []
    for subject, rows in index.sort_values("key").groupby("subject", sort=True):
        n = len(rows)
        if n < 2:
            log.warning("subject %s has %d frame(s); it cannot be split into probe train and "
                        "test frames and is left out of the probe", subject, n)
            continue
        take = min(frames_per_subject, n)
        if take < frames_per_subject:
            log.warning("subject %s has only %d frames (probe.frames_per_subject=%d): all used",
                        subject, n, frames_per_subject)
        chosen = rows.iloc[np.sort(rng.choice(n, size=take, replace=False))].copy()
        # At least one train and one test frame per subject, whatever the fraction.
        n_train = int(min(max(round(take * train_fraction), 1), take - 1))
        split = np.zeros(take, dtype=bool)
        split[rng.permutation(take)[:n_train]] = True
        chosen["is_train"] = split
        parts.append(chosen)
    if len(parts) < 2:
        raise ValueError(f"identity probing needs at least 2 subjects with 2+ frames, found "
                         f"{len(parts)}; check the AU shards")
    return pd.concat(parts, ignore_index=True)


def _tar_key(member_name: str) -> tuple[str, str]:
    """WebDataset's naming: the key is the path up to the first dot of the file name."""
    head, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def read_jpegs(au_dir: Path, keys_by_shard: dict[str, set[str]]) -> dict[str, bytes]:
    """Read the ``jpg`` entries of the given keys from AU shard tars (one pass per tar)."""
    out: dict[str, bytes] = {}
    for shard, wanted in sorted(keys_by_shard.items()):
        path = au_dir / shard
        if not path.is_file():
            path = au_dir / Path(shard).name  # index may store paths relative to elsewhere
        if not path.is_file():
            raise FileNotFoundError(f"{au_dir / shard}: shard named in {au_dir}/index.parquet "
                                    "is missing; re-run the au_shards stage")
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _tar_key(member.name)
                if ext == "jpg" and key in wanted:
                    out[key] = tar.extractfile(member).read()
    return out


def load_probe_frames(au_dir: str | Path, cfg: ProbeParams, seed: int) -> ProbeFrames:
    """Select the probe frames of one AU dataset and read their JPEG bytes."""
    au_dir = Path(au_dir)
    index_path = au_dir / "index.parquet"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: missing; run the au_shards stage "
                                "(`dvc repro au_shards`)")
    index = pd.read_parquet(index_path, columns=["key", "subject", "shard"])
    sel = select_frames(index, cfg.frames_per_subject, cfg.train_fraction, seed)
    by_shard: dict[str, set[str]] = {}
    for key, shard in zip(sel["key"], sel["shard"]):
        by_shard.setdefault(str(shard), set()).add(str(key))
    jpegs = read_jpegs(au_dir, by_shard)
    lost = [k for k in sel["key"] if k not in jpegs]
    if lost:
        raise ValueError(f"{au_dir}: {len(lost)} frames listed in index.parquet are not in "
                         f"their shard (e.g. {lost[0]!r}); re-run the au_shards stage")
    subjects = sorted(sel["subject"].astype(str).unique())
    label_of = {s: i for i, s in enumerate(subjects)}
    frames = ProbeFrames(
        keys=[str(k) for k in sel["key"]], subjects=subjects,
        labels=np.array([label_of[str(s)] for s in sel["subject"]], dtype=np.int64),
        is_train=sel["is_train"].to_numpy(dtype=bool),
        jpegs=[jpegs[str(k)] for k in sel["key"]])
    log.info("probe frames from %s: %d subjects, %d train / %d test frames", au_dir,
             frames.n_subjects, int(frames.is_train.sum()), int((~frames.is_train).sum()))
    return frames


# --------------------------------------------------------------------------- backbones
def list_backbones(run_dir: Path) -> dict[int, Path]:
    """``{epoch: path}`` of the saved ``backbones/epoch_<E:03d>.pt`` of a finetune run."""
    bdir = run_dir / "backbones"
    found = {int(m[1]): p for p in bdir.glob("epoch_*.pt") if (m := _EPOCH_RE.match(p.name))}
    if not found:
        raise FileNotFoundError(f"{bdir}: no epoch_<E>.pt backbones; set "
                                "finetune.save_backbone_epochs (e.g. [0, 1, 2]) and re-run the "
                                "finetune stages")
    return dict(sorted(found.items()))


def load_backbone(path: Path, drop_path: float = 0.0) -> tuple[nn.Module, dict, str]:
    """Rebuild the finetuned encoder (mean pool + fc_norm, no head) from a backbone file.

    Args:
        path: ``backbones/epoch_<E>.pt``.
        drop_path: stochastic depth of the rebuilt model (active only in training mode; the
            authors' probe keeps the finetuning rate on while it trains).

    Returns:
        (model in eval mode without gradients, its config, a digest of its weights: equal
        digests mean equal backbones, e.g. the epoch-0 backbone every run starts from).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: expected {{'model': state_dict, 'config': {{...}}}} as "
                         "written by the finetune stage")
    cfg = ckpt["config"]
    try:
        model = build_vit(cfg["model_size"], int(cfg["img_size"]), cfg.get("patch_size"),
                          drop_path_rate=drop_path, global_pool="avg")
    except KeyError as e:
        raise ValueError(f"{path}: config lacks {e.args[0]!r} (needs model_size, img_size, "
                         "patch_size)") from None
    # A head is not part of the backbone contract; tolerate one, but nothing else unexpected.
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match a {cfg['model_size']} ViT with mean "
                         f"pooling + fc_norm: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}")
    digest = hashlib.sha256()
    for k in sorted(state):
        digest.update(k.encode())
        digest.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    model.eval().requires_grad_(False)
    return model, dict(cfg), digest.hexdigest()


# --------------------------------------------------------------------------- probing
def make_recipe(cfg: ProbeParams, ft: FinetuneParams) -> Recipe:
    """The authors' probe settings: the finetuning optimiser, the probe's epochs and warmup."""
    return Recipe(epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                  batch_size=ft.batch_size, blr=ft.blr, min_lr=ft.min_lr,
                  weight_decay=ft.weight_decay)


def probe_backbone(model: nn.Module, model_cfg: dict, frames: ProbeFrames, cfg: ProbeParams,
                   ft: FinetuneParams, seed: int, device: torch.device) -> tuple[dict, np.ndarray]:
    """Both identity probes of one backbone (from :func:`load_backbone`).

    Returns:
        (``{"recipe": {...}, "converged": {...}}``, the (N, D) clean features of every probe
        frame).
    """
    from pipeline.finetune import build_transforms  # timm/torchvision only when probing

    img = int(model_cfg["img_size"])
    train_tf, eval_tf = build_transforms(dataclasses.replace(ft, image_size=img))
    y = torch.tensor(frames.labels)  # (N,) copies: the arrays may be read-only views
    tr = torch.tensor(frames.is_train)  # (N,) bool
    clean = extract_features(model, JpegFrames(frames.jpegs, frames.labels, eval_tf),
                             cfg.batch_size, cfg.num_workers, device)  # (N, D)
    train_idx = np.flatnonzero(frames.is_train)
    train_set = JpegFrames([frames.jpegs[i] for i in train_idx], frames.labels[train_idx],
                           train_tf)
    recipe = recipe_probe(model, train_set, frames.n_subjects, make_recipe(cfg, ft),
                          clean_train=clean[tr], y_train=y[tr], clean_test=clean[~tr],
                          y_test=y[~tr], seed=seed, num_workers=cfg.num_workers, device=device)
    converged = converged_probe(clean[tr], y[tr], clean[~tr], y[~tr], frames.n_subjects,
                                max_iter=cfg.converged_max_iter)
    return {"recipe": recipe, "converged": converged}, clean.numpy()


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


PROBES = ("recipe", "converged")
# The finetune params the probe stage reads (dvc.yaml lists the same keys).
PROBE_FINETUNE_KEYS = ("runs", "batch_size", "blr", "min_lr", "weight_decay", "drop_path",
                       "augment")
PROBE_NAMES = {"recipe": "authors' recipe", "converged": "converged, standardised"}


def _probe_run_detail(run_dir: Path, frames: ProbeFrames, cfg: ProbeParams,
                      ft: FinetuneParams, seed: int, device: torch.device,
                      cache: dict[str, tuple[dict, np.ndarray]] | None = None
                      ) -> tuple[dict, np.ndarray]:
    """Probe every saved epoch of one run; also return the final epoch's (N, D) features.

    ``cache`` maps a backbone's weight digest to its probe results, so identical backbones
    (every run's epoch 0 is the same pretrained encoder) are probed once; one cache per
    dataset (the results depend on the frames). A cached entry's features may be None when
    the backbone is no run's final epoch (:func:`_probe_shared` gathers only those).
    """
    cache = {} if cache is None else cache
    per_epoch: dict[str, dict] = {}
    final_feats, model_size = None, None
    for epoch, path in list_backbones(run_dir).items():
        model, model_cfg, digest = load_backbone(path, drop_path=ft.drop_path)
        model_size = model_cfg.get("model_size")
        if digest not in cache:
            cache[digest] = probe_backbone(model, model_cfg, frames, cfg, ft, seed, device)
        res, final_feats = cache[digest]
        per_epoch[str(epoch)] = res
        log.info("probe %s epoch %d: identity accuracy %s (chance %.1f%%)",
                 run_dir.relative_to(run_dir.parent.parent), epoch,
                 "; ".join(f"{PROBE_NAMES[k]} {res[k]['test_accuracy']:.1f}% (train "
                           f"{res[k]['train_accuracy']:.1f}%)" for k in PROBES), frames.chance)

    def column(probe: str, key: str) -> dict[str, float]:
        return {e: r[probe][key] for e, r in per_epoch.items()}

    def underfit(probe: str) -> list[int]:
        return [int(e) for e, r in per_epoch.items()
                if r[probe]["train_accuracy"] < cfg.underfit_below]

    recipe = make_recipe(cfg, ft)
    result = {
        # "epochs" is the authors' recipe: what the paper's Figure 3 plots.
        "epochs": column("recipe", "test_accuracy"),
        "train_accuracy": column("recipe", "train_accuracy"),
        "loss": column("recipe", "loss"),
        "converged": {"epochs": column("converged", "test_accuracy"),
                      "train_accuracy": column("converged", "train_accuracy"),
                      "iterations": column("converged", "iterations")},
        "underfit": {p: underfit(p) for p in PROBES},
        "underfit_below": cfg.underfit_below,
        "recipe": {**dataclasses.asdict(recipe), "lr": recipe.lr, "drop_path": ft.drop_path,
                   "loss": "one-hot BCE", "head": "bias-free linear, trunc-normal std 2e-5"},
        "chance": frames.chance, "n_subjects": frames.n_subjects,
        "n_train": int(frames.is_train.sum()), "n_test": int((~frames.is_train).sum()),
        "unit": "percent", "model_size": model_size, "subjects": frames.subjects,
    }
    return result, final_feats


def probe_run(run_dir: str | Path, au_dir: str | Path, cfg: ProbeParams, ft: FinetuneParams,
              *, seed: int, frames: ProbeFrames | None = None,
              device: str | torch.device | None = None) -> dict:
    """Identity-probe every saved backbone epoch of one finetune run with both probes.

    Args:
        run_dir: ``data/finetune/<variant>/<dataset>-<fold>``.
        au_dir: that dataset's AU shards, ``data/au_shards/<dataset>``.
        cfg: the ``probe`` params section.
        ft: the ``finetune`` params section (the authors' recipe uses its optimiser settings,
            augmentation and drop path).
        seed: frame selection and probe training.
        frames: pre-loaded probe frames (``load_probe_frames``) to share across runs.
        device: where the backbone runs; default CUDA when available.

    Returns:
        ``{"epochs": {E: recipe test accuracy %}, "train_accuracy": {E: ...}, "loss",
        "converged": {"epochs", "train_accuracy", "iterations"}, "underfit": {probe: [E]},
        "recipe", "chance", "n_subjects", "n_train", "n_test", "unit", "model_size",
        "subjects"}``.
    """
    frames = frames if frames is not None else load_probe_frames(au_dir, cfg, seed)
    result, _ = _probe_run_detail(Path(run_dir), frames, cfg, ft, seed, _default_device(device))
    return result


# --------------------------------------------------------------------------- figures
def _curve(res: dict, probe: str, key: str) -> dict[int, float]:
    """``{epoch: value}`` of one probe's test (``epochs``) or training accuracy in a result."""
    d = res if probe == "recipe" else res["converged"]
    return {int(e): v for e, v in d[key].items()}


def plot_identity_vs_epoch(results: dict[str, dict[str, dict]], path: Path) -> None:
    """Figure 3: identity accuracy vs AU-training epoch; a row per dataset, a column per probe.

    ``results[variant][run]`` is a ``probe_run`` result. Thin lines are folds' test
    accuracy, the thick line their mean at the epochs all folds saved, the dashed line the
    mean training accuracy; a hollow marker is an epoch where a fold's probe underfits
    (training accuracy below ``underfit_below``). Chance is dotted grey.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    datasets = sorted({parse_run(r)[0] for v in results.values() for r in v})
    fig, axes = plt.subplots(len(datasets), len(PROBES), squeeze=False,
                             figsize=(5.5 * len(PROBES), 4 * len(datasets)))
    for row, ds in zip(axes, datasets):
        for ax, probe in zip(row, PROBES):
            chance, threshold = None, None
            for variant, runs in results.items():
                curves = [res for r, res in runs.items() if parse_run(r)[0] == ds]
                if not curves:
                    continue
                color = VARIANT_COLORS.get(variant)
                tests = [_curve(res, probe, "epochs") for res in curves]
                trains = [_curve(res, probe, "train_accuracy") for res in curves]
                for t in tests:
                    ax.plot(sorted(t), [t[e] for e in sorted(t)], color=color, alpha=0.3, lw=1)
                common = sorted(set.intersection(*[set(t) for t in tests]))
                mean = [float(np.mean([t[e] for t in tests])) for e in common]
                mean_tr = [float(np.mean([t[e] for t in trains])) for e in common]
                under = [any(e in res["underfit"][probe] for res in curves) for e in common]
                name = VARIANT_NAMES.get(variant, variant)
                ax.plot(common, mean, color=color, lw=2.2,
                        label=f"{name} test (mean of {len(curves)} fold"
                              f"{'s' if len(curves) > 1 else ''})")
                ax.scatter(common, mean, s=28, zorder=3, edgecolors=color,
                           facecolors=["none" if u else color for u in under])
                ax.plot(common, mean_tr, color=color, lw=1.2, ls="--", label=f"{name} train")
                chance, threshold = curves[0]["chance"], curves[0]["underfit_below"]
            if chance is not None:
                ax.axhline(chance, color="gray", ls=":", lw=1, label=f"chance ({chance:.1f}%)")
            ax.set(title=f"{ds}: {PROBE_NAMES[probe]} probe", xlabel="AU training epoch",
                   ylabel="identity accuracy (%)", ylim=(-2, 102))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, title=(f"hollow: a fold's probe underfits (train < "
                                         f"{threshold:g}%)" if threshold is not None else None),
                      title_fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_tsne(features: dict[str, np.ndarray], frames: ProbeFrames, n_subjects: int,
              title: str, path: Path, seed: int) -> None:
    """Figure 4: t-SNE of final-epoch features, coloured by subject, one panel per variant.

    Args:
        features: ``{variant: (N, D) features}`` of the same probe frames.
        n_subjects: plot at most this many subjects (the paper shows 20 of BP4D's 41).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    k = min(n_subjects, frames.n_subjects)
    chosen = np.sort(rng.choice(frames.n_subjects, size=k, replace=False))
    mask = np.isin(frames.labels, chosen)
    labels = frames.labels[mask]
    cmap = plt.get_cmap("tab20" if k <= 20 else "turbo", k)
    colour_of = {s: cmap(i) for i, s in enumerate(chosen)}
    fig, axes = plt.subplots(1, len(features), figsize=(5 * len(features), 5), squeeze=False)
    for ax, (variant, feats) in zip(axes[0], features.items()):
        x = feats[mask]
        # Perplexity must stay below the number of points; small fixtures need a small one.
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
        emb = TSNE(n_components=2, perplexity=perplexity, init="pca",
                   random_state=seed).fit_transform(x)  # (n, 2)
        ax.scatter(emb[:, 0], emb[:, 1], c=[colour_of[s] for s in labels], s=6)
        ax.set(title=f"{VARIANT_NAMES.get(variant, variant)}", xticks=[], yticks=[])
    fig.suptitle(f"{title}: t-SNE of final-epoch backbone features, {k} subjects")
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------- stage entry
def _headline(results: dict[str, dict[str, dict]]) -> dict:
    """Per dataset and variant, mean over folds of each probe's epoch-0, epoch-1 and final
    test accuracy and final training accuracy; ``recipe_iat_over_fmae`` is FMAE-IAT's final
    authors'-recipe accuracy as a fraction of FMAE's (the paper: 27.9 / 83 = 0.34)."""
    out: dict[str, dict] = {}
    by_ds: dict[str, dict[str, list[dict]]] = {}
    for variant, runs in results.items():
        for run, res in runs.items():
            by_ds.setdefault(parse_run(run)[0], {}).setdefault(variant, []).append(res)
    for ds, variants in by_ds.items():
        first = next(iter(variants.values()))[0]
        d = out.setdefault(ds, {"chance": first["chance"], "n_subjects": first["n_subjects"]})
        for variant, res_list in variants.items():
            finals = [max(int(k) for k in res["epochs"]) for res in res_list]
            v: dict = {"folds": len(res_list), "final_epoch": int(max(finals))}
            for probe in PROBES:
                tests = [_curve(res, probe, "epochs") for res in res_list]
                trains = [_curve(res, probe, "train_accuracy") for res in res_list]
                p = {"final": float(np.mean([t[f] for t, f in zip(tests, finals)])),
                     "train_final": float(np.mean([t[f] for t, f in zip(trains, finals)])),
                     "underfit_final": sum(f in res["underfit"][probe]
                                           for res, f in zip(res_list, finals))}
                for e in (0, 1):
                    if all(e in t for t in tests):
                        p[f"epoch{e}"] = float(np.mean([t[e] for t in tests]))
                v[probe] = p
            d[variant] = v
        if "fmae" in d and "iat" in d:
            fm, ia = d["fmae"]["recipe"]["final"], d["iat"]["recipe"]["final"]
            d["recipe_iat_over_fmae"] = ia / fm if fm > 0 else None
            d["converged_iat_minus_fmae"] = (d["iat"]["converged"]["final"]
                                             - d["fmae"]["converged"]["final"])
    return round_floats(out)


def _probe_shared(jobs: list[tuple[str, Path, bool]], frames: dict[str, ProbeFrames],
                  cfg: ProbeParams, ft: FinetuneParams, seed: int, device: torch.device,
                  info: DistInfo) -> dict[str, dict[str, tuple[dict, np.ndarray | None]]]:
    """Probe the distinct backbones of ``jobs`` split across ranks; results on rank 0.

    Args:
        jobs: (dataset, backbone path, is some run's final epoch) of every saved backbone.
        frames: each dataset's probe frames (loaded on every rank).

    Rank r digests backbones r, r + R, ...; the digests are exchanged, and the distinct
    (dataset, digest) pairs, in job order, are dealt round-robin to the ranks, each probed
    exactly as one process would (every probe is seeded by ``seed`` alone). Rank 0 gets
    ``{dataset: {digest: (results, final-epoch features or None)}}``, the caches
    :func:`_probe_run_detail` reads; the other ranks get ``{}``.
    """
    mine = {i: load_backbone(jobs[i][1])[2] for i in range(info.rank, len(jobs),
                                                           info.world_size)}
    digest = {i: d for part in all_gather_objects(mine) for i, d in part.items()}
    tasks: dict[tuple[str, str], list] = {}  # (dataset, digest) -> [path, features needed]
    for i, (ds, path, final) in enumerate(jobs):
        task = tasks.setdefault((ds, digest[i]), [path, False])
        task[1] = task[1] or final
    done: dict[tuple[str, str], tuple[dict, np.ndarray | None]] = {}
    for k, ((ds, dg), (path, final)) in enumerate(tasks.items()):
        if k % info.world_size != info.rank:
            continue
        model, model_cfg, _ = load_backbone(path, drop_path=ft.drop_path)
        res, feats = probe_backbone(model, model_cfg, frames[ds], cfg, ft, seed, device)
        done[(ds, dg)] = (res, feats if final else None)
        log.info("rank %d probed %s (%d of %d distinct backbones)", info.rank, path, k + 1,
                 len(tasks))
    caches: dict[str, dict[str, tuple[dict, np.ndarray | None]]] = {}
    for part in gather_objects_to_main(done) or []:
        for (ds, dg), value in part.items():
            caches.setdefault(ds, {})[dg] = value
    return caches


def probe_all(finetune_dir: str | Path, au_dir_root: str | Path, out_dir: str | Path,
              cfg: ProbeParams, ft: FinetuneParams, runs: list[str], seed: int, tracker,
              variants: tuple[str, ...] = VARIANTS,
              device: str | torch.device | None = None,
              dist_info: DistInfo | None = None) -> dict:
    """Probe every run of every variant, write JSONs, Figures 3-4 and ``metrics.json``.

    Under torchrun (``dist_info`` with R > 1 processes) the distinct backbones are split
    across the ranks (:func:`_probe_shared`) and rank 0 assembles, writes and logs; every
    probe is seeded alone, so the results do not depend on R. Every rank returns the
    metrics.

    Args:
        finetune_dir: ``data/finetune`` (reads ``<variant>/<run>/backbones``).
        au_dir_root: ``data/au_shards`` (reads ``<dataset>/``).
        out_dir: ``data/probe``.
        cfg: the ``probe`` params section.
        ft: the ``finetune`` params section (the authors' recipe trains with its settings).
        runs: ``finetune.runs`` (``<dataset>-<fold>``).
        seed: top-level seed.
        tracker: a ``pipeline.tracking.Tracker`` (metrics per epoch, figures as artifacts).
        dist_info: this process's place in a torchrun launch; None = one process.

    Returns:
        The headline metrics written to ``out_dir/metrics.json``.
    """
    finetune_dir, au_dir_root, out_dir = Path(finetune_dir), Path(au_dir_root), Path(out_dir)
    dev = dist_info.device if dist_info is not None and device is None \
        else _default_device(device)
    for variant in variants:
        for run in runs:
            if not (finetune_dir / variant / run).is_dir():
                raise FileNotFoundError(f"{finetune_dir / variant / run}: finetune run missing; "
                                        f"run `dvc repro finetune_{variant}`")
    results: dict[str, dict[str, dict]] = {v: {} for v in variants}
    frames_cache: dict[str, ProbeFrames] = {}
    # One cache per dataset: every dataset's epoch-0 backbone holds the same weights.
    probe_caches: dict[str, dict[str, tuple[dict, np.ndarray | None]]] = {}
    if dist_info is not None and dist_info.distributed:
        for ds in dict.fromkeys(parse_run(run)[0] for run in runs):
            frames_cache[ds] = load_probe_frames(au_dir_root / ds, cfg, seed)
        jobs = [(parse_run(run)[0], path, epoch == max(backbones))
                for run in runs for variant in variants
                for backbones in [list_backbones(finetune_dir / variant / run)]
                for epoch, path in backbones.items()]
        probe_caches = _probe_shared(jobs, frames_cache, cfg, ft, seed, dev, dist_info)
        if not dist_info.is_main:
            return broadcast_object(None)  # rank 0's metrics, once it has written them
    for run in runs:
        ds = parse_run(run)[0]
        if ds not in frames_cache:
            # Same frames for every fold and variant of a dataset (the draw depends only on the
            # seed and the dataset's index), so the curves differ only by the backbone.
            frames_cache[ds] = load_probe_frames(au_dir_root / ds, cfg, seed)
        frames = frames_cache[ds]
        final_feats = {}
        for variant in variants:
            res, feats = _probe_run_detail(finetune_dir / variant / run, frames, cfg, ft, seed,
                                           dev, probe_caches.setdefault(ds, {}))
            results[variant][run] = res
            final_feats[variant] = feats
            atomic_write_json(out_dir / variant / f"{run}.json", res)
            for epoch in res["epochs"]:
                tracker.log_metrics({f"probe_recipe/{variant}/{run}": res["epochs"][epoch],
                                     f"probe_recipe_train/{variant}/{run}":
                                         res["train_accuracy"][epoch],
                                     f"probe_converged/{variant}/{run}":
                                         res["converged"]["epochs"][epoch]}, step=int(epoch))
        tsne_path = out_dir / f"tsne_{run}.png"
        plot_tsne(final_feats, frames, cfg.tsne_subjects, run, tsne_path, seed)
        tracker.log_artifact(tsne_path, "probe")
    fig_path = out_dir / "identity_vs_epoch.png"
    plot_identity_vs_epoch(results, fig_path)
    tracker.log_artifact(fig_path, "probe")
    metrics = _headline(results)
    atomic_write_json(out_dir / "metrics.json", metrics)
    for ds, d in metrics.items():
        tracker.log_metrics({f"probe/{ds}/{v}_{p}_final": d[v][p]["final"]
                             for v in variants if v in d for p in PROBES}
                            | {f"probe/{ds}/chance": d["chance"]})
    log.info("identity probe done: %s", {
        ds: {v: {p: round(d[v][p]["final"], 1) for p in PROBES} for v in variants if v in d}
        for ds, d in metrics.items()})
    if dist_info is not None and dist_info.distributed:
        return broadcast_object(metrics)
    return metrics


def read_probe_results(probe_dir: str | Path) -> dict[str, dict[str, dict]]:
    """``{variant: {run: result}}`` from ``probe_dir/<variant>/<run>.json`` (for the tables)."""
    probe_dir = Path(probe_dir)
    out: dict[str, dict[str, dict]] = {}
    for variant in VARIANTS:
        for p in sorted((probe_dir / variant).glob("*.json")):
            out.setdefault(variant, {})[p.stem] = read_json(p)
    return out
