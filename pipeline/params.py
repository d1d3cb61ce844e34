"""Typed, strict parameters: params.yaml is parsed once into frozen dataclasses.

Every stage calls :func:`load_params` before doing any work, so a typo, a wrong type or an
out-of-range value fails at once with the dotted key's name (``ParamsError``), never after an
hour of training; so do a NaN or infinite number, a key given twice, an empty file or section
and a file that is not YAML text. Field metadata carries the allowed range or choices;
``__post_init__`` checks cross-field rules. ``lambda`` is a Python keyword, so the top-level
YAML key ``lambda`` maps to the attribute ``lambda_``.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODEL_SIZES = ("mini", "tiny", "small", "base", "large", "huge")

# Sources the download stage knows (see pipeline/sources.py for how each is obtained).
PRETRAIN_SOURCES = (
    "synthetic", "celeba", "ffhq", "vggface2", "casia_webface", "megaface",
    "edface_celeb_1m", "umdfaces", "laion_face", "folder",
)
AU_DATASETS = ("synthetic", "bp4d", "bp4d_plus", "disfa")
# Number of subject-exclusive parts per dataset (protocols.md); synthetic is a param.
AU_DATASET_PARTS = {"bp4d": 3, "bp4d_plus": 4, "disfa": 3}
FINETUNE_VARIANTS = ("fmae", "iat")
# finetune keys a per-dataset, per-variant recipe (finetune.recipes) may override
RECIPE_KEYS = ("epochs", "warmup_epochs", "blr")
# Facial expression recognition datasets (paper Table 4; pipeline/fer_data.py reads them).
FER_DATASETS = ("synthetic", "rafdb", "affectnet")


class ParamsError(ValueError):
    """A params file or value is wrong; the message names the key and what to do."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, choices: tuple | None = None, doc: str = "") -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices,
            "doc": doc}


def F(default: Any, lo=None, hi=None, *, lo_open=False, hi_open=False, choices=None, doc=""):
    """A dataclass field with a default and a validated range or set of choices."""
    meta = _range(lo, hi, lo_open=lo_open, hi_open=hi_open, choices=choices, doc=doc)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class SyntheticParams:
    """The built-in synthetic face data (pipeline/synthetic.py)."""
    subjects: int = F(30, 3, 500, doc="number of synthetic subjects (AU dataset)")
    tasks: int = F(8, 1, 8, doc="tasks per subject, named T1..Tn like BP4D")
    frames_per_task: int = F(25, 2, 10000)
    frame_size: int = F(144, 32, 1024, doc="height of the AU frames in pixels")
    wild: bool = F(True, doc="AU frames are 4:3 scenes with the face off-centre at a known "
                             "box (au/face_boxes.csv), cropped by au_shards' detector; false "
                             "= square face-centred frames")
    pool_images: int = F(2000, 10, 10_000_000, doc="in-the-wild pretraining pool size")
    pool_broken: int = F(7, 0, 1000, doc="corrupt/odd files added to the pool")
    seed: int = F(0, 0)


@dataclass(frozen=True)
class SyntheticFerParams:
    """The built-in synthetic expression set (pipeline/synthetic.py generate_fer)."""
    subjects: int = F(16, 2, 1000, doc="synthetic identities (never the AU subjects)")
    test_subjects: int = F(4, 1, 999, doc="identities held out as the test split")
    frames_per_expression: int = F(6, 1, 1000, doc="frames per subject and expression")
    frame_size: int = F(64, 32, 1024, doc="side of the square face crops in pixels")
    seed: int = F(0, 0)

    def __post_init__(self):
        if self.test_subjects >= self.subjects:
            raise ParamsError(f"download.synthetic_fer.test_subjects ({self.test_subjects}) "
                              f"must be below download.synthetic_fer.subjects "
                              f"({self.subjects}): training needs subjects too")


