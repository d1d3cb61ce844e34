"""params.yaml is strict: unknown keys, wrong types, out-of-range values fail with the key."""
import re
from pathlib import Path

import pytest
import yaml

from pipeline.params import Params, ParamsError, load_params, parse_run, to_dict

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def base() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_load_and_match_code_defaults():
    p = load_params(ROOT / "params.yaml")
    assert p.lambda_ == 2.0 and p.model_size == "mini"  # the CPU default (mini ViT)
    # the committed file spells out every default: nothing hidden in code that DVC cannot see
    assert to_dict(p) == to_dict(Params())


def test_paper_profile_is_the_paper_setting():
    p = load_params(ROOT / "configs" / "paper.yaml")
    assert p.model_size == "large"
    assert p.pretrain.image_size == 224 and p.pretrain.patch_size == 16
    assert (p.pretrain.decoder_dim, p.pretrain.decoder_depth, p.pretrain.decoder_heads) == (512, 8, 16)
    assert p.pretrain.epochs == 50 and p.pretrain.warmup_epochs == 2 and p.pretrain.blr == 1.5e-4
    assert p.pretrain.batch_size * p.pretrain.accum_iter * p.pretrain.nproc_per_node == 512
    assert p.finetune.image_size == 224 and p.finetune.batch_size == 64
    assert set(p.download.sources) == {"celeba", "ffhq", "vggface2", "casia_webface", "megaface",
                                       "edface_celeb_1m", "umdfaces", "laion_face"}
    assert set(p.download.au_datasets) == {"bp4d", "bp4d_plus", "disfa"}
    assert len(p.finetune.runs) == 3 + 4 + 3


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.update(lamda=1.0), "lamda"),
    (lambda d: d["pretrain"].update(epoch=3), "pretrain.epoch"),
    (lambda d: d["download"]["synthetic"].update(subject=3), "download.synthetic.subject"),
])
def test_unknown_key_is_named(tmp_path, mutate, key):
    d = base()
    mutate(d)
    with pytest.raises(ParamsError, match=f"unknown key {key}"):
        load_params(write(tmp_path, d))


@pytest.mark.parametrize("section, key, value, msg", [
    ("pretrain", "epochs", "ten", "pretrain.epochs: expected an integer"),
    ("pretrain", "epochs", 2.5, "pretrain.epochs: expected an integer"),
    ("pretrain", "mask_ratio", 1.0, "pretrain.mask_ratio: 1.0 is out of range"),
    ("shards", "max_aspect_ratio", 0.9, "shards.max_aspect_ratio: 0.9 is out of range"),
    ("shards", "draft", "yes", "shards.draft: expected true/false"),
    ("finetune", "id_head_depth", 4, "finetune.id_head_depth: 4 is out of range"),
    ("download", "sources", ["celeb_a"], "download.sources: 'celeb_a' is not one of"),
    (None, "model_size", "gigantic", "model_size: 'gigantic' is not one of"),
    (None, "lambda", -1, "lambda: -1.0 is out of range"),
])
def test_bad_values_are_named(tmp_path, section, key, value, msg):
    d = base()
    (d[section] if section else d)[key] = value
    with pytest.raises(ParamsError, match=msg.replace("(", r"\(").replace(".", r"\.")):
        load_params(write(tmp_path, d))


def test_lambda_int_from_dvc_set_param_is_cast(tmp_path):
    # `dvc exp run -S lambda=2` writes an int; it must be accepted as the float 2.0
    d = base()
    d["lambda"] = 2
    p = load_params(write(tmp_path, d))
    assert p.lambda_ == 2.0 and isinstance(p.lambda_, float)


def test_cross_field_rules(tmp_path):
    d = base()
    d["pretrain"]["image_size"] = 60  # not a multiple of patch 8
    with pytest.raises(ParamsError, match="multiple of pretrain.patch_size"):
        load_params(write(tmp_path, d))
    d = base()
    d["finetune"]["runs"] = ["bp4d-1"]  # dataset not downloaded
    with pytest.raises(ParamsError, match="not in download.au_datasets"):
        load_params(write(tmp_path, d))
    d = base()
    d["finetune"]["runs"] = ["synthetic-4"]  # only 3 synthetic parts
    with pytest.raises(ParamsError, match="synthetic has 3 folds"):
        load_params(write(tmp_path, d))
    d = base()
    d["finetune"]["save_backbone_epochs"] = [0, 99]
    with pytest.raises(ParamsError, match="save_backbone_epochs: 99"):
        load_params(write(tmp_path, d))


@pytest.mark.parametrize("run, msg", [
    ("bp4d", "is not '<dataset>-<fold>'"),
    ("affwild-1", "unknown dataset 'affwild'"),
    ("bp4d-4", "fold 4 does not exist for bp4d"),
    ("disfa-0", "fold 0 does not exist for disfa"),
])
def test_parse_run_errors(run, msg):
    with pytest.raises(ParamsError, match=msg):
        parse_run(run)


