"""Tests for equiav.config: defaults against the spec, presets, overrides, aliases, round trips."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from equiav.config import (
    ALIASES,
    Config,
    ConfigError,
    QuirksConfig,
    apply_overrides,
    config_to_dict,
    count_labels,
    dataset_defaults,
    default_config,
    load_config,
    parse_args,
    resolve,
    save_config,
    validate,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = [
    "pretrain_audioset",
    "pretrain_vggsound",
    "finetune_as20k",
    "finetune_as2m",
    "finetune_vggsound",
    "demo",
]


def preset(name: str) -> str:
    return str(CONFIGS / f"{name}.yaml")


def get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def diff(a: Config, b: Config) -> dict[str, tuple]:
    """Dotted keys whose values differ between two configs."""
    da, db = config_to_dict(a), config_to_dict(b)
    return {f"{s}.{k}": (da[s][k], db[s][k]) for s in da for k in da[s] if da[s][k] != db[s][k]}


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# The spec's numbers ("Data", "Audio features", "Visual features", "Pretraining augmentations",
# "Model", "Optimisation (paper defaults)"), written out independently of config.py.
SPEC_DEFAULTS = {
    "data.sample_rate": 16000,
    "data.clip_seconds": 10.0,
    "data.target_length": 1024,
    "data.num_mel_bins": 128,
    "data.frames_per_clip": 10,
    "data.eval_frame": 5,
    "data.image_size": 224,
    "data.image_mean": (0.485, 0.456, 0.406),
    "data.image_std": (0.229, 0.224, 0.225),
    "augment.specaug_p": 0.8,
    "augment.time_mask": 192,
    "augment.freq_mask": 48,
    "augment.audio_rrc_scale": (0.08, 1.0),
    "augment.audio_rrc_ratio": (1 / 10, 1.5 / 8),
    "augment.visual_rrc_scale": (0.08, 1.0),
    "augment.visual_rrc_ratio": (3 / 4, 4 / 3),
    "augment.jitter_p": 0.8,
    "augment.brightness": 0.4,
    "augment.contrast": 0.4,
    "augment.saturation": 0.4,
    "augment.hue": 0.1,
    "augment.blur_p": 0.5,
    "augment.blur_sigma": (0.1, 2.0),
    "augment.flip_p": 0.5,
    "augment.gray_p": 0.2,
    "augment.noise": True,
    "augment.mixup": 0.5,
    "augment.mixup_alpha": 10.0,
    "augment.ft_freqm": 48,
    "augment.ft_timem": 192,
    "model.embed_dim": 768,
    "model.depth": 12,
    "model.num_heads": 12,
    "model.mlp_ratio": 4.0,
    "model.patch_size": 16,
    "model.aug_size_a": 24,
    "model.aug_size_v": 18,
    "model.aug_hidden": 256,
    "model.head_hidden": 2048,
    "model.head_out": 512,
    "model.predictor_heads": 8,
    "model.predictor_head_dim": 64,
    "model.cen_mean": True,
    "model.cen_num": 16,
    "model.temperature": 0.07,
    "model.drop_path": 0.0,
    "model.ftmode": "multimodal",
    "model.ft_proj_dim": 512,
    "optim.lr": 1e-4,
    "optim.weight_decay": 1e-5,
    "optim.warmup_epochs": 2.0,
    "optim.warmup_start_lr": 2e-7,
    "optim.min_lr": 1e-6,
    "optim.max_epoch": 20,
    "optim.head_lr": 50.0,
    "optim.grad_clip": 0.01,
    "train.batch_size": 16,
    "eval.retrieval_frame": 5,
    "eval.retrieval_ks": [1, 5, 10],
    "quirks.time_shift_applied": True,
    "quirks.ft_specaug": True,
    "quirks.inter_gather_with_grad": True,
    "quirks.retrieval_seeded": True,
    "quirks.audio_only_head": "linear",
}
FINETUNE_RECIPE = {
    "optim.warmup_epochs": 1.0,
    "optim.max_epoch": 50,
    "train.batch_size": 32,
    "model.drop_path": 0.1,
}


# --------------------------------------------------------------------------------------------
# Defaults and datasets
# --------------------------------------------------------------------------------------------


def test_field_choices_are_the_literal_the_config_declares():
    """The one list of a setting's values that the trainer's checks and the flags read."""
    from equiav.config import TrainConfig, field_choices
    from equiav.train import dist, optim, step

    assert field_choices(TrainConfig, "precision") == ("bf16", "bf16-master", "fp16", "fp32")
    assert optim.PRECISIONS == field_choices(TrainConfig, "precision")
    assert step.STEP_STREAMS == ("default", "high-priority")
    assert dist._BACKENDS == ("auto", "nccl", "gloo")
    with pytest.raises(TypeError, match="TrainConfig.batch_size is not a Literal"):
        field_choices(TrainConfig, "batch_size")
    with pytest.raises(KeyError):
        field_choices(TrainConfig, "no_such_field")


def test_defaults_equal_spec_numbers():
    cfg = Config()
    for key, expected in SPEC_DEFAULTS.items():
        assert get(cfg, key) == expected, key
    validate(cfg)


def test_finetune_defaults_differ_from_pretrain_only_by_the_finetune_recipe():
    changed = diff(Config(), default_config("finetune"))
    assert {k: v[1] for k, v in changed.items()} == FINETUNE_RECIPE
    with pytest.raises(ConfigError, match="'evaluate'"):
        default_config("evaluate")


@pytest.mark.parametrize(
    "name, n_classes, metric, mean, std",
    [
        ("AudioSet_2M", 527, "mAP", -4.346, 4.332),
        ("AudioSet_20K", 527, "mAP", -4.346, 4.332),
        ("VGGSound", 309, "accuracy", -4.956, 4.486),
    ],
)
def test_dataset_selects_labels_metric_and_stats(name, n_classes, metric, mean, std):
    assert dataset_defaults(name) == {
        "n_classes": n_classes,
        "metric": metric,
        "audio_mean": mean,
        "audio_std": std,
    }
    cfg = load_config(["--dataset", name])
    assert cfg.data.dataset == name
    assert cfg.data.resolved_n_classes() == n_classes
    assert cfg.data.resolved_metric() == metric
    assert cfg.data.resolved_mean() == mean
    assert cfg.data.resolved_std() == std
    # Explicit values win over the dataset's.
    cfg = load_config(
        [
            "--dataset",
            name,
            "--set",
            "data.n_classes=10",
            "--set",
            "data.audio_mean=-1.5",
            "--set",
            "data.metric=accuracy",
        ]
    )
    assert (cfg.data.resolved_n_classes(), cfg.data.resolved_mean()) == (10, -1.5)
    assert cfg.data.resolved_metric() == "accuracy"


def test_synthetic_takes_labels_from_csv_and_needs_its_own_stats(tmp_path):
    csv_path = write(
        tmp_path / "labels.csv",
        'index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n2,/m/c,"C, with comma"\n\n',
    )
    assert count_labels(csv_path) == 3
    with pytest.raises(ConfigError, match="audio_mean and data.audio_std must be set"):
        load_config(["--dataset", "synthetic"])
    cfg = load_config(
        [
            "--dataset",
            "synthetic",
            "--set",
            f"data.label_csv={csv_path}",
            "--set",
            "data.audio_mean=-3.0",
            "--set",
            "data.audio_std=2.5",
        ]
    )
    assert cfg.data.n_classes is None
    assert cfg.data.resolved_n_classes() == 3
    assert (cfg.data.resolved_mean(), cfg.data.resolved_std()) == (-3.0, 2.5)
    assert cfg.data.resolved_metric() == "mAP"
    missing = tmp_path / "nope.csv"
    cfg = apply_overrides(cfg, {"data.label_csv": str(missing)})
    with pytest.raises(ConfigError, match="nope.csv"):
        cfg.data.resolved_n_classes()
    with pytest.raises(ConfigError, match="no rows below its header"):
        count_labels(write(tmp_path / "empty.csv", "index,mid,display_name\n"))
    with pytest.raises(ConfigError, match="'bogus'"):
        dataset_defaults("bogus")


def test_resolve_fills_dataset_values(tmp_path):
    cfg = load_config(["--config", preset("finetune_vggsound")])
    out = resolve(cfg)
    assert (out.data.n_classes, out.data.metric) == (309, "accuracy")
    assert (out.data.audio_mean, out.data.audio_std) == (-4.956, 4.486)
    assert cfg.data.n_classes is None  # the input is not modified
    assert set(diff(cfg, out)) == {
        "data.n_classes",
        "data.metric",
        "data.audio_mean",
        "data.audio_std",
    }


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

PRETRAIN_RECIPE = {
    "optim.max_epoch": 20,
    "optim.warmup_epochs": 2.0,
    "optim.lr": 1e-4,
    "optim.weight_decay": 1e-5,
    "optim.warmup_start_lr": 2e-7,
    "optim.min_lr": 1e-6,
    "optim.grad_clip": 0.01,
    "train.batch_size": 16,
    "model.cen_mean": True,
    "model.cen_num": 16,
    "model.drop_path": 0.0,
    "augment.noise": True,
    "model.audio_pretrained_encoder": "pretrained_weights/mae_pretrain_vit_base.pth",
    "model.visual_pretrained_encoder": "pretrained_weights/mae_pretrain_vit_base.pth",
}
FINETUNE_PRESET = {
    **FINETUNE_RECIPE,
    "optim.lr": 1e-4,
    "optim.weight_decay": 1e-5,
    "optim.head_lr": 50.0,
    "optim.warmup_start_lr": 2e-7,
    "optim.min_lr": 1e-6,
    "augment.mixup": 0.5,
    "augment.mixup_alpha": 10.0,
    "augment.ft_freqm": 48,
    "augment.ft_timem": 192,
    "augment.noise": True,
    "model.ftmode": "multimodal",
}
PRESET_EXPECTED = {
    "pretrain_audioset": (
        {
            **PRETRAIN_RECIPE,
            "data.dataset": "AudioSet_2M",
            "data.train_json": "data/AudioSet_2M/train.json",
            "data.retrieval_json": "data/AudioSet_2M/audioset_for_retrieval.json",
        },
        (527, "mAP", -4.346, 4.332),
    ),
    "pretrain_vggsound": (
        {
            **PRETRAIN_RECIPE,
            "data.dataset": "VGGSound",
            "data.train_json": "data/VGGSound/train.json",
            "data.retrieval_json": "data/VGGSound/VGGSound_for_retrieval.json",
        },
        (309, "accuracy", -4.956, 4.486),
    ),
    "finetune_as20k": (
        {
            **FINETUNE_PRESET,
            "data.dataset": "AudioSet_20K",
            "train.trainfunc_ft": "BCE",
            "train.bal": False,
            "data.val_json": "data/AudioSet_20K/test.json",
        },
        (527, "mAP", -4.346, 4.332),
    ),
    "finetune_as2m": (
        {
            **FINETUNE_PRESET,
            "data.dataset": "AudioSet_2M",
            "train.trainfunc_ft": "BCE",
            "train.bal": False,
            "data.weights_csv": "data/AudioSet_2M/weights.csv",
        },
        (527, "mAP", -4.346, 4.332),
    ),
    "finetune_vggsound": (
        {
            **FINETUNE_PRESET,
            "data.dataset": "VGGSound",
            "train.trainfunc_ft": "CE",
            "train.bal": True,
            "data.weights_csv": "data/VGGSound/weights.csv",
        },
        (309, "accuracy", -4.956, 4.486),
    ),
    "demo": (
        {
            "data.dataset": "synthetic",
            "model.embed_dim": 64,
            "model.depth": 2,
            "model.num_heads": 4,
            "model.patch_size": 16,
            "train.batch_size": 16,
            "train.max_steps": None,
            "train.precision": "fp32",
            "data.label_csv": "runs/demo/data/class_labels_indices.csv",
        },
        (None, "mAP", -1.5713, 2.2615),
    ),
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_values(name, tmp_path):
    expected, (n_classes, metric, mean, std) = PRESET_EXPECTED[name]
    cfg = load_config(["--config", preset(name)])
    for key, value in expected.items():
        assert get(cfg, key) == value, (name, key)
    if n_classes is None:  # synthetic: the label CSV decides
        label_csv = write(tmp_path / "l.csv", "index,mid,display_name\n0,a,A\n1,b,B\n")
        cfg = apply_overrides(cfg, {"data.label_csv": label_csv})
        n_classes = 2
    assert cfg.data.resolved_n_classes() == n_classes
    assert cfg.data.resolved_metric() == metric
    assert (cfg.data.resolved_mean(), cfg.data.resolved_std()) == (mean, std)
    # Data paths are relative (to the working directory), never absolute.
    for key in (
        "train_json",
        "val_json",
        "test_json",
        "retrieval_json",
        "label_csv",
        "weights_csv",
    ):
        path = getattr(load_config(["--config", preset(name)]).data, key)
        assert path is None or not Path(path).is_absolute(), (name, key)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_self_contained(name):
    """A recipe preset gives the same config whichever recipe's defaults it lands on; the demo
    serves both subcommands and leaves drop path to the mode's defaults."""
    on_pretrain = load_config(["--config", preset(name)], defaults=default_config("pretrain"))
    on_finetune = load_config(["--config", preset(name)], defaults=default_config("finetune"))
    expected = {"model.drop_path": (0.0, 0.1)} if name == "demo" else {}
    assert diff(on_pretrain, on_finetune) == expected