@dataclass(frozen=True)
class DownloadParams:
    sources: list = F(["synthetic"], choices=PRETRAIN_SOURCES,
                      doc="pretraining sources, see pipeline/sources.py")
    au_datasets: list = F(["synthetic"], choices=AU_DATASETS)
    retries: int = F(5, 0, 100)
    timeout_s: float = F(60.0, 1, 3600)
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    fer_datasets: list = F(["synthetic"], choices=FER_DATASETS,
                           doc="expression datasets (Table 4); [] = none")
    synthetic_fer: SyntheticFerParams = field(default_factory=SyntheticFerParams)

    def __post_init__(self):
        _unique("download.sources", self.sources, nonempty=True)
        _unique("download.au_datasets", self.au_datasets, nonempty=True)
        _unique("download.fer_datasets", self.fer_datasets)


@dataclass(frozen=True)
class ShardsParams:
    image_size: int = F(64, 16, 4096, doc="every kept image is resized to this square size")
    max_aspect_ratio: float = F(1.5, 1.0, 100.0, doc="drop when w/h or h/w is above this")
    jpeg_quality: int = F(95, 1, 100)
    samples_per_shard: int = F(256, 1, 10_000_000)
    workers: int = F(0, 0, 1024, doc="decode processes; 0 = all cores")
    draft: bool = F(True, doc="JPEG DCT-domain downscaling while decoding (libjpeg draft)")
    codec: str = F("auto", choices=("auto", "turbo", "pillow"),
                   doc="JPEG decode/resize/encode: turbo = simplejpeg (libjpeg-turbo, M/8 DCT "
                       "scaling) + torch's uint8 resize; pillow = Pillow only; auto = turbo "
                       "when importable, else pillow")
    min_side: int = F(0, 0, 1_000_000, doc="drop images whose shorter side is below this "
                                           "(reference: 224); 0 = off")


@dataclass(frozen=True)
class AuShardsParams:
    image_size: int = F(64, 16, 4096)
    jpeg_quality: int = F(95, 1, 100)
    samples_per_shard: int = F(5000, 1, 10_000_000)
    disfa_camera: str = F("right", choices=("left", "right"))
    disfa_threshold: int = F(2, 1, 5, doc="DISFA AU is positive when intensity >= this")
    synthetic_parts: int = F(3, 2, 100, doc="subject-exclusive parts of the synthetic set")
    workers: int = F(0, 0, 1024)
    face_crop: str = F("detect", choices=("detect", "none"),
                       doc="detect: detector box + 5% per side (reference); none: whole frame")
    face_detector: str = F("mtcnn", choices=("mtcnn",))
    face_square: bool = F(False, doc="make the box square about its centre before the margin")
    face_threshold: float = F(0.5, 0.0, 1.0, hi_open=True,
                              doc="score a face needs at the detector's last stage "
                                  "(MTCNN: 0.7 as facenet-pytorch)")
    face_min_size: int = F(40, 8, 4096, doc="smallest face side in detection-image pixels")
    face_max_side: int = F(640, 64, 16384, doc="longer side frames are downscaled to for "
                                                "detection only")


@dataclass(frozen=True)
class FerFaceCropParams:
    """Per FER dataset: ``none`` = the images are aligned face crops already (RAF-DB's
    ``aligned`` release, AffectNet's public subset, the synthetic set: how the authors used
    them), ``detect`` = the shared face front-end (pipeline/faces.py) crops the largest face."""
    synthetic: str = F("none", choices=("none", "detect"))
    rafdb: str = F("none", choices=("none", "detect"))
    affectnet: str = F("none", choices=("none", "detect"))


@dataclass(frozen=True)
class FerShardsParams:
    image_size: int = F(64, 16, 4096, doc="plain resize of every image (paper: 224)")
    jpeg_quality: int = F(95, 1, 100)
    samples_per_shard: int = F(5000, 1, 10_000_000)
    face_crop: FerFaceCropParams = field(default_factory=FerFaceCropParams)
    face_detector: str = F("mtcnn", choices=("mtcnn",))
    face_threshold: float = F(0.7, 0.0, 1.0, hi_open=True,
                              doc="MTCNN last-stage score a face needs")
    face_min_size: int = F(20, 8, 4096, doc="smallest face side in detection-image pixels")
    face_max_side: int = F(640, 64, 16384, doc="longer side images are downscaled to for "
                                                "detection only")