def test_parse_run_ok():
    assert parse_run("bp4d_plus-4") == ("bp4d_plus", 4)
    assert parse_run("synthetic-2") == ("synthetic", 2)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("lambda: [1,\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_sweep_needs_runs(tmp_path):
    d = base()
    d["finetune"]["sweep_lambdas"] = [0.5, 1]
    with pytest.raises(ParamsError, match="finetune.sweep_runs is empty"):
        load_params(write(tmp_path, d))
    d["finetune"]["sweep_runs"] = ["synthetic-1"]
    assert load_params(write(tmp_path, d)).finetune.sweep_lambdas == [0.5, 1]


def test_paper_profile_keeps_the_paper_finetuning_recipe():
    f = load_params(ROOT / "configs" / "paper.yaml").finetune
    assert (f.blr, f.layer_decay, f.drop_path, f.weight_decay, f.min_lr) == (5e-4, 0.65, 0.1, 0.05, 1e-6)
    assert (f.augment.scale_min, f.augment.rand_augment, f.augment.reprob) == (
        0.08, "rand-m9-mstd0.5-inc1", 0.25)
    assert f.id_head_depth == 1 and load_params(ROOT / "configs" / "paper.yaml").probe.frames_per_subject == 100
    # the reference's identity branch and the authors' probe schedule
    assert (f.id_loss, f.id_classes, f.id_head_init) == ("bce", "dataset", "default")
    assert f.au_head_init == "default"  # the reference's AU head bias
    probe = load_params(ROOT / "configs" / "paper.yaml").probe
    assert (probe.epochs, probe.warmup_epochs, probe.train_fraction) == (20, 2, 0.7)


def test_cpu_default_uses_the_reference_identity_branch():
    # issue 8: the built-in default's IAT is the authors' (loss, classes, head init); only
    # the AU head's bias and the training recipe are scaled for ~1000 CPU steps
    f = load_params(ROOT / "params.yaml").finetune
    assert (f.id_loss, f.id_classes, f.id_head_init, f.id_head_depth) == (
        "bce", "dataset", "default", 1)


@pytest.mark.parametrize("section, key, value", [
    (None, "lambda", float("nan")),
    ("finetune", "blr", float("nan")),
    ("pretrain", "mask_ratio", float("nan")),
    ("probe", "underfit_below", float("nan")),
    ("pretrain", "blr", float("inf")),
    ("finetune", "min_lr", float("-inf")),
])
def test_non_finite_numbers_are_named(tmp_path, section, key, value):
    # NaN compares False with every bound, so a range check alone lets it through
    d = {section: {key: value}} if section else {key: value}
    p = write(tmp_path, d)  # YAML spells them .nan, .inf, -.inf
    dotted = f"{section}.{key}" if section else key
    with pytest.raises(ParamsError, match=rf"{dotted}: {value!r} is not a finite number"):
        load_params(p)


def test_non_finite_sweep_lambda_is_named(tmp_path):
    d = {"finetune": {"sweep_lambdas": [0.5, float("nan")], "sweep_runs": ["synthetic-1"]}}
    with pytest.raises(ParamsError, match="finetune.sweep_lambdas: nan must be a finite number"):
        load_params(write(tmp_path, d))


@pytest.mark.parametrize("text, msg", [
    ("lambda: 2.0\nseed: 0\nlambda: 3.0\n",
     "duplicate key lambda at the top level: line 3 repeats line 1"),
    ("lambda: 2.0\nfinetune:\n  epochs: 9\n  blr: 0.005\n  epochs: 8\n",
     "duplicate key finetune.epochs in section finetune: line 5 repeats line 3"),
    ("download:\n  synthetic:\n    subjects: 30\n    seed: 0\n    subjects: 30\n",
     "duplicate key download.synthetic.subjects in section download.synthetic: "
     "line 5 repeats line 3"),
    ("pretrain:\n  epochs: 4\nprobe:\n  epochs: 4\npretrain:\n  blr: 0.001\n",
     "duplicate key pretrain at the top level: line 5 repeats line 1"),
])
def test_duplicate_keys_are_named_with_section_and_line(tmp_path, text, msg):
    # YAML itself keeps the last value silently, even when both are equal
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ParamsError, match=f"^{re.escape(f'{p}: {msg}')}"):
        load_params(p)


def test_same_key_in_different_sections_is_not_a_duplicate(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("pretrain:\n  epochs: 4\nfinetune:\n  epochs: 9\n")
    got = load_params(p)
    assert (got.pretrain.epochs, got.finetune.epochs) == (4, 9)


@pytest.mark.parametrize("content, msg", [
    ("", "params file is empty"),
    ("# all commented out\n\n", "params file is empty"),
    ("- lambda\n- 2.0\n", "the top level must be a mapping of keys .*got a list"),
    ("lambda = 2.0\n", "the top level must be a mapping of keys .*got a str"),
    ("finetune:\n", "section finetune is empty .*indent its keys under it"),
    ("lambda: 2.0\nfinetune:\ntables:\n  show_published: true\n", "section finetune is empty"),
    ("download:\n  synthetic:\n", "section download.synthetic is empty"),
])
def test_empty_or_malformed_file_fails_naming_it(tmp_path, content, msg):
    p = tmp_path / "params.yaml"
    p.write_text(content)
    with pytest.raises(ParamsError, match=f"^{re.escape(str(p))}: {msg}"):
        load_params(p)


@pytest.mark.parametrize("content, msg", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
    ("lambda: 2.0  # caf\u00e9\n".encode("latin-1"), r"not UTF-8 text \(byte 0xe9"),
    (b"\xff\xfel\x00a\x00", "binary file"),  # UTF-16
])
def test_binary_or_non_utf8_file_fails_naming_it(tmp_path, content, msg):
    p = tmp_path / "params.yaml"
    p.write_bytes(content)
    with pytest.raises(ParamsError, match=f"^{re.escape(str(p))}: {msg}.*params.yaml"):
        load_params(p)


def test_explicit_empty_mapping_and_utf8_bom_still_load(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_bytes("\ufefflambda: 1.5\nfinetune: {}\n".encode("utf-8"))
    got = load_params(p)
    assert got.lambda_ == 1.5 and got.finetune == Params().finetune
