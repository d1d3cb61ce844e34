"""Shard reader for FMAE pretraining: WebDataset, resampled, equal steps on every DDP rank.

Reads the ``data/shards/face/face-%06d.tar`` files written by :mod:`pipeline.shards` (contract
in ``docs/design.md``), only from a complete shards run (:func:`check_complete`: ``stats.json``
present and listing exactly the shards in the folder, no temp files), so pretraining never
starts on the leftovers of a killed or out-of-space run. The recipe follows
``/work/shared/reference/ecosystem.md`` (WebDataset 1.x):

- shards are **resampled** (drawn with replacement, an infinite stream), and the stream is
  split between ranks like ``split_by_node`` -- here with an explicit ``rank``/``world_size``
  instead of reading them from the environment;
- ``WebLoader(...).with_epoch(steps_per_epoch)`` cuts the infinite stream into epochs of
  exactly ``steps_per_epoch`` batches on *every* rank, whatever the number of shards per rank,
  so DDP never hangs at an epoch end waiting for a rank that ran out of data (splitting a
  fixed shard list by rank gives uneven batch counts);
- with a resampled stream every DataLoader worker reads from all shards, so more workers than
  shards is fine (no "No samples found");
- samples are shuffled inside each worker (a buffer over the encoded tar samples, before
  decoding) and again across workers in the main process (the ``unbatched().shuffle(n)
  .batched(b)`` recipe), then collated (``torch.utils.data.default_collate`` unless told
  otherwise);
- samples are decoded to PIL images before ``map_sample``, or handed over as raw bytes
  (``decode_images=False``: ``pretrain.decode: gpu`` decodes whole batches on the GPU).

Seeding: the shard draws and both shuffles derive from ``(seed, rank, worker, epoch)``, so the
same seed gives the same batches in the same order (with any fixed ``num_workers``; workers
deliver in order), and every epoch draws new shards and a new shuffle. Workers are persistent,
so the per-worker epoch counters advance between epochs.
"""
from __future__ import annotations

import logging
import random
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import webdataset as wds
from torch.utils.data import default_collate, get_worker_info
from webdataset.utils import make_seed

from pipeline.io import read_json
from pipeline.shards import SHARD_PATTERN, SHARD_RE, STATS_FILE, STATS_SHARDS_KEY, TEMP_PREFIXES

log = logging.getLogger(__name__)

# What completes a shard folder (the out folder of the shards stage; dvc.yaml's shards stage).
COMPLETE_WITH = ("`dvc repro shards` (or: python -m stages.shards --params params.yaml "
                 "--download data/download --out {folder})")
_MAX_LISTED = 5  # file names quoted in an error message
# Samples a worker hands to the main process per message: amortises the IPC cost per sample.
_WORKER_CHUNK = 16


# --------------------------------------------------------------------------- shard folder
class IncompleteShardsError(RuntimeError):
    """A shard folder is not the output of one complete shards run."""


def _names(names: list[str]) -> str:
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _shards_meta(stats: Any, stats_path: Path, complete: str) -> tuple[int, int, int]:
    """``(shard count, samples per shard, samples kept)`` recorded in ``stats.json``."""
    try:
        meta = stats[STATS_SHARDS_KEY]
        count, per_shard = int(meta["count"]), int(meta["samples_per_shard"])
        kept = int(stats["total"]["kept"])
    except (KeyError, TypeError, ValueError):
        raise IncompleteShardsError(
            f"{stats_path}: no integer {STATS_SHARDS_KEY}.count, "
            f"{STATS_SHARDS_KEY}.samples_per_shard and total.kept (written by an older or "
            f"another version of the shards stage); re-run it: {complete}") from None
    if count < 1 or per_shard < 1:
        raise IncompleteShardsError(f"{stats_path}: records {count} shard(s) of {per_shard} "
                                    f"samples, nothing to train on; re-run it: {complete}")
    return count, per_shard, kept


