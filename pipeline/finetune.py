"""AU finetuning of one dataset fold, as FMAE or FMAE-IAT (paper sections 3.2 and 4).

Follows method.md section 3 (the authors' finetuning recipe) and section 7 (how F1 is
measured):

- model: :class:`pipeline.models.au_model.AUModel` on the pretrained encoder (mean-pooled
  patch tokens + fc_norm); variant ``fmae`` has only the AU head, ``iat`` adds the gradient
  reversal layer (strength lambda) and an ID head. By default the ID head is the reference's:
  one class per subject of the whole dataset (``finetune.id_classes: dataset``), one-hot BCE
  (``id_loss: bce``), PyTorch's default init (``id_head_init: default``);
- the position embedding (fixed sin-cos in pretraining) is trainable here, in the lowest
  layer-decay group, as in the reference (timm's ViT makes it a parameter);
- optimiser: AdamW (default betas), weight decay 0.05 except biases/norms/pos/cls, layer-wise
  lr decay, ``lr = blr * batch / 256``, per-iteration linear warmup then half-cycle cosine to
  ``min_lr``, no gradient clipping, bf16 autocast where allowed; the last partial training
  batch is dropped (the reference's ``drop_last=True``);
- data: AU WebDataset shards (docs/design.md ``au_shards`` contract), timm training transform
  (RandomResizedCrop, flip, RandAugment, RandomErasing), plain bicubic resize for evaluation;
- every epoch: evaluate the fold's test subjects (and a validation split of training subjects
  when ``val_fraction > 0``), save the backbone at the chosen epochs for the identity probe,
  and append per-frame probabilities to ``predictions.parquet``.

Outputs (docs/design.md ``finetune`` contract): ``metrics.json``, ``history.csv``,
``predictions.parquet``, ``backbones/epoch_<E:03d>.pt`` and the final AU model
``model.safetensors`` (:mod:`pipeline.au_export`, read by ``fmae-iat predict``). A killed
run's ``.tmp-*`` files in the output folder are removed when the next run starts; settings
and the pretrained checkpoint are checked before any training.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import math
import random
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import metrics as M
from pipeline.au_export import MODEL_NAME as MODEL_FILE
from pipeline.au_export import describe_eval_transform, save_au_model
from pipeline.distributed import (DistInfo, all_gather_objects, all_reduce_sum, barrier,
                                  lockstep, single_process_info, unwrap, wrap_ddp)
from pipeline.io import (atomic_path, atomic_torch_save, atomic_write_csv_rows, atomic_write_json,
                         remove_stale_temporaries, seed_everything)
from pipeline.models.au_model import AUModel, init_au_head_prior, load_pretrained_encoder
from pipeline.models.mae import check_finite_weights, encoder_geometry, load_checkpoint
from pipeline.models.vit import build_vit, vit_size
from pipeline.params import FinetuneParams
from pipeline.recipes import recipe_summary
from pipeline.schedule import lr_at

log = logging.getLogger(__name__)

VARIANTS = ("fmae", "iat")
HISTORY_COLUMNS = ("epoch", "lr", "au_loss", "id_loss", "id_acc", "f1_mean", "auc_mean",
                   "best_threshold", "best_threshold_f1_mean")
# Raw (still JPEG-encoded) samples held per worker for shuffling; small compared to a subject.
SHUFFLE_BUFFER = 2000
RAND_AUGMENT_EXAMPLE = "rand-m9-mstd0.5-inc1"  # the paper's RandAugment


# --------------------------------------------------------------------------- fold splits
def fold_split(au_dir: Path, fold: int, split: str, *, val_fraction: float, seed: int
               ) -> tuple[list[str], list[str], int]:
    """Shard URLs, subjects and sample count of one split; the only calls into au_data.

    Args:
        au_dir: ``data/au_shards/<dataset>``.
        fold: test part (1-based).
        split: ``train``, ``val`` or ``test``.
        val_fraction, seed: the validation draw; identical for the train and val calls.
    """
    from pipeline.au_data import fold_shards
    return fold_shards(au_dir, fold, split, val_fraction=val_fraction, seed=seed)


def train_base_rates(au_dir: Path, subjects: list[str], aus: list[int], *,
                     unknown_as_negative: bool) -> list[float | None]:
    """(A,) positive rate of each AU over the training subjects' labels, as the loss sees
    them: not-coded labels left out (mask) or counted as absent (negative); ``None`` for an
    AU never coded in training."""
    from pipeline.au_data import label_stats, load_index
    index = load_index(au_dir)
    rates = label_stats(index[index["subject"].isin(subjects)], aus,
                        unknown_as_negative=unknown_as_negative)["positive_rate"]
    return [rates[f"AU{a}"] for a in aus]


def read_au_meta(au_dir: Path, dataset: str, fold: int) -> dict:
    """``meta.json`` of an AU shard folder, checked against the requested dataset and fold."""
    from pipeline.au_data import read_meta
    meta = read_meta(au_dir)
    for key in ("dataset", "aus", "parts"):
        if key not in meta:
            raise ValueError(f"{au_dir / 'meta.json'}: key {key!r} missing; rebuild the AU "
                             "shards (`dvc repro au_shards`)")
    if meta["dataset"] != dataset:
        raise ValueError(f"{au_dir / 'meta.json'}: holds dataset {meta['dataset']!r}, not the "
                         f"requested {dataset!r}; check --au-shards and the run name")
    if str(fold) not in {str(k) for k in meta["parts"]}:
        raise ValueError(f"{dataset} has no fold {fold}: {au_dir / 'meta.json'} lists parts "
                         f"{sorted(meta['parts'], key=str)} (fold k tests on part k); fix "
                         "finetune.runs")
    return meta


def identity_classes(meta: dict, train_subjects: list[str], which: str) -> dict[str, int]:
    """Subject -> ID-head class index.

    Args:
        meta: the AU shards' ``meta.json`` (``subjects`` lists every subject of the dataset).
        train_subjects: the fold's training subjects.
        which: ``dataset`` = one class per subject of the whole dataset (the reference: 41 on
            BP4D, 140 on BP4D+, 27 on DISFA; test subjects' classes only see target 0), or
            ``train`` = the fold's training subjects only.
    """
    if which == "train":
        return {s: i for i, s in enumerate(sorted(train_subjects))}
    if which != "dataset":
        raise ValueError(f"finetune.id_classes: {which!r} is not one of dataset, train")
    everyone = [str(s) for s in meta.get("subjects") or []]
    missing = sorted(set(train_subjects) - set(everyone))
    if not everyone or missing:
        raise ValueError(f"meta.json 'subjects' does not list the training subjects "
                         f"{missing[:5] or train_subjects[:5]}; rebuild the AU shards "
                         "(`dvc repro au_shards`)")
    return {s: i for i, s in enumerate(sorted(everyone))}


# --------------------------------------------------------------------------- data
def build_transforms(cfg: FinetuneParams) -> tuple[Any, Any]:
    """(train, eval) image transforms: timm's RandAugment recipe / plain resize.

    Eval resizes to ``image_size`` x ``image_size`` (no crop), like the reference's
    Resize(224x224); bicubic, as in training.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
    from torchvision import transforms as T

    a = cfg.augment
    check_rand_augment(a.rand_augment, cfg.image_size)
    train = create_transform(
        input_size=cfg.image_size, is_training=True, scale=(a.scale_min, 1.0),
        ratio=(3 / 4, 4 / 3), interpolation="bicubic", hflip=a.hflip,
        auto_augment=a.rand_augment or None,
        # MAE finetuning passes no colour jitter (timm disables it under RandAugment anyway).
        color_jitter=None, re_prob=a.reprob, re_mode="pixel", re_count=1,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    _pillow_safe_posterize(train)
    evaluate = T.Compose([
        T.Resize((cfg.image_size, cfg.image_size), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    return train, evaluate


def check_rand_augment(spec: str, image_size: int = 224) -> None:
    """Refuse a ``finetune.augment.rand_augment`` policy that timm cannot build.

    Asks timm to build the policy alone. timm fails on unknown policies and sections with a
    bare ``AssertionError`` and on bad numbers with a ``ValueError``; both become one message
    naming the key and a valid example. A RandAugment section without a number (``rand-mX``)
    is refused too: timm would skip it silently and train with its default.
    """
    if not spec:
        return
    from timm.data import create_transform

    problem = ""
    if spec.startswith("rand-"):
        ignored = [c for c in spec.split("-")[1:] if not c.startswith("t")
                   and not re.search(r"\d", c)]
        if ignored:
            problem = f"timm would silently ignore the section(s) {ignored}: no number"
    if not problem:
        try:
            create_transform(input_size=image_size, is_training=True, auto_augment=spec,
                             interpolation="bicubic")
        except (AssertionError, ValueError, KeyError, TypeError, IndexError) as e:
            problem = f"timm: {type(e).__name__}{': ' + str(e) if str(e) else ''}"
    if problem:
        raise ValueError(f"finetune.augment.rand_augment: {spec!r} is not a policy timm can "
                         f"build ({problem}). Use a RandAugment spec such as "
                         f"{RAND_AUGMENT_EXAMPLE!r} (the paper's: magnitude 9, magnitude noise "
                         "0.5, increasing ops; nN sets the number of ops) or '' for none")


def _posterize_keep_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Posterize that accepts 0 bits (a black image), as Pillow did before version 12/13."""
    from PIL import ImageOps
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _pillow_safe_posterize(transform) -> None:
    """Make timm's RandAugment "inc1" posterize work with current Pillow.

    With magnitude noise (mstd0.5) the magnitude reaches 10, where PosterizeIncreasing keeps
    0 bits; current Pillow raises ``ValueError: bits must be between ... 1 and 8`` there
    (about one image in 300), while the Pillow the reference code ran on returned a black
    image. Swap the op's function in this transform only (no global patch of timm).
    """
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize_keep_bits


def _tar_samples(url: str) -> Iterator[dict]:
    import webdataset as wds
    return iter(wds.tarfile_samples([{"url": url}]))


def _interleave(urls: list[str], rng: random.Random) -> Iterator[dict]:
    """Read several shards at once, drawing each next sample from a random open shard.

    Shards are per subject, so reading them one after another would give batches of a single
    identity: that biases the AU gradient and makes the ID head's task trivial per batch.
    """
    streams = [_tar_samples(u) for u in urls]
    while streams:
        i = rng.randrange(len(streams))
        try:
            yield next(streams[i])
        except StopIteration:
            streams.pop(i)


def _shuffle_buffer(samples: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buf: list[dict] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = s
    rng.shuffle(buf)
    yield from buf


def shard_samples(urls: list[str], *, shuffle: bool, seed: int, epoch: int) -> Iterator[dict]:
    """This DataLoader worker's raw samples of ``urls`` (worker w reads shards w, w+n, ...).

    With ``shuffle``, the shard order is reshuffled per epoch (the same on every worker) and
    the worker's shards are interleaved and passed through a shuffle buffer; otherwise shards
    are read one after another in file order. One pass over all workers yields every sample
    exactly once.
    """
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    urls = list(urls)
    if not shuffle:
        return (s for u in urls[wid::nw] for s in _tar_samples(u))
    random.Random(f"{seed}-{epoch}").shuffle(urls)  # same on every worker
    rng = random.Random(f"{seed}-{epoch}-{wid}")
    return _shuffle_buffer(_interleave(urls[wid::nw], rng), SHUFFLE_BUFFER, rng)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None) -> None:
    """Backward and one optimizer step (through the GradScaler when training in fp16)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


class AUShardStream(IterableDataset):
    """Samples of AU shards: (image (3, S, S), labels (A,) int64, id int64, key, subject).

    Shards are split across DataLoader workers (worker w reads shards w, w+n, ...), so one
    pass yields every sample exactly once however many workers run. Training reshuffles the
    shard order and samples every epoch (call :meth:`set_epoch` before iterating).

    Under data parallelism samples (not shards: a shard is one subject, of any length) are
    split across ranks: worker w of every rank reads the same stream (same shards, same
    shuffle, independent of the rank) and rank r keeps its samples r, r + R, r + 2R, ...
    Each sample is then seen by exactly one rank, and the ranks' counts differ by at most one
    per worker; only the kept samples are decoded, but every rank reads all shard bytes.

    Args:
        urls: shard paths.
        aus: the AU numbers of the dataset, in label order (checked against every sample).
        transform: PIL image -> tensor.
        subject_ids: subject -> identity class; subjects not in it get id -1.
        unknown_as_negative: turn label -1 (not coded) into 0.
        shuffle: training order (interleaved shards + shuffle buffer) instead of file order.
        seed: base seed of the shuffling.
        rank, world_size: this process's share of the samples (see above).
    """

    def __init__(self, urls: list[str], aus: list[int], transform, *,
                 subject_ids: dict[str, int] | None = None, unknown_as_negative: bool = False,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.urls = list(urls)
        self.aus = [int(a) for a in aus]
        self.transform = transform
        self.subject_ids = subject_ids or {}
        self.unknown_as_negative = unknown_as_negative
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        raw = shard_samples(self.urls, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)
        if self.world_size > 1:  # this rank's share, picked before any decoding
            raw = itertools.islice(raw, self.rank, None, self.world_size)
        for sample in raw:
            yield self._decode(sample)

    def _decode(self, sample: dict):
        where = f"{sample.get('__url__')} sample {sample.get('__key__')}"
        try:
            info = json.loads(sample["json"])
            img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{where}: unreadable AU sample ({e}); rebuild the AU shards "
                             "(`dvc repro au_shards`)") from e
        if [int(a) for a in info.get("aus", [])] != self.aus:
            raise ValueError(f"{where}: json 'aus' {info.get('aus')} differ from meta.json aus "
                             f"{self.aus}; rebuild the AU shards")
        labels = torch.tensor(info["labels"], dtype=torch.int64)  # (A,) in {0, 1, -1}
        if self.unknown_as_negative:
            labels = labels.clamp(min=0)
        subject = str(info["subject"])
        ident = self.subject_ids.get(subject, -1)
        return self.transform(img), labels, ident, sample["__key__"], subject


def make_loader(ds: AUShardStream, batch_size: int, num_workers: int, pin: bool,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader over a shard stream.

    ``drop_last`` drops each worker's partial last batch (with 0 workers: exactly the
    reference's ``drop_last=True``; with n workers up to n partial batches).
    """
    # No persistent workers: workers copy the dataset when an epoch starts, which is how the
    # new epoch number (and so the new shuffle) reaches them.
    return DataLoader(ds, batch_size=batch_size, num_workers=num_workers, pin_memory=pin,
                      drop_last=drop_last)


# --------------------------------------------------------------------------- optimisation
def param_groups_lrd(model: AUModel, weight_decay: float, layer_decay: float
                     ) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay (BEiT/MAE finetuning recipe).

    Layer ids: patch_embed, cls_token, pos_embed -> 0; encoder block i (0-based) -> i + 1;
    everything after the blocks (fc_norm, AU head, ID head) -> L + 1. A parameter of layer
    id ``l`` gets lr scale ``layer_decay ** (L + 1 - l)``, so block i gets decay^(L - i), the
    embeddings decay^(L + 1) and the heads 1. No weight decay on biases, norm weights, the
    position embedding and the cls token. Frozen parameters (the fixed sin-cos pos_embed)
    are left out.
    """
    n_layers = model.num_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed")):
            layer = 0
        elif name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        else:
            layer = n_layers + 1
        no_decay = p.ndim == 1 or name.endswith(("cls_token", "pos_embed"))
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay
                           else weight_decay, "lr_scale": layer_decay ** (n_layers + 1 - layer)}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """finetune.amp -> autocast dtype (None = full precision). auto = bf16 on CUDA only."""
    if amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() \
            else None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("finetune.amp: fp16 needs a CUDA device; use bf16, auto or off")
    return torch.bfloat16 if amp == "bf16" else torch.float16


# --------------------------------------------------------------------------- loops
def train_one_epoch(model: AUModel, loader: DataLoader, optimizer: torch.optim.Optimizer, *,
                    epoch: int, steps_per_epoch: int, cfg: FinetuneParams, base_lr: float,
                    device: torch.device, amp: torch.dtype | None,
                    scaler: torch.amp.GradScaler | None) -> dict[str, float]:
    """One pass over the training shards; returns sample-weighted mean losses and the lr.

    ``epoch`` is 0-based here; the lr follows the per-iteration schedule of fractional epoch
    ``epoch + step / steps_per_epoch``. ``model`` may be DDP-wrapped: then every rank runs
    the same number of steps (:func:`pipeline.distributed.lockstep`) and the returned means
    are over all ranks' samples.
    """
    model.train()
    sums = {"au_loss": 0.0, "id_loss": 0.0, "id_acc": 0.0}
    n_seen, n_id, lr = 0, 0, 0.0
    use_ids = unwrap(model).id_head is not None
    for step, (x, labels, ids, _keys, _subjects) in enumerate(lockstep(loader, device)):
        # Workers each end with a partial batch, so the true step count can exceed the
        # estimate by a few: clamp the schedule inside this epoch.
        t = epoch + min(step / steps_per_epoch, 1.0)
        lr = lr_at(t, base_lr=base_lr, min_lr=cfg.min_lr, warmup=cfg.warmup_epochs,
                   total=cfg.epochs)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        x = x.to(device, non_blocking=True)  # (B, 3, S, S)
        labels = labels.to(device, non_blocking=True)  # (B, A)
        ids = ids.to(device, non_blocking=True) if use_ids else None  # (B,)
        if ids is not None and bool((ids < 0).any()):
            raise ValueError("a training sample's subject has no identity class; the fold's "
                             "training shards hold a subject outside its training split")
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x, labels, ids)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} step {step}; "
                                     "lower finetune.blr or set finetune.amp: off")
        optimizer_step(loss, optimizer, scaler)
        b = x.shape[0]
        n_seen += b
        sums["au_loss"] += out["au_loss"].item() * b
        if "id_loss" in out:
            n_id += b
            sums["id_loss"] += out["id_loss"].item() * b
            sums["id_acc"] += out["id_acc"].item() * b
    if torch.distributed.is_initialized():
        sums, n_seen, n_id = _sum_over_ranks(sums, n_seen, n_id, device)
    if n_seen == 0:
        raise ValueError("the training split yielded no samples; check the AU shards")
    return {"lr": lr, "au_loss": sums["au_loss"] / n_seen,
            "id_loss": sums["id_loss"] / n_id if n_id else math.nan,
            "id_acc": sums["id_acc"] / n_id if n_id else math.nan}


def _sum_over_ranks(sums: dict[str, float], n_seen: int, n_id: int, device: torch.device
                    ) -> tuple[dict[str, float], int, int]:
    """The loss sums and sample counts of one epoch, summed over ranks (float64)."""
    names = list(sums)
    t = torch.tensor([sums[k] for k in names] + [n_seen, n_id], dtype=torch.float64,
                     device=device)
    t = all_reduce_sum(t).cpu().tolist()
    return dict(zip(names, t[:len(names)])), int(t[-2]), int(t[-1])


@torch.no_grad()
def predict(model: AUModel, loader: DataLoader, device: torch.device,
            amp: torch.dtype | None, allow_empty: bool = False) -> dict[str, Any]:
    """Probabilities of every sample, sorted by key.

    ``allow_empty``: return empty arrays instead of failing when the loader yields nothing
    (one rank's share of a split smaller than the number of ranks).

    Returns:
        ``{"keys": [N], "subjects": [N], "probs": (N, A) float32, "labels": (N, A) int8}``.
    """
    model.eval()
    keys, subjects, probs, labels = [], [], [], []
    for x, lab, _ids, k, s in loader:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x.to(device, non_blocking=True))["au_logits"]  # (B, A)
        probs.append(torch.sigmoid(logits.float()).cpu())
        labels.append(lab)
        keys += list(k)
        subjects += list(s)
    if not keys:
        if allow_empty:
            return {"keys": [], "subjects": [], "probs": np.zeros((0, 0), np.float32),
                    "labels": np.zeros((0, 0), np.int8)}
        raise ValueError("an evaluation split yielded no samples; check the AU shards")
    order = np.argsort(np.asarray(keys), kind="stable")
    return {"keys": [keys[i] for i in order], "subjects": [subjects[i] for i in order],
            "probs": torch.cat(probs).numpy().astype(np.float32)[order],
            "labels": torch.cat(labels).numpy().astype(np.int8)[order]}


def gather_predictions(pred: dict[str, Any]) -> dict[str, Any]:
    """Every rank's :func:`predict` output merged on every rank, sorted by key.

    Each rank predicted a disjoint share of a split; the merge keeps every row (a frame read
    by two ranks would show up twice, which :func:`_check_exactly_once` refuses). A single
    process gets ``pred`` unchanged.
    """
    if not torch.distributed.is_initialized():
        return pred
    parts = [p for p in all_gather_objects(pred) if p["keys"]]
    if not parts:
        raise ValueError("an evaluation split yielded no samples on any rank; check the AU "
                         "shards")
    keys = [k for p in parts for k in p["keys"]]
    subjects = [s for p in parts for s in p["subjects"]]
    order = np.argsort(np.asarray(keys), kind="stable")
    return {"keys": [keys[i] for i in order], "subjects": [subjects[i] for i in order],
            "probs": np.concatenate([p["probs"] for p in parts])[order],
            "labels": np.concatenate([p["labels"] for p in parts])[order]}


def _check_exactly_once(pred: dict, expected: int, split: str) -> None:
    n, n_unique = len(pred["keys"]), len(set(pred["keys"]))
    if n != expected or n_unique != n:
        raise ValueError(f"{split} split: read {n} samples ({n_unique} unique keys) but "
                         f"index.parquet lists {expected}; the shards and index disagree, "
                         "rebuild the AU shards")


def _predictions_table(pred: dict, epoch: int, aus: list[int]):
    import pyarrow as pa
    cols: dict[str, Any] = {
        "epoch": pa.array(np.full(len(pred["keys"]), epoch, np.int32)),
        "key": pa.array(pred["keys"], pa.string()),
        "subject": pa.array(pred["subjects"], pa.string()),
    }
    for j, a in enumerate(aus):
        cols[f"prob_AU{a}"] = pa.array(pred["probs"][:, j])
    for j, a in enumerate(aus):
        cols[f"label_AU{a}"] = pa.array(pred["labels"][:, j])
    return pa.table(cols)


def _write_history(path: Path, rows: list[dict]) -> None:
    atomic_write_csv_rows(path, rows, HISTORY_COLUMNS)


def save_backbone(model: AUModel, path: Path, config: dict) -> None:
    """Encoder (incl. fc_norm) weights + the config to rebuild it, for the identity probe."""
    state = {k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()}
    atomic_torch_save(path, {"model": state, "config": config})


def _load_checkpoint(path: Path, model_size: str, patch_size: int, image_size: int) -> dict:
    """The pretrained state dict at ``path``, checked against the finetuning settings.

    Any format :func:`pipeline.models.mae.load_checkpoint` reads. The encoder's width, depth,
    image and patch size are read off the tensors (a bare state dict has no config) and must
    be ``model_size``, ``finetune.image_size`` and ``pretrain.patch_size``; every weight must
    be finite. Each refusal names the file, the values and the fix.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: pretrained checkpoint missing; run the pretrain stage "
                                "(`dvc repro pretrain`) or set pretrain.checkpoint")
    state = load_checkpoint(path)["model"]
    try:
        geo = encoder_geometry(state)
    except ValueError as e:
        raise ValueError(f"{path}: not a pretrained ViT encoder ({e}); point --pretrained at "
                         "the pretrain stage's checkpoint.pt") from e
    want = vit_size(model_size)
    if (geo["embed_dim"], geo["depth"]) != (want.embed_dim, want.depth):
        found = f"ViT-{geo['model_size']}" if geo["model_size"] else "a ViT of no known size"
        raise ValueError(f"{path}: holds {found} ({geo['embed_dim']} wide, {geo['depth']} "
                         f"blocks) but model_size is {model_size!r} ({want.embed_dim} wide, "
                         f"{want.depth} blocks); set model_size to the checkpoint's size or "
                         "re-run pretraining")
    if (geo["img_size"], geo["patch_size"]) != (image_size, patch_size):
        raise ValueError(
            f"{path}: pretrained on {geo['img_size']} px images with {geo['patch_size']} px "
            f"patches, but finetune.image_size is {image_size} and pretrain.patch_size is "
            f"{patch_size}; position embeddings are not interpolated. Set "
            f"finetune.image_size = pretrain.image_size = {geo['img_size']} and "
            f"pretrain.patch_size = {geo['patch_size']}, or re-run pretraining at the new size")
    check_finite_weights(state, path)
    return state


# --------------------------------------------------------------------------- the run
def finetune(au_dir: Path, pretrained: Path, out_dir: Path, cfg: FinetuneParams, *,
             dataset: str, fold: int, variant: str, lambda_: float, model_size: str,
             patch_size: int, seed: int, tracker=None,
             dist_info: DistInfo | None = None) -> dict:
    """Finetune the pretrained encoder on one fold and write the finetune contract files.

    Args:
        au_dir: ``data/au_shards/<dataset>``.
        pretrained: ``data/pretrain/checkpoint.pt``.
        out_dir: ``data/finetune/<variant>/<dataset>-<fold>``.
        cfg: the ``finetune`` params section (``cfg.id_head_depth`` is used as given).
        dataset, fold: the run; fold k tests on part k.
        variant: ``fmae`` (AU head only; lambda ignored) or ``iat`` (adds reversal + ID head).
        lambda_: gradient reversal strength for ``iat``.
        model_size, patch_size: the pretrained encoder's size and patch size.
        seed: seeds weights of the new heads, augmentation and shuffling.
        tracker: a :class:`pipeline.tracking.Tracker` for per-epoch metrics, or None.
        dist_info: this process's place in a torchrun launch
            (:func:`pipeline.distributed.init_distributed`); None = one process.

    Data parallel (``world_size`` R > 1): every rank trains on its share of the training
    samples with per-rank augmentation seeds (``seed + rank``; the weights are drawn from
    ``seed`` and broadcast by DDP), the global batch is ``batch_size x R`` and the lr scales
    with it (``blr x batch_size x R / 256``, as the reference), and every rank runs
    ``n_train // (batch_size x R)`` steps an epoch. Each rank predicts a disjoint share of
    the test (and val) frames; the shares are gathered before any metric, and checked to
    hold every frame exactly once. Only rank 0 writes files and logs to ``tracker``. One
    process (R = 1) runs exactly as without ``dist_info``.

    Returns:
        the ``metrics.json`` dict (on every rank).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} unknown; use one of {', '.join(VARIANTS)}")
    t_train, t_eval = build_transforms(cfg)  # first: a bad rand_augment fails before any work
    preprocess = describe_eval_transform(t_eval)  # what model.safetensors records
    au_dir, out_dir = Path(au_dir), Path(out_dir)
    info = dist_info or single_process_info()
    main = info.is_main  # only rank 0 writes files and logs metrics
    tracker = tracker if main else None
    if main:
        remove_stale_temporaries(out_dir, recursive=True)  # killed runs' .tmp-* (backbones/)
    meta = read_au_meta(au_dir, dataset, fold)
    aus = [int(a) for a in meta["aus"]]
    seed_everything(seed)
    device = info.device
    amp = autocast_dtype(cfg.amp, device)
    iat = variant == "iat"

    # ---- data
    splits = {name: fold_split(au_dir, fold, name, val_fraction=cfg.val_fraction, seed=seed)
              for name in (("train", "val", "test") if cfg.val_fraction > 0 else
                           ("train", "test"))}
    train_urls, train_subjects, n_train = splits["train"]
    if n_train == 0 or not train_urls:
        raise ValueError(f"{au_dir}: fold {fold} has no training samples")
    subject_ids = identity_classes(meta, train_subjects, cfg.id_classes)
    neg = cfg.unknown_labels == "negative"
    pin = device.type == "cuda"
    share = {"rank": info.rank, "world_size": info.world_size}  # this rank's samples
    train_ds = AUShardStream(train_urls, aus, t_train, subject_ids=subject_ids,
                             unknown_as_negative=neg, shuffle=True, seed=seed, **share)
    train_loader = make_loader(train_ds, cfg.batch_size, cfg.num_workers, pin, drop_last=True)
    eval_loaders = {name: (make_loader(AUShardStream(urls, aus, t_eval, unknown_as_negative=neg,
                                                     **share),
                                       cfg.batch_size, cfg.num_workers, pin), n)
                    for name, (urls, _subs, n) in splits.items() if name != "train"}
    log.info("%s fold %d (%s): %d train frames / %d subjects, %s; %d AUs", dataset, fold,
             variant, n_train, len(train_subjects),
             ", ".join(f"{k} {len(v[1])} subjects {v[2]} frames" for k, v in splits.items()
                       if k != "train"), len(aus))

    # ---- model
    state = _load_checkpoint(pretrained, model_size, patch_size, cfg.image_size)
    encoder = build_vit(model_size, cfg.image_size, patch_size, cfg.drop_path, global_pool="avg")
    encoder.pos_embed.requires_grad_(True)  # trainable in finetuning, as the reference
    model = AUModel(encoder, len(aus), n_ids=len(subject_ids) if iat else 0,
                    id_head_depth=cfg.id_head_depth, lambda_=lambda_ if iat else 0.0,
                    id_loss=cfg.id_loss, id_head_init=cfg.id_head_init)
    try:
        load_pretrained_encoder(model, state)
    except ValueError as e:
        raise ValueError(f"{pretrained}: {e}") from e
    if cfg.au_head_init == "prior":
        rates = train_base_rates(au_dir, train_subjects, aus, unknown_as_negative=neg)
        init_au_head_prior(model.au_head, rates)
        log.info("AU head bias at the training base rates: %s", ", ".join(
            f"AU{a} {r:.3f}" if r is not None else f"AU{a} -" for a, r in zip(aus, rates)))
    model.to(device)
    backbone_config = {"model_size": model_size, "img_size": cfg.image_size,
                       "patch_size": patch_size, "global_pool": "avg",
                       "embed_dim": int(encoder.embed_dim), "depth": model.num_layers,
                       "dataset": dataset, "fold": fold, "variant": variant}

    ddp_model = wrap_ddp(model, info)  # DDP broadcasts rank 0's weights
    if info.distributed:  # replicas draw different augmentation and drop path
        seed_everything(seed + info.rank)
    global_batch = cfg.batch_size * info.world_size
    base_lr = cfg.blr * global_batch / 256
    optimizer = torch.optim.AdamW(param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay),
                                  lr=base_lr)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    steps_per_epoch = n_train // global_batch  # partial last batch dropped
    if steps_per_epoch == 0:
        raise ValueError(f"{au_dir}: fold {fold} has {n_train} training frames, fewer than one "
                         f"global batch (finetune.batch_size = {cfg.batch_size} x "
                         f"{info.world_size} processes); lower the batch size or "
                         "finetune.nproc_per_node")
    log.info("lr %.3g (blr %.3g x batch %d x %d processes / 256), %d steps/epoch, %d epochs, "
             "amp %s, device %s", base_lr, cfg.blr, cfg.batch_size, info.world_size,
             steps_per_epoch, cfg.epochs, amp, device)

    def backbone(epoch: int) -> None:
        if main and epoch in cfg.save_backbone_epochs:
            save_backbone(model, out_dir / "backbones" / f"epoch_{epoch:03d}.pt",
                          {**backbone_config, "epoch": epoch})

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    backbone(0)
    history: list[dict] = []
    epochs: list[dict] = []
    val_threshold = None
    import pyarrow.parquet as pq
    with atomic_path(out_dir / "predictions.parquet") if main else nullcontext() as pred_tmp:
        writer = None
        try:
            for e in range(cfg.epochs):
                epoch = e + 1
                t0 = time.time()
                train_ds.set_epoch(e)
                tr = train_one_epoch(ddp_model, train_loader, optimizer, epoch=e,
                                     steps_per_epoch=steps_per_epoch, cfg=cfg, base_lr=base_lr,
                                     device=device, amp=amp, scaler=scaler)
                rec: dict[str, Any] = {"epoch": epoch}
                for name, (loader, n_expected) in eval_loaders.items():
                    pred = gather_predictions(predict(model, loader, device, amp,
                                                      allow_empty=info.distributed))
                    _check_exactly_once(pred, n_expected, name)
                    rec[name] = M.au_report(pred["probs"], pred["labels"], aus, 0.5)
                    if name == "val":  # the final epoch's goes into model.safetensors
                        val_threshold = M.best_global_threshold(pred["probs"],
                                                                pred["labels"])[0]
                    if name == "test":
                        thr, _ = M.best_global_threshold(pred["probs"], pred["labels"])
                        rec["test_best"] = M.au_report(pred["probs"], pred["labels"], aus, thr)
                        if main:
                            table = _predictions_table(pred, epoch, aus)
                            if writer is None:
                                writer = pq.ParquetWriter(pred_tmp, table.schema)
                            writer.write_table(table)
                rec.setdefault("val", None)
                epochs.append(rec)
                row = {"epoch": epoch, **tr, "f1_mean": rec["test"]["f1_mean"],
                       "auc_mean": rec["test"]["auc_mean"],
                       "best_threshold": rec["test_best"]["threshold"],
                       "best_threshold_f1_mean": rec["test_best"]["f1_mean"]}
                history.append(row)
                if main:
                    _write_history(out_dir / "history.csv", history)
                backbone(epoch)
                step_metrics = {"train/au_loss": tr["au_loss"], "train/lr": tr["lr"],
                                "test/f1_mean": row["f1_mean"], "test/auc_mean": row["auc_mean"],
                                "test/best_threshold": row["best_threshold"],
                                "test/best_threshold_f1_mean": row["best_threshold_f1_mean"]}
                if iat:
                    step_metrics.update({"train/id_loss": tr["id_loss"],
                                         "train/id_acc": tr["id_acc"]})
                if rec["val"] is not None:
                    step_metrics["val/f1_mean"] = rec["val"]["f1_mean"]
                if tracker is not None:
                    tracker.log_metrics(step_metrics, step=epoch)
                log.info("epoch %d/%d %.0fs: lr %.2e au_loss %.4f%s | test F1@0.5 %s AUC %s "
                         "| best thr %.2f F1 %s%s", epoch, cfg.epochs, time.time() - t0,
                         tr["lr"], tr["au_loss"],
                         f" id_loss {tr['id_loss']:.4f} id_acc {tr['id_acc']:.3f}" if iat else "",
                         row["f1_mean"], row["auc_mean"], row["best_threshold"],
                         row["best_threshold_f1_mean"],
                         f" | val F1 {rec['val']['f1_mean']}" if rec["val"] else "")
        finally:
            if writer is not None:
                writer.close()

    # The final model for `fmae-iat predict` (docs/design.md "model file"): AU head, no ID head.
    if main:
        save_au_model(out_dir / MODEL_FILE, model, aus=aus, preprocess=preprocess,
                      dataset=dataset, fold=fold, variant=variant,
                      lambda_=float(lambda_) if iat else 0.0, epoch=cfg.epochs,
                      model_size=model_size, val_threshold=val_threshold)
    result = {
        "dataset": dataset, "fold": fold, "variant": variant,
        "lambda": float(lambda_) if iat else 0.0,
        "id_head_depth": cfg.id_head_depth if iat else None,
        "id_loss": cfg.id_loss if iat else None,
        "id_classes": cfg.id_classes if iat else None,
        "id_head_init": cfg.id_head_init if iat else None,
        "au_head_init": cfg.au_head_init,
        "n_id_classes": len(subject_ids) if iat else None,
        "aus": aus,
        "final": M.final_summary(epochs),
        "paper_protocol": M.paper_protocol_summary(epochs),
        "val_selected": M.val_selected_summary(epochs),
        "final_id_loss": history[-1]["id_loss"] if iat else None,
        "convergence_epoch": M.convergence_epoch(epochs),
        # the protocol this run followed: tables group seed repeats and name each recipe
        "seed": seed, "recipe": recipe_summary(cfg), "unknown_labels": cfg.unknown_labels,
    }
    if not main:
        barrier()  # rank 0 writes metrics.json below, then joins
        return result
    atomic_write_json(out_dir / "metrics.json", result)
    if tracker is not None:
        tracker.log_metrics({"final/f1_mean": result["final"]["f1_mean"],
                             "final/auc_mean": result["final"]["auc_mean"],
                             "paper_protocol/f1_mean": result["paper_protocol"]["f1_mean"],
                             "convergence_epoch": result["convergence_epoch"]})
        tracker.log_artifact(out_dir / "metrics.json")
        tracker.log_artifact(out_dir / "history.csv")
    log.info("%s-%d %s: final F1@0.5 %s (epoch %d); paper protocol F1 %s (thr %.2f, epoch %d)",
             dataset, fold, variant, result["final"]["f1_mean"], result["final"]["epoch"],
             result["paper_protocol"]["f1_mean"], result["paper_protocol"]["threshold"],
             result["paper_protocol"]["epoch"])
    barrier()
    return result
