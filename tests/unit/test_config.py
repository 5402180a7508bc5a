"""The config model: seed defaults, presets, kohya_ss and CivitAI import, export."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_core.config.kohya import ConfigWarning, to_kohya_gui
from lora_core.config.lora_config import ConfigError, LoraConfig, format_optimizer_args, parse_optimizer_args
from lora_core.families import preset_config
from lora_core.setup.resolve import load_config

DATA = Path(__file__).resolve().parents[1] / "data"


def test_defaults_are_the_seed_recipe():
    config = preset_config("sd15")
    assert (config.unet_lr, config.text_encoder_lr) == (4e-4, 4e-5)
    assert (config.network_dim, config.network_alpha) == (32, 16)
    assert config.lr_scheduler == "cosine_with_restarts" and config.lr_scheduler_num_cycles == 3
    assert config.min_snr_gamma == 5 and config.train_batch_size == 2
    assert config.optimizer == "AdamW8bit" and config.optimizer_args == {"weight_decay": 0.1}
    assert config.max_train_epochs == 6 and config.sample_every_n_steps == 100
    assert config.enable_bucket and not config.flip_aug and config.num_repeats is None
    assert (config.resolution, config.mixed_precision) == (512, "fp16")


def test_sdxl_preset_differs_only_where_the_seed_says():
    sd15, sdxl = preset_config("sd15").model_dump(), preset_config("sdxl").model_dump()
    changed = {k for k in sd15 if sd15[k] != sdxl[k]}
    assert changed == {
        "model_family",
        "resolution",
        "max_bucket_reso",
        "mixed_precision",
        "save_precision",
        # the seed's 10 GB, as sd-scripts' 12 GB recipe: checkpointing, UNet only (text outputs cached)
        "gradient_checkpointing",
        "train_text_encoder",
    }
    assert (sdxl["resolution"], sdxl["mixed_precision"]) == (1024, "bf16")
    assert sdxl["gradient_checkpointing"] and not sdxl["train_text_encoder"]


def test_unknown_preset_is_an_error():
    with pytest.raises(ConfigError, match="sd15, sdxl"):
        preset_config("sd3")


def test_seed_civitai_json_imports_key_by_key():
    config = load_config(DATA / "civitai_seed_sdxl.json")
    expected = {
        "unet_lr": 0.0004,
        "text_encoder_lr": 0.00004,
        "network_dim": 32,
        "network_alpha": 16,
        "num_repeats": 12,
        "resolution": 1024,
        "lr_scheduler": "cosine",
        "lr_scheduler_num_cycles": 3,
        "min_snr_gamma": 5,
        "optimizer": "AdamW8bit",
        "optimizer_args": {"weight_decay": 0.1},
        "train_batch_size": 2,
        "max_train_epochs": 16,
        "enable_bucket": True,
        "flip_aug": False,
        "shuffle_caption": False,
        "keep_tokens": 0,
        "clip_skip": 1,
        "train_text_encoder": True,  # textEncoderLR > 0: CivitAI trains the encoders
    }
    assert {k: getattr(config, k) for k in expected} == expected
    # resolution 1024 starts from the SDXL preset (bf16, buckets to 2048)
    assert config.model_family == "sdxl" and config.max_bucket_reso == 2048 and config.mixed_precision == "bf16"


def test_seed_civitai_json_pasted_with_its_comment_reports_line_and_column(tmp_path):
    text = (
        (DATA / "civitai_seed_sdxl.json")
        .read_text()
        .replace('"targetSteps": 3072,', '"targetSteps": 3072, --> This changes dynamically')
    )
    path = tmp_path / "pasted.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"pasted\.json: invalid JSON at line 10, column 23"):
        load_config(path)


def test_kohya_gui_json_imports_strings_and_renamed_keys():
    with pytest.warns(ConfigWarning, match="adaptive_noise_scale.*xformers"):
        config = load_config(DATA / "kohya_gui_sd15.json")
    assert config.max_train_epochs == 8  # "epoch"
    assert config.clip_skip == 2 and config.keep_tokens == 1 and config.seed == 1234  # strings in the GUI
    assert config.unet_lr == 0.0004  # unet_lr wins over learning_rate
    assert config.lr_warmup == 5 and config.noise_offset == 0.05
    assert config.optimizer_args == {"weight_decay": 0.1, "betas": (0.9, 0.99)}
    assert config.pretrained_model_name_or_path == "/models/realisticVisionV51.safetensors"
    assert config.sample_prompts == "t0k3n, portrait photo --n low quality"
    assert config.network_weights == "/data/t0k3n/result_current/t0k3n-000006-resume.safetensors"


def test_kohya_gui_json_round_trips(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        first = load_config(DATA / "kohya_gui_sd15.json")
    exported = tmp_path / "export.json"
    exported.write_text(json.dumps(to_kohya_gui(first, train_data_dir="/x", output_dir="/y", output_name="t")))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # our own export has no unknown keys
        second = load_config(exported)
    assert second == first


@pytest.mark.parametrize("preset", ["sd15", "sdxl"])
def test_presets_round_trip_through_kohya_json(tmp_path, preset):
    config = preset_config(preset)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(to_kohya_gui(config)))
    assert load_config(path) == config


def test_a_held_out_split_has_sd_scripts_names_and_round_trips(tmp_path):
    """sd-scripts' validation_split and validation_seed, read from a kohya-style JSON and written back."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"LoRA_type": "Standard", "validation_split": "0.2", "validation_seed": 7}))
    config = load_config(path)
    assert (config.validation_split, config.validation_seed, config.split_seed) == (0.2, 7, 7)
    gui = to_kohya_gui(config)
    assert (gui["validation_split"], gui["validation_seed"]) == (0.2, 7)
    path.write_text(json.dumps(gui))
    assert load_config(path) == config
    unset = preset_config("sd15")
    assert (unset.validation_split, unset.validation_seed, unset.split_seed) == (0.0, None, unset.seed)
    path.write_text(json.dumps({"validation_split": 1.0}))  # nothing left to train on
    with pytest.raises(ConfigError, match="validation_split"):
        load_config(path)