@dataclass(frozen=True)
class PretrainParams:
    checkpoint: str = F("", doc="non-empty: skip pretraining and use this checkpoint file")
    image_size: int = F(64, 16, 1024)
    patch_size: int = F(16, 2, 64)
    decoder_dim: int = F(128, 8, 4096)
    decoder_depth: int = F(2, 1, 64)
    decoder_heads: int = F(4, 1, 64)
    mask_ratio: float = F(0.75, 0.0, 1.0, hi_open=True)
    norm_pix_loss: bool = F(True)
    epochs: int = F(36, 1, 10000)
    warmup_epochs: int = F(2, 0, 10000)
    steps_per_epoch: int = F(0, 0, doc="0 = shard samples / global batch")
    batch_size: int = F(64, 1, 65536, doc="per-process batch")
    accum_iter: int = F(1, 1, 1024)
    blr: float = F(1.5e-3, 0.0, 1.0, lo_open=True)
    min_lr: float = F(0.0, 0.0, 1.0)
    weight_decay: float = F(0.05, 0.0, 1.0)
    amp: str = F("auto", choices=("auto", "bf16", "fp16", "off"))
    num_workers: int = F(0, 0, 256)
    nproc_per_node: int = F(1, 1, 1024, doc="processes (GPUs) torchrun starts on this machine")
    save_every: int = F(1, 1, 10000, doc="resume checkpoint interval in epochs")
    log_every: int = F(10, 1, 100000, doc="steps between MLflow loss points")
    flip: bool = F(True)
    decode: str = F("cpu", choices=("cpu", "gpu"),
                    doc="where JPEGs are decoded: cpu = Pillow in the loader workers; gpu = "
                        "batched nvJPEG on the training GPU (no CUDA: the run stops, no "
                        "fallback)")

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ParamsError(f"pretrain.image_size ({self.image_size}) must be a multiple of "
                              f"pretrain.patch_size ({self.patch_size})")
        if self.decoder_dim % self.decoder_heads:
            raise ParamsError("pretrain.decoder_dim must be divisible by pretrain.decoder_heads")
        if self.warmup_epochs > self.epochs:
            raise ParamsError("pretrain.warmup_epochs must not exceed pretrain.epochs")


@dataclass(frozen=True)
class AugmentParams:
    """Training augmentation of the AU finetuning (timm transforms)."""
    scale_min: float = F(0.6, 0.0, 1.0, lo_open=True)
    hflip: float = F(0.5, 0.0, 1.0)
    rand_augment: str = F("", doc="timm RandAugment spec, '' = off (paper: rand-m9-mstd0.5-inc1)")
    reprob: float = F(0.0, 0.0, 1.0, doc="RandomErasing probability (paper: 0.25)")