def check_complete(shard_dir: str | Path) -> dict:
    """The ``stats.json`` of ``shard_dir``, after checking the folder is one complete run.

    Complete means: ``stats.json`` is present (the shards stage writes it last), the folder
    holds exactly the shards it records (``face-000000.tar`` .. ``face-<count - 1>.tar``, with
    ``total.kept`` samples fitting ``count`` shards of ``samples_per_shard``) and no temp file
    of an unfinished write (``.tmp-face-*``, ``.tmp-stats.json*``).

    Raises:
        FileNotFoundError: the folder is missing.
        IncompleteShardsError: the folder is not complete; the message names the folder, what
            is wrong and the command that completes it (a re-run rebuilds the folder).
    """
    d = Path(shard_dir)
    complete = COMPLETE_WITH.format(folder=d)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: shard folder not found; run the shards stage: "
                                f"{complete}")
    files = sorted(p.name for p in d.iterdir() if p.is_file())
    temps = [n for n in files if n.startswith(TEMP_PREFIXES)]
    present = [n for n in files if SHARD_RE.match(n)]
    stats_path = d / STATS_FILE
    if STATS_FILE not in files:
        raise IncompleteShardsError(
            f"{d}: no {STATS_FILE}, so the shards run that wrote this folder did not finish "
            f"(killed, or out of disk space; {len(present)} shard(s)"
            f"{f', {len(temps)} temp file(s)' if temps else ''} left); complete it with "
            f"{complete}")
    if temps:
        raise IncompleteShardsError(
            f"{d}: temp files of an unfinished write ({_names(temps)}): a shards run is still "
            f"going on or was killed; wait for it, or re-run it: {complete}")
    stats = read_json(stats_path)
    count, per_shard, kept = _shards_meta(stats, stats_path, complete)
    expected = [SHARD_PATTERN % i for i in range(count)]
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    if missing or extra:
        problem = "; ".join(p for p in (
            f"missing {_names(missing)}" if missing else "",
            f"not written by that run: {_names(extra)}" if extra else "") if p)
        raise IncompleteShardsError(
            f"{d}: the shards do not match {STATS_FILE} ({count} shard(s) recorded; "
            f"{problem}); re-run the shards stage: {complete}")
    if not (count - 1) * per_shard < kept <= count * per_shard:
        raise IncompleteShardsError(
            f"{stats_path}: total.kept={kept} samples do not fit {count} shard(s) of "
            f"{per_shard}; re-run the shards stage: {complete}")
    return stats


def shard_urls(shard_dir: str | Path) -> list[str]:
    """Sorted paths of the ``face-%06d.tar`` shards of a complete shard folder.

    Raises:
        FileNotFoundError: the folder is missing.
        IncompleteShardsError: see :func:`check_complete`.
    """
    d = Path(shard_dir)
    stats = check_complete(d)
    return [str(d / (SHARD_PATTERN % i)) for i in range(int(stats[STATS_SHARDS_KEY]["count"]))]


def count_samples(shard_dir: str | Path) -> int:
    """Number of samples in the shards: ``stats.json``'s ``total.kept`` (checked complete)."""
    return int(check_complete(shard_dir)["total"]["kept"])


# --------------------------------------------------------------------------- pipeline steps
def _worker_id() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


