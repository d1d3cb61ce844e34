"""Small shared utilities: atomic writes, logging, seeding and self-describing run folders."""
from __future__ import annotations

import errno
import json
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

log = logging.getLogger("pipeline")
_UMASK = os.umask(0)
os.umask(_UMASK)


def setup_logging(level: int = logging.INFO) -> None:
    """One log format for every stage (stderr, with time and module)."""
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)


# Names atomic_path gives its temporaries: ".tmp-<name>." + mkstemp's 8 random characters
# (a-z, 0-9, _) + an optional suffix such as ".png".
TMP_NAME_RE = re.compile(r"^\.tmp-.+\.[a-z0-9_]{8}(\.[A-Za-z0-9]+)?$")
# "no space left" and "disk quota exceeded": both mean the output's file system is full for us.
_DISK_FULL = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    A killed process leaves at most a ``.tmp-*`` file behind, never a half-written output
    (:func:`remove_stale_temporaries` clears those). A full disk (ENOSPC/EDQUOT) anywhere in
    the block is re-raised as an OSError of the same errno that names ``path`` and its folder.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise _disk_full_error(path, e) from e
        raise
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes 0600 files: give outputs the usual umask mode
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise _disk_full_error(path, e) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _disk_full_error(path: Path, e: OSError) -> OSError:
    """The same errno, with the output, its folder, the free space and what to do."""
    folder = path.parent
    try:
        free = f", {human_bytes(shutil.disk_usage(folder).free)} free there"
    except OSError:
        free = ""
    return OSError(e.errno, f"{path}: cannot write it, {e.strerror or os.strerror(e.errno)}"
                            f"{free}. Free space in {folder} (or on its file system) and re-run "
                            "the stage; no half-written file was left")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically and durably (fsync before the rename).

    Saves through a Python file object: torch's own file writer reports a full disk as an
    opaque ``RuntimeError`` ("unexpected pos ..."), a Python file as OSError ENOSPC, which
    :func:`atomic_path` turns into a message naming the folder.
    """
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def remove_stale_temporaries(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """Delete the ``.tmp-*`` files that killed runs' atomic writes left in ``folder``.

    Only regular files whose names match :data:`TMP_NAME_RE` (the names :func:`atomic_path`
    makes) are removed; anything else, symlinks and folders included, is left alone. Call it
    at the start of a stage, on folders that only this stage writes: a temporary of a write
    in flight in another process would be removed too. Logs each file and the bytes freed.

    Args:
        folder: a stage's output folder (missing: nothing to do).
        recursive: also clean its subfolders (e.g. finetuning's ``backbones/``).
    Returns:
        The removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    dirs = [Path(d) for d, _, _ in os.walk(folder)] if recursive else [folder]
    removed, freed = [], 0
    for d in dirs:
        with os.scandir(d) as entries:
            stale = [e for e in entries
                     if TMP_NAME_RE.match(e.name) and e.is_file(follow_symlinks=False)]
        for entry in stale:
            size = entry.stat(follow_symlinks=False).st_size
            try:
                os.unlink(entry.path)
            except FileNotFoundError:  # gone meanwhile: nothing to free
                continue
            log.info("removed stale temporary %s (%s) left by a killed run", entry.path,
                     human_bytes(size))
            removed.append(Path(entry.path))
            freed += size
    if removed:
        log.info("removed %d stale temporary file(s) under %s: %s freed", len(removed),
                 folder, human_bytes(freed))
    return sorted(removed)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; 100 -> '100 B'."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv_rows(path: str | Path, rows: list[dict], columns: Sequence[str]) -> None:
    """A CSV with ``columns`` (keys not among them ignored), non-finite floats as empty cells
    (per-epoch histories: a metric not measured in an epoch)."""
    import csv
    import io
    import math
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Write a matplotlib figure as PNG atomically, then free it."""
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def round_floats(obj: Any, digits: int = 4) -> Any:
    """Round every float in nested dicts/lists, for readable metrics files."""
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [round_floats(v, digits) for v in obj]
    if isinstance(obj, float):
        return round(obj, digits)
    return obj


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; run the stage that writes it "
                                f"(`dvc repro`)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it and re-run the stage") from e


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch
        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


def git_commit(cwd: str | Path | None = None) -> str:
    """The current git commit (with '-dirty' if the tree has changes), or 'unknown'."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        # dvc.lock is rewritten by every `dvc repro`: it is not a code change
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)dvc.lock"],
                               cwd=cwd, capture_output=True, text=True, timeout=10).stdout
        return rev + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "timm", "webdataset", "PIL", "numpy", "pandas", "mlflow", "dvc"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional module is just not listed
            pass
    return out


def write_run_info(out_dir: str | Path, params: dict) -> None:
    """Make a run folder describe itself: resolved params, versions, git commit."""
    atomic_write_json(Path(out_dir) / "run_info.json",
                      {"params": params, "versions": versions(), "git_commit": git_commit(),
                       "dvc_stage": os.environ.get("DVC_STAGE"),
                       "dvc_exp": os.environ.get("DVC_EXP_NAME")})