@dataclass(frozen=True)
class FinetuneParams:
    runs: list = F(["synthetic-1", "synthetic-2", "synthetic-3"],
                   doc="<dataset>-<fold>; fold k tests on part k")
    image_size: int = F(64, 16, 1024)
    epochs: int = F(8, 1, 10000)
    warmup_epochs: int = F(1, 0, 10000)
    batch_size: int = F(32, 1, 65536)
    blr: float = F(5e-3, 0.0, 1.0, lo_open=True)
    min_lr: float = F(1e-6, 0.0, 1.0)
    weight_decay: float = F(0.05, 0.0, 1.0)
    layer_decay: float = F(0.75, 0.0, 1.0, lo_open=True)
    drop_path: float = F(0.0, 0.0, 1.0, hi_open=True, doc="stochastic depth (paper: 0.1)")
    id_head_depth: int = F(1, 1, 3, doc="1 = linear ID head (paper), 2/3 = MLP (Table 7)")
    id_loss: str = F("bce", choices=("bce", "ce"),
                     doc="ID loss: one-hot BCE (authors' code) or cross-entropy (paper text)")
    id_classes: str = F("dataset", choices=("dataset", "train"),
                        doc="ID classes: every subject of the dataset (reference) or the "
                            "fold's training subjects")
    id_head_init: str = F("default", choices=("default", "small", "prior"),
                          doc="ID head init: nn.Linear default (reference), trunc-normal 2e-5, "
                              "or default weights with the output bias at the class prior "
                              "(where the reference's head gets after its long schedule, "
                              "which ~1000 CPU steps never reach)")
    au_head_init: str = F("prior", choices=("default", "prior"),
                          doc="AU head output bias: nn.Linear default (reference) or each AU's "
                              "training base rate (CPU default: the reference's head learns "
                              "the rates in its first epochs, ~1000 CPU steps do not)")
    unknown_labels: str = F("mask", choices=("mask", "negative"),
                            doc="BP4D 9 = not coded: masked out, or counted as absent")
    val_fraction: float = F(0.0, 0.0, 0.5, hi_open=True,
                            doc="share of training subjects held out for honest selection")
    save_backbone_epochs: list = F([0, 1, 8],
                                   doc="epochs whose backbone the identity probe reads")
    amp: str = F("auto", choices=("auto", "bf16", "fp16", "off"))
    num_workers: int = F(0, 0, 256)
    nproc_per_node: int = F(1, 1, 1024, doc="processes (GPUs) torchrun starts on this machine "
                                            "per finetuning run; lr scales with the global batch")
    augment: AugmentParams = field(default_factory=AugmentParams)
    sweep_lambdas: list = F([], doc="Tables 5-6: extra IAT runs per lambda; [] = skip")
    sweep_id_head_depths: list = F([], doc="Table 7: extra IAT runs per ID head depth")
    sweep_runs: list = F([], doc="runs the sweeps use, e.g. [bp4d-2]")
    lambda_per_dataset: dict = F({}, doc="dataset -> IAT lambda, overriding the top-level "
                                         "lambda for that dataset (paper: bp4d 2, bp4d_plus 1, "
                                         "disfa 0.5)")
    recipes: dict = F({"fmae": {}, "iat": {}},
                      doc="variant -> dataset -> {epochs, warmup_epochs, blr} overriding "
                          "this section's values for those runs (pipeline/recipes.py)")
    extra_seeds: list = F([], doc="seeds each run is repeated with, beyond the top-level "
                                  "seed; tables give mean and std over all seeds")

    def __post_init__(self):
        _unique("finetune.runs", self.runs, nonempty=True)
        object.__setattr__(self, "lambda_per_dataset", _check_lambda_map(
            "finetune.lambda_per_dataset", self.lambda_per_dataset))
        object.__setattr__(self, "recipes", _check_recipes(self))
        _unique("finetune.extra_seeds", self.extra_seeds)
        for s in self.extra_seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ParamsError(f"finetune.extra_seeds: {s!r} must be an integer >= 0")
        for r in list(self.runs) + list(self.sweep_runs):
            parse_run(r)
        if self.warmup_epochs > self.epochs:
            raise ParamsError("finetune.warmup_epochs must not exceed finetune.epochs")
        # a run saves the listed epochs it reaches (pipeline/recipes.py), so the bound is the
        # longest run: finetune.epochs or a finetune.recipes entry's epochs
        longest = max([self.epochs] + [r.get("epochs", 0) for by_ds in self.recipes.values()
                                       for r in by_ds.values()])
        for e in self.save_backbone_epochs:
            if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e <= longest:
                raise ParamsError(f"finetune.save_backbone_epochs: {e!r} is not an epoch "
                                  f"between 0 and finetune.epochs ({self.epochs})"
                                  + (f" or the longest recipe's ({longest})"
                                     if longest > self.epochs else ""))
        for lam in self.sweep_lambdas:
            if (isinstance(lam, bool) or not isinstance(lam, (int, float))
                    or not math.isfinite(lam) or lam < 0):
                raise ParamsError(f"finetune.sweep_lambdas: {lam!r} must be a finite "
                                  "number >= 0")
        for d in self.sweep_id_head_depths:
            if d not in (1, 2, 3) or isinstance(d, bool):
                raise ParamsError(f"finetune.sweep_id_head_depths: {d!r} must be 1, 2 or 3")
        if (self.sweep_lambdas or self.sweep_id_head_depths) and not self.sweep_runs:
            raise ParamsError("finetune.sweep_runs is empty but a sweep is set: list the runs "
                              "to sweep, e.g. sweep_runs: [bp4d-2]")