class _SplitByRank:
    """``split_by_node`` with an explicit rank: rank r takes items r, r+W, r+2W, ...

    Every rank draws the same resampled shard stream (its seed does not include the rank)
    and keeps its own slice, so ranks read different shards at every step.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        return islice(src, self.rank, None, self.world_size)


class _EpochShuffle:
    """Buffer shuffle whose RNG is seeded from (seed, rank, worker, epoch, salt).

    webdataset's ``shuffle(seed=...)`` re-seeds identically at every epoch; this one counts
    its own calls (one per epoch in each process that runs it), so epochs differ but runs
    with the same seed repeat exactly.
    """

    def __init__(self, bufsize: int, seed: int, rank: int, salt: int):
        self.bufsize, self.seed, self.rank, self.salt = bufsize, seed, rank, salt
        self.epoch = -1

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        self.epoch += 1
        rng = random.Random(make_seed(self.seed, self.rank, _worker_id(), self.epoch,
                                      self.salt))
        return _buffer_shuffle(src, self.bufsize, rng)


def _buffer_shuffle(src: Iterable[Any], bufsize: int, rng: random.Random,
                    initial: int = 100) -> Iterator[Any]:
    """Shuffle through a buffer of up to ``bufsize`` items.

    Output starts once ``initial`` items are buffered; until the buffer is full it takes two
    items per item it emits, so a large buffer does not delay the first batch.
    """
    if bufsize <= 1:
        yield from src
        return
    initial = min(initial, bufsize)
    it = iter(src)
    buf: list[Any] = []
    for x in it:
        buf.append(x)
        if len(buf) < bufsize:
            buf.extend(islice(it, 1))
        if len(buf) < initial:
            continue
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _unlist(src: Iterable[list]) -> Iterator[Any]:
    """Flatten the per-worker lists of samples back into single samples."""
    for chunk in src:
        yield from chunk


# --------------------------------------------------------------------------- the loader
def make_train_loader(urls: list[str], *, batch_size: int, steps_per_epoch: int,
                      num_workers: int, map_sample: Callable[[dict], Any], seed: int,
                      rank: int = 0, world_size: int = 1,
                      shuffle_buffer: int = 1000, decode_images: bool = True,
                      collate_fn: Callable[[list], Any] = default_collate) -> wds.WebLoader:
    """An iterable of collated batches; every ``iter()`` is one epoch of ``steps_per_epoch``.

    Args:
        urls: shard paths (see :func:`shard_urls`).
        batch_size: samples per batch on this rank.
        steps_per_epoch: batches per epoch, identical on every rank (``len(loader)``).
        num_workers: DataLoader worker processes (0 = read in this process).
        map_sample: called with the decoded sample dict ``{"__key__": str, "jpg": PIL RGB
            image, "json": dict, ...}``; returns what is batched (tensor, tuple, dict, ...).
            Runs in the workers: it must be picklable if the start method is not fork.
            With ``decode_images=False`` the dict holds the tar members' raw bytes.
        seed: base seed of the shard draws and shuffles.
        rank, world_size: this process's place in DDP.
        shuffle_buffer: encoded samples held by each worker's shuffle buffer (<= 1: no
            shuffle); the main process's cross-worker buffer holds at most this many and at
            most max(2 batches, 2 chunks per worker) mapped samples.
        decode_images: False = hand ``map_sample`` the encoded bytes (``pretrain.decode:
            gpu`` decodes on the device); the sample order is the same either way.
        collate_fn: turns ``batch_size`` mapped samples into a batch (in the main process).
    """
    urls = [str(u) for u in urls]
    if not urls:
        raise ValueError("make_train_loader: no shard urls; run the shards stage first")
    checks = (("batch_size", batch_size, 1), ("steps_per_epoch", steps_per_epoch, 1),
              ("num_workers", num_workers, 0), ("world_size", world_size, 1))
    for name, value, lo in checks:
        if value < lo:
            raise ValueError(f"make_train_loader: {name}={value} must be >= {lo}")
    if not 0 <= rank < world_size:
        raise ValueError(f"make_train_loader: rank={rank} not in [0, world_size={world_size})")

    dataset = wds.DataPipeline(
        # Infinite stream of shard urls; deterministic=True seeds from (worker, epoch, seed)
        # instead of pid and time.
        wds.ResampledShards(urls, seed=seed, deterministic=True, worker_seed=_worker_id),
        _SplitByRank(rank, world_size),
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        _EpochShuffle(shuffle_buffer, seed, rank, salt=1),
        *([wds.decode("pil", handler=wds.reraise_exception)] if decode_images else []),
        wds.map(map_sample, handler=wds.reraise_exception),
        wds.batched(_WORKER_CHUNK, collation_fn=list, partial=True),
    )
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=num_workers,
                           persistent_workers=num_workers > 0)
    # The in-worker buffer holds encoded bytes (small); this one holds mapped samples (e.g.
    # float tensors, 600 kB each at 224 px), and only has to interleave the workers' chunks.
    main_buffer = min(shuffle_buffer, max(2 * batch_size, 2 * num_workers * _WORKER_CHUNK))
    loader = loader.compose(
        _unlist,
        _EpochShuffle(main_buffer, seed, rank, salt=2),  # mixes samples across workers
        wds.batched(batch_size, collation_fn=collate_fn, partial=False),
    )
    log.info("train loader: %d shard(s), rank %d/%d, batch %d, %d steps/epoch, %d worker(s)",
             len(urls), rank, world_size, batch_size, steps_per_epoch, num_workers)
    return loader.with_epoch(steps_per_epoch).with_length(steps_per_epoch, silent=True)