# --------------------------------------------------------------------------------------------
# --set and type checking
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "assignment, key, expected",
    [
        ("model.depth=2", "model.depth", 2),  # int
        ("train.seed=-3", "train.seed", -3),
        ("optim.lr=1e-4", "optim.lr", 1e-4),  # float, YAML-1.1-unfriendly spelling
        ("optim.head_lr=3", "optim.head_lr", 3.0),  # int text for a float field
        ("model.cen_mean=false", "model.cen_mean", False),  # bool
        ("model.cen_mean=True", "model.cen_mean", True),
        ("train.compile=1", "train.compile", True),
        ("train.tf32=no", "train.tf32", False),
        ("train.save_path=runs/a=b", "train.save_path", "runs/a=b"),  # str, '=' in value
        ("model.pretrained_model=ckpt/x.pt", "model.pretrained_model", "ckpt/x.pt"),
        ("model.pretrained_model=None", "model.pretrained_model", None),  # Optional[str]
        ("train.max_steps=7", "train.max_steps", 7),  # Optional[int]
        ("train.max_steps=null", "train.max_steps", None),
        ("data.audio_mean=-5.25", "data.audio_mean", -5.25),  # Optional[float]
        ("data.metric=accuracy", "data.metric", "accuracy"),  # Optional[Literal]
        ("train.precision=fp16", "train.precision", "fp16"),  # Literal
        ("model.ftmode=audio_only", "model.ftmode", "audio_only"),
        ("augment.blur_sigma=0.2,1.5", "augment.blur_sigma", (0.2, 1.5)),  # tuple
        ("augment.blur_sigma=(0.3, 1.0)", "augment.blur_sigma", (0.3, 1.0)),
        ("optim.betas=[0.8,0.99]", "optim.betas", (0.8, 0.99)),
        ("eval.retrieval_ks=1,3", "eval.retrieval_ks", [1, 3]),  # list
        ("eval.retrieval_ks=[2]", "eval.retrieval_ks", [2]),
    ],
)
def test_set_parses_every_type(assignment, key, expected):
    cfg = load_config(["--set", assignment])
    value = get(cfg, key)
    assert value == expected and type(value) is type(expected), (value, expected)
    assert load_config([f"--set={assignment}"]) == cfg  # the --flag=value form
    # Nothing else changed.
    assert set(diff(Config(), cfg)) <= {key}