def test_export_has_kohya_names():
    gui = to_kohya_gui(preset_config("sdxl"), output_name="t0k3n")
    assert gui["max_resolution"] == "1024,1024" and gui["epoch"] == 6 and gui["sdxl"] is True
    assert gui["model_family"] == "sdxl" and to_kohya_gui(preset_config("sd15"))["sdxl"] is False
    assert gui["optimizer_args"] == "weight_decay=0.1" and gui["LoRA_type"] == "Standard"
    assert gui["learning_rate"] == gui["unet_lr"] == 4e-4 and gui["output_name"] == "t0k3n"


@pytest.mark.parametrize(
    ("payload", "pattern"),
    [
        ({"networkDim": "big"}, r"field 'networkDim' \(network_dim\).*integer.*'big'"),
        ({"unetLR": -1}, r"field 'unetLR' \(unet_lr\).*greater than 0"),
        ({"optimizerType": "Prodigy"}, r"field 'optimizerType' \(optimizer\).*AdamW8bit"),
        ({"network_dim": 32, "max_resolution": "768,512"}, r"field 'max_resolution'.*not square"),
        ({"network_dim": 32, "max_token_length": "100"}, r"field 'max_token_length'.*75, 150 or 225"),
        ({"network_dim": 32, "LoRA_type": "LyCORIS/LoHa"}, r"field 'LoRA_type'.*Standard"),
        ({"network_dim": 32, "optimizer_args": "weight_decay"}, r"field 'optimizer_args'.*key=value"),
        ({"network_dim": 32, "max_resolution": "512,512", "max_bucket_reso": 256}, r"resolution 512 must lie"),
    ],
)
def test_bad_values_name_the_file_and_the_field(tmp_path, payload, pattern):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_unknown_keys_warn_by_name(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"unetLR": 0.001, "frobnicate": 1, "engine": "kohya"}))
    with pytest.warns(ConfigWarning, match="engine, frobnicate"):
        config = load_config(path)
    assert config.unet_lr == 0.001


def test_top_level_must_be_an_object(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.json")


def test_assignment_is_validated():
    config = LoraConfig()
    with pytest.raises(ValueError):
        config.network_dim = 0


_arg_values = st.one_of(
    st.integers(-1000, 1000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.tuples(st.floats(0, 1, width=32), st.floats(0, 1, width=32)),
)


@given(st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True), _arg_values, max_size=5))
def test_optimizer_args_string_round_trips(args):
    assert parse_optimizer_args(format_optimizer_args(args)) == args


@pytest.mark.parametrize(
    ("keys", "family", "resolution"),
    [
        ({"sdxl": True}, "sdxl", 1024),  # kohya_ss's SDXL checkbox: the sdxl preset under it
        ({"sdxl": "true", "max_resolution": "768,768"}, "sdxl", 768),
        ({"sdxl": False, "v2": True}, "sd15", 512),  # SD 2.x is the sd15 family's
        ({"model_family": "sdxl"}, "sdxl", 1024),  # our own export's key
        ({}, "sd15", 512),
    ],
)
def test_kohyas_model_flags_become_a_family(tmp_path, keys, family, resolution):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"LoRA_type": "Standard", **keys}))
    config = load_config(path)
    assert (config.model_family, config.resolution) == (family, resolution)


def test_an_unknown_family_in_a_file_is_named_with_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model_family": "sd3"}))
    with pytest.raises(ConfigError, match=r"c\.json: field 'model_family': unknown model_family 'sd3'"):
        load_config(path)
