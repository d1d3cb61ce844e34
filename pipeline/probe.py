"""Identity linear probing of AU backbones (paper section 5.1, Figures 3 and 4).

The paper's evidence for identity shortcut learning: freeze the backbone of an AU model
(encoder + fc_norm), train a bias-free linear classifier on its pooled features to recognise
the subject, and watch that accuracy over the AU model's training epochs (Figure 3: FMAE goes
above 50% after one epoch and reaches 83% on BP4D; FMAE-IAT stays at 4.6% after one epoch and
27.9% at epoch 19; chance 1/41). Figure 4 shows a t-SNE of the same features coloured by
subject. See method.md section 4.

Protocol (as the paper): every subject of the dataset (not only one fold's), a seeded random
``frames_per_subject`` frames each, split per subject into ``train_fraction`` train / rest
test. The same frames are used for every checkpoint, variant and fold of a dataset, so the
curves differ only by the backbone. Features are extracted once per checkpoint; the linear
probe then trains on the cached features, which is cheap.

Inputs follow docs/design.md: ``data/finetune/<variant>/<dataset>-<fold>/backbones/
epoch_<E:03d>.pt`` and the AU shards ``data/au_shards/<dataset>/``. Accuracies are written in
percent (``"unit": "percent"``), like the paper and like the finetune stage's F1.
"""
from __future__ import annotations

import io
import logging
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.io import atomic_write_json, read_json, round_floats, save_figure
from pipeline.models.vit import build_vit
from pipeline.params import ProbeParams, parse_run

log = logging.getLogger(__name__)

VARIANTS = ("fmae", "iat")
VARIANT_NAMES = {"fmae": "FMAE", "iat": "FMAE-IAT"}
VARIANT_COLORS = {"fmae": "tab:red", "iat": "tab:blue"}  # Figure 3: FMAE is the red line
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