@pytest.mark.parametrize(
    "assignment, expected_type",
    [
        ("model.depth=2.5", "int"),
        ("model.depth=true", "int"),
        ("optim.lr=abc", "float"),
        ("model.cen_mean=maybe", "bool (true/false)"),
        ("train.precision=fp8", "one of 'bf16', 'bf16-master', 'fp16', 'fp32'"),
        ("data.dataset=AudioSet", "one of 'synthetic', 'AudioSet_2M', 'AudioSet_20K'"),
        ("augment.blur_sigma=1,2,3", "tuple of 2 float"),
        ("eval.retrieval_ks=a,b", "list of int"),
        ("train.max_steps=ten", "int or None"),
        ("quirks.audio_only_head=original", "one of 'linear' (the original's audio_only head"),
    ],
)
def test_bad_value_names_key_value_and_type(assignment, expected_type):
    key, _, value = assignment.partition("=")
    with pytest.raises(ConfigError) as err:
        load_config(["--set", assignment])
    message = str(err.value)
    assert f"{key} = {value!r}" in message
    assert f"is not a valid {expected_type}" in message


def test_bad_yaml_values_name_the_file(tmp_path):
    for body, expected in [
        ("model:\n  depth: two\n", "model.depth = 'two' is not a valid int"),
        ("model:\n  cen_mean: 2\n", "model.cen_mean = 2 is not a valid bool"),
        ("train:\n  save_path: 5\n", "train.save_path = 5 is not a valid str"),
        ("optim:\n  betas: 0.9\n", "optim.betas = 0.9 is not a valid tuple of 2 float"),
        ("optim: 3\n", "section 'optim' must be a mapping"),
        ("- a\n- b\n", "expected a mapping of sections"),
        ("optim:\n  lr: 1\n  lr: 2\n", "duplicate key 'lr'"),
        ("optim: [\n", "not valid YAML"),
    ]:
        path = write(tmp_path / "bad.yaml", body)
        with pytest.raises(ConfigError) as err:
            load_config(["--config", path])
        assert str(err.value).startswith(path), str(err.value)
        assert expected in str(err.value)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_config(["--config", str(tmp_path / "missing.yaml")])
    # An empty file and an empty section change nothing.
    assert load_config(["--config", write(tmp_path / "e.yaml", "")]) == Config()
    assert load_config(["--config", write(tmp_path / "s.yaml", "optim:\n")]) == Config()


