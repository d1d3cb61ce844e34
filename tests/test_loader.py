"""Tests of pipeline/loader.py: shard listing and counting, refusal of incomplete shard folders,
seeded batch order, exactly steps_per_epoch batches per epoch on every rank (also in a real
2-process gloo run)."""
from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
from PIL import Image

from pipeline.loader import (IncompleteShardsError, count_samples, make_train_loader,
                             shard_urls)
from pipeline.params import PretrainParams, ShardsParams
from pipeline.shards import build_shards


class _Item:
    def __init__(self, i: int):
        self.source, self.key, self.identity, self.i = "syn", f"img{i}", f"s{i % 2}", i


def _read(item: _Item) -> bytes:
    # Image i is a flat grey of value 10*i, so a sample's index can be read from its pixels.
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10 * item.i,) * 3).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """13 samples in 3 uneven shards (5, 5, 3)."""
    out = tmp_path_factory.mktemp("shards")
    build_shards([_Item(i) for i in range(13)], _read, out,
                 ShardsParams(image_size=16, samples_per_shard=5, workers=1), progress=False)
    return out


def index_of(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """map_sample: (sample index from the key, mean pixel) -- checks decoding too."""
    idx = int(sample["__key__"].rsplit("-", 1)[1])
    assert sample["json"]["key"] == f"img{idx}"
    pixels = torch.from_numpy(np.array(sample["jpg"], dtype=np.float32))  # (16, 16, 3)
    return torch.tensor(idx), pixels.mean()


def epochs(loader, n: int) -> list[list[list[int]]]:
    return [[batch[0].tolist() for batch in loader] for _ in range(n)]


def test_shard_urls_and_count(shards, tmp_path):
    urls = shard_urls(shards)
    assert [Path(u).name for u in urls] == ["face-000000.tar", "face-000001.tar",
                                           "face-000002.tar"]
    assert count_samples(shards) == 13
    with pytest.raises(FileNotFoundError, match="dvc repro shards"):
        shard_urls(tmp_path / "missing")
    with pytest.raises(IncompleteShardsError, match="no stats.json"):
        shard_urls(tmp_path)


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def refused(folder: Path, match: str) -> str:
    """The error of shard_urls and count_samples on ``folder``, checked to name the folder,
    ``match`` and the commands that complete it."""
    for fn in (shard_urls, count_samples):
        with pytest.raises(IncompleteShardsError, match=match) as e:
            fn(folder)
    msg = str(e.value)
    assert str(folder) in msg and "dvc repro shards" in msg
    assert (f"python -m stages.shards --params params.yaml --download data/download "
            f"--out {folder}") in msg
    return msg


def test_killed_shards_run_refused(tmp_path):
    """A run killed after 2 of 3 shards: shards on disk, no stats.json."""
    def read_or_die(item: _Item) -> bytes:
        if item.i == 11:
            raise KeyboardInterrupt  # what a killed / out-of-space run amounts to
        return _read(item)

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        build_shards([_Item(i) for i in range(13)], read_or_die, out,
                     ShardsParams(image_size=16, samples_per_shard=5, workers=1),
                     progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["face-000000.tar", "face-000001.tar"]
    msg = refused(out, "no stats.json")
    assert "did not finish" in msg and "2 shard(s)" in msg


@pytest.mark.parametrize("damage,match", [
    ("missing", "missing face-000001.tar"),
    ("extra", "not written by that run: face-000003.tar"),
    ("temp", r"temp files .*\.tmp-face-000003\.tar\.x1y2"),
    ("temp_stats", r"temp files .*\.tmp-stats\.json\.a1"),
    ("old_stats", "no integer shards.count"),
    ("kept", "total.kept=99 samples do not fit 3 shard"),
])
def test_incomplete_or_inconsistent_folder_refused(shards, tmp_path, damage, match):
    folder = copy_folder(shards, tmp_path / "copy")
    assert len(shard_urls(folder)) == 3  # the intact copy is accepted
    stats = json.loads((folder / "stats.json").read_text())
    if damage == "missing":
        (folder / "face-000001.tar").unlink()
    elif damage == "extra":
        (folder / "face-000003.tar").write_bytes((folder / "face-000002.tar").read_bytes())
    elif damage == "temp":
        (folder / ".tmp-face-000003.tar.x1y2").write_bytes(b"half a shard")
    elif damage == "temp_stats":
        (folder / ".tmp-stats.json.a1").write_text("{")
    elif damage == "old_stats":  # stats.json of a version that did not record the shards
        del stats["shards"]
        (folder / "stats.json").write_text(json.dumps(stats))
    elif damage == "kept":
        stats["total"]["kept"] = 99
        (folder / "stats.json").write_text(json.dumps(stats))
    refused(folder, match)


def test_pretrain_refuses_incomplete_shards(shards, tmp_path):
    """What pretraining calls (pipeline.pretrain._resolve_data) stops before training."""
    from pipeline.pretrain import _resolve_data

    folder = copy_folder(shards, tmp_path / "copy")
    factory, steps = _resolve_data(folder, PretrainParams(steps_per_epoch=0, batch_size=4),
                                   None, 1)
    assert steps == 13 // 4
    (folder / "stats.json").unlink()
    for steps_per_epoch in (0, 5):  # counted from stats.json, or given
        with pytest.raises(IncompleteShardsError, match="no stats.json"):
            _resolve_data(folder, PretrainParams(steps_per_epoch=steps_per_epoch,
                                                 batch_size=4), None, 1)


def test_batches_decoded_and_collated(shards):
    loader = make_train_loader(shard_urls(shards), batch_size=4, steps_per_epoch=3,
                               num_workers=0, map_sample=index_of, seed=0)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3
    for idx, mean in batches:
        assert idx.shape == mean.shape == (4,)
        assert torch.all((idx >= 0) & (idx < 13))
        # flat grey 10*i survives resize + JPEG within a few levels
        assert torch.allclose(mean, 10.0 * idx.float(), atol=3)


def test_same_seed_same_order_other_seed_differs(shards):
    def run(seed: int, rank: int = 0) -> list:
        loader = make_train_loader(shard_urls(shards), batch_size=4, steps_per_epoch=5,
                                   num_workers=0, map_sample=index_of, seed=seed,
                                   rank=rank, world_size=2, shuffle_buffer=8)
        return epochs(loader, 2)

    a, b = run(7), run(7)
    assert a == b
    assert a[0] != a[1]  # each epoch draws new shards and a new shuffle
    assert run(8) != a
    assert run(7, rank=1) != a


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_steps_more_workers_than_shards(shards, num_workers):
    one_shard = shard_urls(shards)[2:]  # 3 samples, fewer than workers x batch
    loader = make_train_loader(one_shard, batch_size=5, steps_per_epoch=4,
                               num_workers=num_workers, map_sample=index_of, seed=0)
    got = epochs(loader, 2)
    assert [len(e) for e in got] == [4, 4]
    assert all(len(b) == 5 and set(b) <= {10, 11, 12} for e in got for b in e)


def test_simulated_ranks_equal_steps(shards):
    urls = shard_urls(shards)  # 3 shards over 2 ranks: a plain split would give 2 vs 1
    seen = []
    for rank in (0, 1):
        loader = make_train_loader(urls, batch_size=3, steps_per_epoch=6, num_workers=0,
                                   map_sample=index_of, seed=0, rank=rank, world_size=2)
        got = epochs(loader, 2)
        assert [len(e) for e in got] == [6, 6]
        seen.append(got)
    assert seen[0] != seen[1]


def test_bad_arguments(shards):
    urls = shard_urls(shards)
    with pytest.raises(ValueError, match="rank=2"):
        make_train_loader(urls, batch_size=1, steps_per_epoch=1, num_workers=0,
                          map_sample=index_of, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        make_train_loader(urls, batch_size=1, steps_per_epoch=0, num_workers=0,
                          map_sample=index_of, seed=0)
    with pytest.raises(ValueError, match="no shard urls"):
        make_train_loader([], batch_size=1, steps_per_epoch=1, num_workers=0,
                          map_sample=index_of, seed=0)


def _ddp_worker(rank: int, world_size: int, urls: list[str], store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        # Rank 0 reads with a worker process, rank 1 in-process: still the same step count.
        loader = make_train_loader(urls, batch_size=2, steps_per_epoch=5,
                                   num_workers=1 if rank == 0 else 0, map_sample=index_of,
                                   seed=3, rank=dist.get_rank(), world_size=dist.get_world_size())
        steps = 0
        for _ in range(2):
            for idx, _mean in loader:
                # a collective per step, like DDP's gradient all-reduce: a rank with fewer
                # steps would leave the other waiting here until the timeout
                t = torch.ones(1)
                dist.all_reduce(t)
                assert t.item() == world_size
                steps += 1
        lo, hi = torch.tensor([steps]), torch.tensor([steps])
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"steps": steps, "min": lo.item(), "max": hi.item()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gloo_two_processes_equal_steps(shards, tmp_path):
    urls = shard_urls(shards)  # 3 shards, uneven over 2 ranks
    tmp_mp.start_processes(_ddp_worker, args=(2, urls, str(tmp_path / "store"), str(tmp_path)),
                           nprocs=2, join=True, start_method="fork")
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in res] == [10, 10]
    assert all(r["min"] == r["max"] == 10 for r in res)


# --------------------------------------------------------------------------- decode: gpu path
def _photo(item: _Item) -> bytes:
    """A 20 px image with detail (gradient, a bar, noise): flips and JPEG decoding show."""
    rng = np.random.default_rng(item.i)
    y, x = np.mgrid[0:20, 0:20]
    img = np.stack([x * 12, y * 12, (x + y) * 6], -1) + rng.normal(0, 8, (20, 20, 3))
    img[:, 2:5] = (10 * item.i) % 256  # a vertical bar left of centre
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> Path:
    """13 detailed 16 px samples in 3 shards, JPEG q95 (the shards stage's encoding)."""
    out = tmp_path_factory.mktemp("photo_shards")
    build_shards([_Item(i) for i in range(13)], _photo, out,
                 ShardsParams(image_size=16, samples_per_shard=5, workers=1), progress=False)
    return out


def _both_paths(urls: list[str], *, num_workers: int, n_epochs: int, flip: bool = True,
                image_size: int = 16, **kw) -> tuple[list, list, list]:
    """Batches of the CPU path (PIL decode in the loader) and of the device path (raw bytes,
    decoded by decode_batch on the CPU device), each read from a fresh loader after the same
    torch seed, as train_mae reads them."""
    from pipeline.jpeg_batch import CollateJpeg, JpegBatch, MapRawJpeg, decode_batch
    from pipeline.pretrain import MapSample

    common = dict(batch_size=4, steps_per_epoch=3, num_workers=num_workers, seed=5, **kw)
    torch.manual_seed(11)
    cpu_loader = make_train_loader(urls, map_sample=MapSample(image_size, flip), **common)
    cpu = [[b[0] for b in cpu_loader] for _ in range(n_epochs)]
    torch.manual_seed(11)
    raw_loader = make_train_loader(urls, map_sample=MapRawJpeg(image_size, flip),
                                   decode_images=False, collate_fn=CollateJpeg(image_size),
                                   **common)
    raw = [[b for b in raw_loader] for _ in range(n_epochs)]
    assert all(isinstance(b, JpegBatch) and len(b) == 4 for e in raw for b in e)
    dev = [[decode_batch(b, "cpu") for b in e] for e in raw]
    return cpu, dev, raw


@pytest.mark.parametrize("num_workers", [0, 2])
def test_device_decode_equals_cpu_path(photo_shards, num_workers):
    """pretrain.decode: gpu's batches (decoded here on the CPU device) are the CPU path's,
    flips included, epoch after epoch, with the same number of steps."""
    cpu, dev, raw = _both_paths(shard_urls(photo_shards), num_workers=num_workers, n_epochs=2)
    assert [len(e) for e in cpu] == [len(e) for e in dev] == [3, 3]
    for a_epoch, b_epoch in zip(cpu, dev):
        for a, b in zip(a_epoch, b_epoch):
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (4, 3, 16, 16)
            assert torch.equal(a, b)  # both libjpeg on CPU: exact
    flips = torch.cat([b.flip for e in raw for b in e])
    assert 0 < int(flips.sum()) < len(flips)  # both orientations were drawn
    assert not torch.equal(torch.stack(cpu[0]), torch.stack(cpu[1]))  # epochs differ


def test_device_decode_flips_exactly_the_flagged_images(photo_shards):
    from pipeline.jpeg_batch import CollateJpeg, MapRawJpeg, decode_batch

    loader = make_train_loader(shard_urls(photo_shards), batch_size=6, steps_per_epoch=1,
                               num_workers=0, map_sample=MapRawJpeg(16, False),
                               decode_images=False, collate_fn=CollateJpeg(16), seed=0)
    batch = next(iter(loader))
    assert not batch.flip.any()
    plain = decode_batch(batch, "cpu")
    batch.flip = torch.tensor([True, False, True, False, False, True])
    flipped = decode_batch(batch, "cpu")
    for i, f in enumerate(batch.flip.tolist()):
        assert torch.equal(flipped[i], plain[i].flip(-1) if f else plain[i])
    # the bar sits left of centre: a flip moves the bar's pixels to the right
    assert not torch.equal(flipped[0], plain[0])


def test_device_decode_resizes_and_names_broken_jpegs(photo_shards):
    from pipeline.jpeg_batch import JpegBatch, MapRawJpeg, decode_batch

    # Shards at 16 px read for 24 px images: resized (antialiased bicubic on the device vs
    # Pillow's bicubic on the CPU path: close, not equal).
    cpu, dev, _ = _both_paths(shard_urls(photo_shards), num_workers=0, n_epochs=1,
                              image_size=24)
    for a, b in zip(cpu[0], dev[0]):
        assert b.shape == (4, 3, 24, 24)
        assert (a - b).abs().mean() < 0.1  # normalised units: ~6 grey levels of 255
    broken = JpegBatch([torch.frombuffer(bytearray(b"\xff\xd8not a jpeg"), dtype=torch.uint8)],
                       torch.zeros(1, dtype=torch.bool), 16, ["syn-000007"])
    with pytest.raises(ValueError, match="syn-000007.*does not decode.*pretrain.decode: cpu"):
        decode_batch(broken, "cpu")
    with pytest.raises(ValueError, match="no JPEG bytes"):
        MapRawJpeg(16, True)({"__key__": "k", "json": b"{}"})


def test_device_decode_refused_without_cuda():
    from pipeline.jpeg_batch import check_device_decode

    check_device_decode("cpu", torch.device("cpu"))  # the default path needs nothing
    with pytest.raises(ValueError, match="pretrain.decode: gpu needs a CUDA device.*"
                                         "pretrain.decode: cpu"):
        check_device_decode("gpu", torch.device("cpu"))