@dataclass(frozen=True)
class FerRecipe:
    """One FER dataset's schedule (paper: RAF-DB 60/6 epochs, batch 32, blr 1e-3;
    AffectNet-8 30/3, batch 64, blr 5e-4)."""
    epochs: int = F(8, 1, 10000)
    warmup_epochs: int = F(1, 0, 10000)
    batch_size: int = F(32, 1, 65536)
    blr: float = F(8e-3, 0.0, 1.0, lo_open=True, doc="lr = blr * batch / 256")

    def __post_init__(self):
        if self.warmup_epochs > self.epochs:
            raise ParamsError("finetune_fer.<dataset>.warmup_epochs must not exceed its "
                              f"epochs ({self.warmup_epochs} > {self.epochs})")


@dataclass(frozen=True)
class FinetuneFerParams:
    """Expression finetuning (pipeline/fer.py): linear head, cross-entropy, no IAT; the
    optimiser, schedule and transforms of the AU finetuning. Shared settings here, the
    schedule per dataset (``synthetic``, ``rafdb``, ``affectnet``)."""
    datasets: list = F(["synthetic"], choices=FER_DATASETS,
                       doc="one finetune_fer run per dataset (dvc matrix)")
    image_size: int = F(64, 16, 1024)
    min_lr: float = F(1e-6, 0.0, 1.0)
    weight_decay: float = F(0.05, 0.0, 1.0)
    layer_decay: float = F(0.75, 0.0, 1.0, lo_open=True)
    drop_path: float = F(0.1, 0.0, 1.0, hi_open=True)
    amp: str = F("auto", choices=("auto", "bf16", "fp16", "off"))
    num_workers: int = F(0, 0, 256)
    # no crop or erasing by default: they cut brows and mouth off the 64 px CPU-default faces
    augment: AugmentParams = field(default_factory=lambda: AugmentParams(1.0, 0.5, "", 0.0))
    synthetic: FerRecipe = field(default_factory=FerRecipe)
    rafdb: FerRecipe = field(default_factory=lambda: FerRecipe(60, 6, 32, 1e-3))
    affectnet: FerRecipe = field(default_factory=lambda: FerRecipe(30, 3, 64, 5e-4))

    def __post_init__(self):
        _unique("finetune_fer.datasets", self.datasets)

    def recipe(self, dataset: str) -> FerRecipe:
        if dataset not in FER_DATASETS:
            raise ParamsError(f"finetune_fer: unknown dataset {dataset!r}; known: "
                              f"{', '.join(FER_DATASETS)}")
        return getattr(self, dataset)


@dataclass(frozen=True)
class ProbeParams:
    """Identity probes (pipeline/probe.py). The authors' recipe trains with the finetuning
    optimiser, augmentation and drop path (``finetune.*``) for ``epochs``."""
    frames_per_subject: int = F(20, 2, 100000, doc="paper: 100 (70 train / 30 test)")
    train_fraction: float = F(0.7, 0.0, 1.0, lo_open=True, hi_open=True)
    epochs: int = F(20, 1, 100000, doc="authors' recipe: 20")
    warmup_epochs: int = F(2, 0, 100000, doc="authors' recipe: 2")
    converged_max_iter: int = F(2000, 10, 1_000_000,
                                doc="L-BFGS iteration cap of the converged probe")
    underfit_below: float = F(90.0, 0.0, 100.0,
                              doc="a probe whose training accuracy (%) is below this is "
                                  "flagged as underfitting")
    batch_size: int = F(256, 1, 65536, doc="feature-extraction batch (no effect on results)")
    tsne_subjects: int = F(20, 2, 1000)
    num_workers: int = F(0, 0, 256)
    nproc_per_node: int = F(1, 1, 1024, doc="processes (GPUs) torchrun starts for the probe "
                                            "stage; results do not depend on it")

    def __post_init__(self):
        if self.warmup_epochs > self.epochs:
            raise ParamsError("probe.warmup_epochs must not exceed probe.epochs")