class _JpegFrames(Dataset):
    """Decode, resize to the backbone's size (bicubic, as the eval transform) and normalise."""

    def __init__(self, jpegs: list[bytes], img_size: int):
        self.jpegs, self.img_size = jpegs, img_size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image
        img = Image.open(io.BytesIO(self.jpegs[i])).convert("RGB")
        if img.size != (self.img_size, self.img_size):
            img = img.resize((self.img_size, self.img_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std  # (3, H, W)


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


def load_backbone(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild the finetuned encoder (mean pool + fc_norm, no head) from a backbone file."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: expected {{'model': state_dict, 'config': {{...}}}} as "
                         "written by the finetune stage")
    cfg = ckpt["config"]
    try:
        model = build_vit(cfg["model_size"], int(cfg["img_size"]), cfg.get("patch_size"),
                          global_pool="avg")
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
    model.eval().requires_grad_(False)
    return model, dict(cfg)


@torch.inference_mode()
def extract_features(model: nn.Module, frames: ProbeFrames, img_size: int, batch_size: int,
                     num_workers: int, device: torch.device) -> torch.Tensor:
    """Pooled backbone features of every probe frame: (N, D) float32 on the CPU."""
    loader = DataLoader(_JpegFrames(frames.jpegs, img_size), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers)
    model = model.to(device)
    out = []
    for x in loader:                                  # x: (B, 3, H, W)
        tokens = model.forward_features(x.to(device))  # (B, 1 + L, D), no final norm ("avg")
        out.append(model.forward_head(tokens, pre_logits=True).float().cpu())  # (B, D)
    return torch.cat(out)


# --------------------------------------------------------------------------- linear probe
def train_linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                       y_test: torch.Tensor, n_classes: int, *, epochs: int, lr: float,
                       batch_size: int, seed: int) -> tuple[float, float]:
    """Train a bias-free ``Linear(D, n_classes)`` with cross-entropy (Adam) on fixed features.

    Args:
        x_train, x_test: (N, D) features; y_train, y_test: (N,) class indices.

    Returns:
        (test accuracy, train accuracy) in percent.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the layer's init
    head = nn.Linear(x_train.shape[1], n_classes, bias=False)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    n = len(x_train)
    # The matmuls here are tiny (B x D x n_subjects): thread synchronisation costs more than
    # it saves (measured 100x slower with 2 threads on a busy 2-core machine), so train the
    # probe single-threaded and restore the setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                idx = order[i:i + batch_size]
                loss = nn.functional.cross_entropy(head(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            test_acc = (head(x_test).argmax(1) == y_test).float().mean().item() * 100.0
            train_acc = (head(x_train).argmax(1) == y_train).float().mean().item() * 100.0
    finally:
        torch.set_num_threads(threads)
    return test_acc, train_acc


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _probe_run_detail(run_dir: Path, frames: ProbeFrames, cfg: ProbeParams, seed: int,
                      device: torch.device) -> tuple[dict, np.ndarray]:
    """Probe every saved epoch of one run; also return the final epoch's (N, D) features."""
    backbones = list_backbones(run_dir)
    y = torch.tensor(frames.labels)   # (N,) copies: the arrays may be read-only views
    tr = torch.tensor(frames.is_train)  # (N,) bool
    accs, train_accs, final_feats, model_cfg = {}, {}, None, {}
    for epoch, path in backbones.items():
        model, model_cfg = load_backbone(path)
        feats = extract_features(model, frames, int(model_cfg["img_size"]), cfg.batch_size,
                                 cfg.num_workers, device)  # (N, D)
        acc, train_acc = train_linear_probe(feats[tr], y[tr], feats[~tr], y[~tr],
                                            frames.n_subjects, epochs=cfg.epochs, lr=cfg.lr,
                                            batch_size=cfg.batch_size, seed=seed)
        accs[str(epoch)], train_accs[str(epoch)] = acc, train_acc
        final_feats = feats.numpy()
        log.info("probe %s epoch %d: identity accuracy %.1f%% (train %.1f%%, chance %.1f%%)",
                 run_dir.relative_to(run_dir.parent.parent), epoch, acc, train_acc,
                 frames.chance)
    result = {
        "epochs": accs, "train_accuracy": train_accs, "chance": frames.chance,
        "n_subjects": frames.n_subjects, "n_train": int(frames.is_train.sum()),
        "n_test": int((~frames.is_train).sum()), "unit": "percent",
        "model_size": model_cfg.get("model_size"), "subjects": frames.subjects,
    }
    return result, final_feats


def probe_run(run_dir: str | Path, au_dir: str | Path, cfg: ProbeParams, *, seed: int,
              frames: ProbeFrames | None = None,
              device: str | torch.device | None = None) -> dict:
    """Identity-probe every saved backbone epoch of one finetune run.

    Args:
        run_dir: ``data/finetune/<variant>/<dataset>-<fold>``.
        au_dir: that dataset's AU shards, ``data/au_shards/<dataset>``.
        cfg: the ``probe`` params section.
        seed: frame selection and probe initialisation.
        frames: pre-loaded probe frames (``load_probe_frames``) to share across runs.
        device: where features are extracted; default CUDA when available.

    Returns:
        ``{"epochs": {E: test accuracy %}, "train_accuracy": {...}, "chance", "n_subjects",
        "n_train", "n_test", "unit", "model_size", "subjects"}``.
    """
    frames = frames if frames is not None else load_probe_frames(au_dir, cfg, seed)
    result, _ = _probe_run_detail(Path(run_dir), frames, cfg, seed, _default_device(device))
    return result


# --------------------------------------------------------------------------- figures
def plot_identity_vs_epoch(results: dict[str, dict[str, dict]], path: Path) -> None:
    """Figure 3: identity accuracy vs AU-training epoch, one panel per dataset.

    ``results[variant][run]`` is a ``probe_run`` result. Thin lines are folds, the thick line
    is the mean over folds at the epochs all folds saved; chance is dashed.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    datasets = sorted({parse_run(r)[0] for v in results.values() for r in v})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        chance = None
        for variant, runs in results.items():
            curves = {r: res for r, res in runs.items() if parse_run(r)[0] == ds}
            if not curves:
                continue
            color = VARIANT_COLORS.get(variant)
            for res in curves.values():
                e = sorted(int(k) for k in res["epochs"])
                ax.plot(e, [res["epochs"][str(k)] for k in e], color=color, alpha=0.3, lw=1)
                chance = res["chance"]
            common = sorted(set.intersection(*[{int(k) for k in res["epochs"]}
                                               for res in curves.values()]))
            mean = [np.mean([res["epochs"][str(k)] for res in curves.values()]) for k in common]
            ax.plot(common, mean, color=color, lw=2.2, marker="o", ms=3,
                    label=f"{VARIANT_NAMES.get(variant, variant)} (mean of {len(curves)} "
                          f"fold{'s' if len(curves) > 1 else ''})")
        if chance is not None:
            ax.axhline(chance, color="gray", ls="--", lw=1, label=f"chance ({chance:.1f}%)")
        ax.set(title=f"{ds}: identity linear probe", xlabel="AU training epoch",
               ylabel="identity accuracy (%)", ylim=(-2, 102))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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
    """Per dataset: final-epoch (and epoch-1) probe accuracy per variant, mean over folds."""
    out: dict[str, dict] = {}
    for variant, runs in results.items():
        for run, res in runs.items():
            ds = parse_run(run)[0]
            d = out.setdefault(ds, {"chance": res["chance"], "n_subjects": res["n_subjects"]})
            v = d.setdefault(variant, {"final": [], "epoch1": [], "final_epoch": []})
            final = max(int(k) for k in res["epochs"])
            v["final"].append(res["epochs"][str(final)])
            v["final_epoch"].append(final)
            if "1" in res["epochs"]:
                v["epoch1"].append(res["epochs"]["1"])
    for ds, d in out.items():
        for variant in VARIANTS:
            if variant not in d:
                continue
            v = d[variant]
            d[variant] = {"final": float(np.mean(v["final"])), "folds": len(v["final"]),
                          "final_epoch": int(max(v["final_epoch"]))}
            if v["epoch1"]:
                d[variant]["epoch1"] = float(np.mean(v["epoch1"]))
        if "fmae" in d and "iat" in d:
            d["iat_minus_fmae"] = d["iat"]["final"] - d["fmae"]["final"]
    return round_floats(out)


def probe_all(finetune_dir: str | Path, au_dir_root: str | Path, out_dir: str | Path,
              cfg: ProbeParams, runs: list[str], seed: int, tracker,
              variants: tuple[str, ...] = VARIANTS,
              device: str | torch.device | None = None) -> dict:
    """Probe every run of every variant, write JSONs, Figures 3-4 and ``metrics.json``.

    Args:
        finetune_dir: ``data/finetune`` (reads ``<variant>/<run>/backbones``).
        au_dir_root: ``data/au_shards`` (reads ``<dataset>/``).
        out_dir: ``data/probe``.
        cfg: the ``probe`` params section.
        runs: ``finetune.runs`` (``<dataset>-<fold>``).
        seed: top-level seed.
        tracker: a ``pipeline.tracking.Tracker`` (metrics per epoch, figures as artifacts).

    Returns:
        The headline metrics written to ``out_dir/metrics.json``.
    """
    finetune_dir, au_dir_root, out_dir = Path(finetune_dir), Path(au_dir_root), Path(out_dir)
    dev = _default_device(device)
    for variant in variants:
        for run in runs:
            if not (finetune_dir / variant / run).is_dir():
                raise FileNotFoundError(f"{finetune_dir / variant / run}: finetune run missing; "
                                        f"run `dvc repro finetune_{variant}`")
    results: dict[str, dict[str, dict]] = {v: {} for v in variants}
    frames_cache: dict[str, ProbeFrames] = {}
    for run in runs:
        ds = parse_run(run)[0]
        if ds not in frames_cache:
            # Same frames for every fold and variant of a dataset (the draw depends only on the
            # seed and the dataset's index), so the curves differ only by the backbone.
            frames_cache[ds] = load_probe_frames(au_dir_root / ds, cfg, seed)
        frames = frames_cache[ds]
        final_feats = {}
        for variant in variants:
            res, feats = _probe_run_detail(finetune_dir / variant / run, frames, cfg, seed, dev)
            results[variant][run] = res
            final_feats[variant] = feats
            atomic_write_json(out_dir / variant / f"{run}.json", res)
            for epoch, acc in res["epochs"].items():
                tracker.log_metrics({f"probe_acc/{variant}/{run}": acc}, step=int(epoch))
        tsne_path = out_dir / f"tsne_{run}.png"
        plot_tsne(final_feats, frames, cfg.tsne_subjects, run, tsne_path, seed)
        tracker.log_artifact(tsne_path, "probe")
    fig_path = out_dir / "identity_vs_epoch.png"
    plot_identity_vs_epoch(results, fig_path)
    tracker.log_artifact(fig_path, "probe")
    metrics = _headline(results)
    atomic_write_json(out_dir / "metrics.json", metrics)
    for ds, d in metrics.items():
        tracker.log_metrics({f"probe/{ds}/{v}_final": d[v]["final"] for v in variants if v in d}
                            | {f"probe/{ds}/chance": d["chance"]})
    log.info("identity probe done: %s", {ds: {v: round(d[v]["final"], 1) for v in variants
                                                if v in d} for ds, d in metrics.items()})
    return metrics


def read_probe_results(probe_dir: str | Path) -> dict[str, dict[str, dict]]:
    """``{variant: {run: result}}`` from ``probe_dir/<variant>/<run>.json`` (for the tables)."""
    probe_dir = Path(probe_dir)
    out: dict[str, dict[str, dict]] = {}
    for variant in VARIANTS:
        for p in sorted((probe_dir / variant).glob("*.json")):
            out.setdefault(variant, {})[p.stem] = read_json(p)
    return out