def test_yaml_reads_exponent_floats_without_dot(tmp_path):
    # PyYAML reads "1e-4" as a string; the field type makes it a float.
    cfg = load_config(["--config", write(tmp_path / "c.yaml", "optim:\n  lr: 1e-4\n")])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)


def test_unknown_keys_list_the_valid_keys(tmp_path):
    optim_keys = [f.name for f in dataclasses.fields(Config().optim)]
    with pytest.raises(ConfigError) as err:
        load_config(["--set", "optim.lrr=1"])
    assert "unknown key 'optim.lrr'" in str(err.value)
    assert "valid keys in [optim]: " + ", ".join(optim_keys) in str(err.value)

    path = write(tmp_path / "u.yaml", "model:\n  depht: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(["--config", path])
    model_keys = [f.name for f in dataclasses.fields(Config().model)]
    assert str(err.value).startswith(path)
    assert "valid keys in [model]: " + ", ".join(model_keys) in str(err.value)

    with pytest.raises(
        ConfigError, match="section one of data, augment, model, optim, train, eval, quirks"
    ):
        load_config(["--set", "optm.lr=1"])
    with pytest.raises(ConfigError, match=r"did you mean optim\.lr\?"):
        load_config(["--set", "lr=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(["--set", "optim.lr"])
    with pytest.raises(ConfigError, match="--lr needs a value"):
        load_config(["--lr"])


def test_apply_overrides_accepts_nested_and_dotted_and_copies():
    base = Config()
    out = apply_overrides(base, {"optim": {"lr": 2e-4}, "model.depth": "3"})
    assert (out.optim.lr, out.model.depth) == (2e-4, 3)
    assert base == Config()  # not modified


def test_validate_collects_every_cross_field_problem():
    with pytest.raises(ConfigError) as err:
        load_config(
            [
                "--set",
                "model.num_heads=5",
                "--set",
                "data.eval_frame=10",
                "--aug_size_a",
                "21",
                "--set",
                "augment.jitter_p=1.5",
            ]
        )
    message = str(err.value)
    assert "model.embed_dim must be a multiple of model.num_heads" in message
    assert "data.eval_frame must be in [0, frames_per_clip)" in message
    assert "model.aug_size_a must be 24" in message
    assert "augment.jitter_p must be in [0, 1]" in message
    with pytest.raises(ConfigError, match=r"data.target_length \(1000\) must be a multiple"):
        load_config(["--set", "data.target_length=1000"])


# --------------------------------------------------------------------------------------------
# Paper flag aliases
# --------------------------------------------------------------------------------------------

# flag, value on the command line, dotted key, expected value
ALIAS_CASES = [
    ("max_epoch", "7", "optim.max_epoch", 7),
    ("warmup_epoch", "3", "optim.warmup_epochs", 3.0),
    ("batch_size", "8", "train.batch_size", 8),
    ("lr", "5e-5", "optim.lr", 5e-5),
    ("cen_mean", "False", "model.cen_mean", False),
    ("cen_num", "8", "model.cen_num", 8),
    ("aug_size_a", "24", "model.aug_size_a", 24),
    ("aug_size_v", "18", "model.aug_size_v", 18),
    ("ftmode", "video_only", "model.ftmode", "video_only"),
    ("trainfunc_ft", "celoss", "train.trainfunc_ft", "CE"),
    ("pretrained_model", "w/equiav.pth", "model.pretrained_model", "w/equiav.pth"),
    ("audio_pretrained_encoder", "w/mae_a.pth", "model.audio_pretrained_encoder", "w/mae_a.pth"),
    ("visual_pretrained_encoder", "w/mae_v.pth", "model.visual_pretrained_encoder", "w/mae_v.pth"),
    ("save_path", "exp/run1", "train.save_path", "exp/run1"),
    ("bal", "True", "train.bal", True),
    ("mixup", "0.25", "augment.mixup", 0.25),
    ("head_lr", "10", "optim.head_lr", 10.0),
    ("dataset", "VGGSound", "data.dataset", "VGGSound"),
]


def test_alias_cases_cover_every_alias():
    assert sorted(flag for flag, *_ in ALIAS_CASES) == sorted(ALIASES)


@pytest.mark.parametrize("flag, value, key, expected", ALIAS_CASES)
def test_alias_sets_its_key(flag, value, key, expected):
    assert ALIASES[flag] == key
    base = Config()
    if get(base, key) == expected:  # aug_size_a/v: the default is the only valid value
        base = apply_overrides(base, {key: expected - 3})
    for argv in ([f"--{flag}", value], [f"--{flag}={value}"]):
        cfg = load_config(argv, defaults=base)
        assert get(cfg, key) == expected and type(get(cfg, key)) is type(expected), argv
        assert set(diff(base, cfg)) == {key}, argv


@pytest.mark.parametrize(
    "argv, key, expected",
    [
        (["--cen_mean", "True"], "model.cen_mean", True),
        (["--cen_mean", "false"], "model.cen_mean", False),
        (["--trainfunc_ft", "bceloss", "--trainfunc_ft", "celoss"], "train.trainfunc_ft", "CE"),
        (["--trainfunc_ft", "celoss", "--trainfunc_ft", "BCEloss"], "train.trainfunc_ft", "BCE"),
        (["--bal", "bal"], "train.bal", True),
        (["--bal", "True", "--bal", "None"], "train.bal", False),
    ],
)
def test_alias_value_spellings(argv, key, expected):
    assert get(load_config(argv), key) == expected


def test_alias_bad_value_names_the_flag_and_key():
    with pytest.raises(
        ConfigError,
        match=r"--cen_num x \(alias of model.cen_num\): "
        r"model.cen_num = 'x' is not a valid int",
    ):
        load_config(["--cen_num", "x"])


def test_ignored_original_flags_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="equiav.config"):
        cfg, rest = parse_args(["--gpu", "0,1,2,3", "--model=pt_EquiAV", "--no_wandb", "x"])
    assert cfg == Config() and rest == ["x"]
    text = caplog.text
    assert "ignoring --gpu 0,1,2,3: torchrun decides" in text
    assert "ignoring --model pt_EquiAV" in text
    assert "ignoring --no_wandb" in text


def test_original_readme_commands_parse():
    """The original README's command lines (paths filled in) run unchanged."""
    pretrain = (
        "--gpu 0,1,2,3,4,5,6,7 --model pt_EquiAV --dataset AudioSet_2M "
        "--audio_pretrained_encoder w/mae.pth --visual_pretrained_encoder w/mae.pth "
        "--max_epoch 20 --warmup_epoch 2 --aug_size_a 24 --aug_size_v 18 --batch_size 16 "
        "--lr 1e-4 --cen_mean True --cen_num 16 --save_path exp/pt --no_wandb"
    ).split()
    cfg = load_config(pretrain)
    assert diff(Config(), cfg) == {
        "model.audio_pretrained_encoder": (None, "w/mae.pth"),
        "model.visual_pretrained_encoder": (None, "w/mae.pth"),
        "train.save_path": ("runs/default", "exp/pt"),
    }
    finetune = (
        "--gpu 0,1,2,3,4,5,6,7 --model ft_EquiAV --dataset AudioSet_20K "
        "--pretrained_model w/equiav.pth --max_epoch 50 --warmup_epoch 1 --batch_size 32 "
        "--trainfunc_ft bceloss --lr 1e-4 --ftmode audio_only --save_path exp/ft --no_wandb"
    ).split()
    cfg = load_config(finetune)
    assert (cfg.optim.max_epoch, cfg.optim.warmup_epochs, cfg.train.batch_size) == (50, 1.0, 32)
    assert (cfg.data.dataset, cfg.model.ftmode, cfg.train.trainfunc_ft) == (
        "AudioSet_20K",
        "audio_only",
        "BCE",
    )
    assert cfg.model.pretrained_model == "w/equiav.pth"


# --------------------------------------------------------------------------------------------
# Order, leftovers, paper_exact, round trip
# --------------------------------------------------------------------------------------------


def test_configs_apply_in_order_then_overrides_in_order(tmp_path):
    a = write(tmp_path / "a.yaml", "optim:\n  lr: 1.0e-3\n  max_epoch: 3\n")
    b = write(tmp_path / "b.yaml", "optim:\n  lr: 2.0e-3\n")
    assert load_config(["--config", a, "--config", b]).optim.lr == 2e-3
    assert load_config(["--config", b, "--config", a]).optim.lr == 1e-3
    assert load_config(["--config", b, "--config", a]).optim.max_epoch == 3
    # --set and aliases come after every --config, wherever they stand, in their own order.
    cfg = load_config(["--set", "optim.lr=5e-3", "--config", a, "--config", b])
    assert cfg.optim.lr == 5e-3
    assert load_config(["--lr", "1e-5", "--set", "optim.lr=2e-5"]).optim.lr == 2e-5
    assert load_config(["--set", "optim.lr=2e-5", "--lr", "1e-5"]).optim.lr == 1e-5


def test_parse_args_returns_leftovers_in_order(tmp_path):
    a = write(tmp_path / "a.yaml", "train:\n  batch_size: 4\n")
    cfg, rest = parse_args(
        ["pretrain", "--config", a, "--dry-run", "--lr=3e-4", "extra", "--", "--lr", "9"]
    )
    assert rest == ["pretrain", "--dry-run", "extra", "--lr", "9"]
    assert (cfg.train.batch_size, cfg.optim.lr) == (4, 3e-4)
    with pytest.raises(ConfigError, match="unrecognised arguments: pretrain"):
        load_config(["pretrain"])


@pytest.mark.parametrize("name", PRESETS)
def test_paper_exact_flips_every_quirk_and_nothing_else(name):
    base = load_config(["--config", preset(name)])
    exact = load_config(["--config", preset(name), "--config", preset("paper_exact")])
    bool_quirks = {f.name for f in dataclasses.fields(QuirksConfig) if f.type in ("bool", bool)}
    assert bool_quirks == {
        "time_shift_applied",
        "ft_specaug",
        "inter_gather_with_grad",
        "retrieval_seeded",
    }
    assert all(getattr(base.quirks, q) for q in bool_quirks)
    assert not any(getattr(exact.quirks, q) for q in bool_quirks)
    assert exact.quirks.audio_only_head == "linear"  # the original's cannot run
    assert set(diff(base, exact)) == {f"quirks.{q}" for q in bool_quirks}


@pytest.mark.parametrize("name", [*PRESETS, "paper_exact"])
def test_save_load_round_trip_presets(name, tmp_path):
    cfg = load_config(["--config", preset(name)])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(["--config", str(path)]) == cfg
    # The saved file holds every key, so the defaults underneath do not matter.
    assert load_config(["--config", str(path)], defaults=default_config("finetune")) == cfg


def test_save_load_round_trip_unusual_values(tmp_path):
    cfg = load_config(
        [
            "--config",
            preset("finetune_vggsound"),
            "--set",
            "optim.lr=0.1",
            "--set",
            "optim.head_lr=0.3333333333333333",
            "--set",
            "train.seed=-1",
            "--set",
            "optim.warmup_start_lr=1.234e-9",
            "--set",
            "train.max_steps=5",
            "--set",
            "train.save_path=null-dir: yes #1",
            "--set",
            "train.resume=auto",
            "--set",
            "model.pretrained_model=true",
            "--set",
            "eval.retrieval_ks=2,4",
            "--set",
            "augment.blur_sigma=0.15,1.75",
            "--set",
            "data.n_classes=12",
        ]
    )
    assert cfg.train.save_path == "null-dir: yes #1" and cfg.model.pretrained_model == "true"
    resolved = resolve(cfg)
    path = tmp_path / "config.yaml"
    for c in (cfg, resolved):
        save_config(c, path)
        assert load_config(["--config", str(path)]) == c
    assert config_to_dict(resolved)["augment"]["blur_sigma"] == [0.15, 1.75]