@dataclass(frozen=True)
class TablesParams:
    show_published: bool = F(True, doc="print the paper's rows beside ours")


@dataclass(frozen=True)
class Params:
    lambda_: float = F(2.0, 0.0, 1000.0, doc="IAT strength: the reversed gradient's factor")
    model_size: str = F("mini", choices=MODEL_SIZES)
    seed: int = F(0, 0)
    download: DownloadParams = field(default_factory=DownloadParams)
    shards: ShardsParams = field(default_factory=ShardsParams)
    au_shards: AuShardsParams = field(default_factory=AuShardsParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    probe: ProbeParams = field(default_factory=ProbeParams)
    tables: TablesParams = field(default_factory=TablesParams)
    fer_shards: FerShardsParams = field(default_factory=FerShardsParams)
    finetune_fer: FinetuneFerParams = field(default_factory=FinetuneFerParams)

    def __post_init__(self):
        missing = [d for d in self.finetune_fer.datasets if d not in self.download.fer_datasets]
        if missing:
            raise ParamsError(f"finetune_fer.datasets: {missing[0]!r} is not in "
                              f"download.fer_datasets {list(self.download.fer_datasets)}; "
                              "add it there")
        au = set(self.download.au_datasets)
        for r in list(self.finetune.runs) + list(self.finetune.sweep_runs):
            ds, fold = parse_run(r)
            if ds not in au:
                raise ParamsError(f"finetune.runs: run {r!r} uses dataset {ds!r}, which is not "
                                  f"in download.au_datasets {sorted(au)}; add it there")
            n = n_parts(ds, self)
            if fold > n:
                raise ParamsError(f"finetune.runs: run {r!r}: {ds} has {n} folds (1..{n})")
        if self.seed in self.finetune.extra_seeds:
            raise ParamsError(f"finetune.extra_seeds: {self.seed} is the top-level seed, whose "
                              "runs are the main finetune stages; list only the other seeds")


# --------------------------------------------------------------------------- helpers
_RUN_RE = re.compile(r"^(?P<ds>[a-z_0-9]+?)-(?P<fold>\d+)$")


def parse_run(run: str) -> tuple[str, int]:
    """``"bp4d-2"`` -> ``("bp4d", 2)``; unknown datasets or folds raise ParamsError."""
    m = _RUN_RE.match(str(run))
    if not m:
        raise ParamsError(f"finetune.runs: {run!r} is not '<dataset>-<fold>', e.g. 'bp4d-1'")
    ds, fold = m["ds"], int(m["fold"])
    if ds not in AU_DATASETS:
        raise ParamsError(f"finetune.runs: {run!r}: unknown dataset {ds!r}; "
                          f"known: {', '.join(AU_DATASETS)}")
    if fold < 1 or (ds in AU_DATASET_PARTS and fold > AU_DATASET_PARTS[ds]):
        n = AU_DATASET_PARTS.get(ds)
        raise ParamsError(f"finetune.runs: {run!r}: fold {fold} does not exist for {ds}"
                          + (f" (folds 1..{n})" if n else ""))
    return ds, fold


def n_parts(dataset: str, params: "Params") -> int:
    return AU_DATASET_PARTS.get(dataset, params.au_shards.synthetic_parts)


def _unique(key: str, values: list, nonempty: bool = False) -> None:
    if nonempty and not values:
        raise ParamsError(f"{key} must not be empty")
    if len(set(map(str, values))) != len(values):
        raise ParamsError(f"{key} lists a value twice: {values}")


def _check_lambda_map(key: str, mapping: dict) -> dict:
    """``{dataset: lambda}`` with known dataset names and lambdas in [0, 1000], as floats."""
    out = {}
    for ds, lam in mapping.items():
        if ds not in AU_DATASETS:
            raise ParamsError(f"{key}: unknown dataset {ds!r}; known: {', '.join(AU_DATASETS)}")
        meta = dict(next(f for f in dataclasses.fields(Params) if f.name == "lambda_").metadata)
        out[ds] = _check_scalar(f"{key}.{ds}", lam, float, meta)
    return out


def _check_recipes(cfg: "FinetuneParams") -> dict:
    """Validate ``finetune.recipes`` (variant -> dataset -> {epochs, warmup_epochs, blr})
    against the section's own field ranges; every effective recipe must keep
    ``warmup_epochs <= epochs``. Returns the mapping with numbers cast (ints to float blr)."""
    fields = {f.name: f for f in dataclasses.fields(FinetuneParams)}
    hints = typing.get_type_hints(FinetuneParams)
    if not isinstance(cfg.recipes, dict):
        raise ParamsError(f"finetune.recipes: expected a mapping, got {cfg.recipes!r}")
    out: dict = {}
    for variant, by_ds in cfg.recipes.items():
        key = f"finetune.recipes.{variant}"
        if variant not in FINETUNE_VARIANTS:
            raise ParamsError(f"{key}: unknown variant {variant!r}; known: "
                              f"{', '.join(FINETUNE_VARIANTS)}")
        if by_ds is None:
            by_ds = {}
        if not isinstance(by_ds, dict):
            raise ParamsError(f"{key}: expected a mapping of dataset -> recipe, got {by_ds!r}")
        out[variant] = {}
        for ds, recipe in by_ds.items():
            dkey = f"{key}.{ds}"
            if ds not in AU_DATASETS:
                raise ParamsError(f"{dkey}: unknown dataset {ds!r}; known: "
                                  f"{', '.join(AU_DATASETS)}")
            if not isinstance(recipe, dict) or not recipe:
                raise ParamsError(f"{dkey}: expected a mapping of some of "
                                  f"{', '.join(RECIPE_KEYS)}, got {recipe!r}")
            checked = {}
            for k, v in recipe.items():
                if k not in RECIPE_KEYS:
                    raise ParamsError(f"{dkey}.{k}: unknown recipe key; a recipe may set "
                                      f"{', '.join(RECIPE_KEYS)}")
                checked[k] = _check_scalar(f"{dkey}.{k}", v, hints[k], dict(fields[k].metadata))
            epochs = checked.get("epochs", cfg.epochs)
            if checked.get("warmup_epochs", cfg.warmup_epochs) > epochs:
                raise ParamsError(f"{dkey}: warmup_epochs exceeds epochs ({epochs}); set "
                                  f"{dkey}.warmup_epochs")
            out[variant][ds] = checked
    for variant in FINETUNE_VARIANTS:
        out.setdefault(variant, {})
    return out


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_scalar(key: str, value: Any, tp, meta: dict) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true/false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
    elif tp is float:
        # YAML and `dvc exp run -S lambda=2` give ints for whole numbers: accept and cast.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):  # NaN compares False with every bound: check it first
            raise ParamsError(f"{key}: {value!r} is not a finite number")
    elif tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
    elif tp is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
    elif tp is dict:
        if value is None:  # `key:` with nothing under it
            value = {}
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {value!r}")
    choices = meta.get("choices")
    if choices is not None:
        items = value if isinstance(value, list) else [value]
        for v in items:
            if v not in choices:
                raise ParamsError(f"{key}: {v!r} is not one of {', '.join(map(str, choices))}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        raise ParamsError(f"{key}: {value!r} is out of range (must be "
                          f"{'>' if meta.get('lo_open') else '>='} {lo})")
    if hi is not None and (value > hi or (meta.get("hi_open") and value == hi)):
        raise ParamsError(f"{key}: {value!r} is out of range (must be "
                          f"{'<' if meta.get('hi_open') else '<='} {hi})")
    return value


def build(cls, data: Any, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and bad values."""
    where = prefix.rstrip(".") or "params"
    if data is None:
        raise ParamsError(f"section {where} is empty (YAML reads '{where.split('.')[-1]}:' with "
                          "nothing under it as null): indent its keys under it, or delete the "
                          "line to use the defaults")
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    yaml_name = {("lambda" if n == "lambda_" else n): n for n in fields}
    unknown = sorted(set(data) - set(yaml_name))
    if unknown:
        raise ParamsError(f"unknown key {prefix}{unknown[0]!s}; known keys under {where}: "
                          f"{', '.join(sorted(yaml_name))}")
    kwargs = {}
    for yname, value in data.items():
        name = yaml_name[yname]
        tp, key = hints[name], f"{prefix}{yname}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, key + ".")
        else:
            kwargs[name] = _check_scalar(key, value, tp, dict(fields[name].metadata))
    try:
        return cls(**kwargs)
    except ParamsError:
        raise
    except TypeError as e:  # pragma: no cover - defensive
        raise ParamsError(f"{where}: {e}") from e


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raises ParamsError naming the offending key."""
    path = Path(path)
    try:
        return build(Params, _read_mapping(path))
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None


def _read_mapping(path: Path) -> dict:
    """The params file's top-level mapping; any other content fails with what to do."""
    data = _parse_yaml(_read_text(path))
    if data is None:
        raise ParamsError("params file is empty (or only comments): write the parameters in "
                          "it, e.g. `git checkout params.yaml` or copy configs/paper.yaml")
    if not isinstance(data, dict):
        raise ParamsError(f"the top level must be a mapping of keys (lambda:, model_size:, "
                          f"pretrain:, ...), got {_short(data)}")
    return data


_TEXT_HINT = ("point the stage at the YAML params file (params.yaml), saved as UTF-8, or "
              "restore it with `git checkout params.yaml`")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ParamsError("params file not found (run from the repository root, or "
                          "copy configs/paper.yaml to params.yaml)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ParamsError(f"cannot read the params file: {e.strerror}") from None
    nul = raw.find(b"\0")
    if nul >= 0:
        raise ParamsError(f"binary file (NUL byte at offset {nul}), not YAML text: {_TEXT_HINT}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ParamsError(f"not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}): "
                          f"{_TEXT_HINT}") from None


def _parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that also rejects duplicate keys (YAML would keep the last)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _reject_duplicates(node, "", set())
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ParamsError(f"not valid YAML: {e}") from None
    finally:
        loader.dispose()


def _reject_duplicates(node: yaml.Node, prefix: str, seen_nodes: set) -> None:
    if id(node) in seen_nodes:  # an alias of a node already checked (or a recursive one)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicates(item, f"{prefix.rstrip('.')}[{i}].", seen_nodes)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[str, int] = {}  # scalar key -> line it is first set on
    for key_node, value_node in node.value:
        name, line = str(key_node.value), key_node.start_mark.line + 1
        if name in lines:
            where = f"in section {prefix.rstrip('.')}" if prefix else "at the top level"
            raise ParamsError(f"duplicate key {prefix}{name} {where}: line {line} repeats line "
                              f"{lines[name]} (YAML would silently keep the last); delete one")
        if isinstance(key_node, yaml.ScalarNode):
            lines[name] = line
        _reject_duplicates(value_node, f"{prefix}{name}.", seen_nodes)


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return f"a {type(value).__name__} {text if len(text) <= n else text[:n] + '...'}"


def to_dict(obj) -> dict:
    """Params (or a section) as a plain dict with YAML key names, for logging."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out["lambda" if f.name == "lambda_" else f.name] = (
            to_dict(v) if dataclasses.is_dataclass(v) else v)
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, for MLflow params."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
