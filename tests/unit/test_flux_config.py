"""FLUX.1 settings: sd-scripts' names and checks, kohya_ss's and CivitAI's FLUX.1 files in, kohya_ss's out.

The files below are shaped on what the tools really save: kohya_ss's `save_configuration` (every GUI
parameter, the FLUX panel's too; values from its `presets/lora/flux1D - adamw8bit fp8.json`) and CivitAI's
`trainingDetails` (src/server/schema/model-version.schema.ts; Flux defaults from TrainingParams.tsx).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from lora_core.config.kohya import ConfigFile, ConfigWarning, read_config_file, to_kohya_gui
from lora_core.config.lora_config import ConfigError, LoraConfig, parse_optimizer_args

FLUX_FIELDS = {
    "timestep_sampling": "flux_shift",
    "sigmoid_scale": 1.5,
    "discrete_flow_shift": 2.5,
    "model_prediction_type": "additive",
    "guidance_scale": 3.5,
    "t5xxl_max_token_length": 256,
    "apply_t5_attn_mask": True,
    "fp8_base": False,
    "nf4_base": True,
    "clip_l": "/models/clip_l.safetensors",
    "t5xxl": "/models/t5xxl_fp16.safetensors",
    "ae": "/models/ae.safetensors",
}  # every FLUX.1 field, none at its default

# What kohya_ss saves for its FLUX.1 LoRA preset (a subset of its ~250 keys, each as it writes it).
KOHYA_SS_FLUX: dict[str, Any] = {
    "LoRA_type": "Flux1",
    "adaptive_noise_scale": 0,
    "ae": "/models/flux/ae.safetensors",
    "apply_t5_attn_mask": True,
    "blocks_to_swap": 0,
    "bucket_no_upscale": True,
    "bucket_reso_steps": 64,
    "cache_latents": True,
    "cache_latents_to_disk": True,
    "caption_extension": ".txt",
    "clip_l": "/models/flux/clip_l.safetensors",
    "clip_skip": 1,
    "cpu_offload_checkpointing": False,
    "discrete_flow_shift": 3,
    "enable_bucket": True,
    "epoch": 1,
    "flip_aug": False,
    "flux1_cache_text_encoder_outputs": True,
    "flux1_cache_text_encoder_outputs_to_disk": True,
    "flux1_checkbox": True,
    "fp8_base": True,
    "fp8_base_unet": False,
    "full_bf16": True,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": True,
    "guidance_scale": 1,
    "hunyuan_image_checkbox": False,
    "keep_tokens": 0,
    "learning_rate": 0.0003,
    "lora_network_weights": "",
    "lr_scheduler": "constant",
    "lr_scheduler_num_cycles": 1,
    "lr_warmup": 0,
    "lumina_checkbox": False,
    "anima_checkbox": False,
    "max_bucket_reso": 2048,
    "max_resolution": "512,512",
    "max_token_length": 75,
    "max_train_epochs": 0,  # kohya_ss's "no override": epoch counts
    "max_train_steps": 1000,
    "mem_eff_save": False,
    "min_bucket_reso": 256,
    "min_snr_gamma": 7,
    "mixed_precision": "bf16",
    "model_list": "custom",
    "model_prediction_type": "raw",
    "model_type": "flux",
    "network_alpha": 16,
    "network_dim": 16,
    "network_weights": "",
    "noise_offset": 0.05,
    "optimizer": "AdamW8bit",
    "optimizer_args": "",
    "output_dir": "/data/out",
    "output_name": "Flux.my-super-duper-model-name-goes-here-v1.0",
    "pretrained_model_name_or_path": "/models/flux/flux1-dev.safetensors",
    "sample_every_n_epochs": 0,
    "sample_every_n_steps": 0,
    "sample_prompts": "saruman posing under a stormy lightning sky, photorealistic --w 832 --h 1216 --s 20 --l 4",
    "sample_sampler": "euler",
    "save_every_n_epochs": 1,
    "save_model_as": "safetensors",
    "save_precision": "bf16",
    "sd3_checkbox": False,
    "sdxl": False,
    "sdxl_cache_text_encoder_outputs": True,
    "seed": 42,
    "shuffle_caption": False,
    "split_mode": False,
    "t5xxl": "/models/flux/t5xxl_fp16.safetensors",
    "t5xxl_max_token_length": 512,
    "text_encoder_lr": 0,
    "timestep_sampling": "sigmoid",
    "train_batch_size": 1,
    "train_blocks": "all",
    "train_data_dir": "/data/img",
    "unet_lr": 0.0003,
    "v2": False,
    "v_parameterization": False,
    "xformers": "sdpa",
}

# CivitAI's trainingDetails of a Flux.1-D LoRA on its Kohya engine, as its trainer fills it.
CIVITAI_FLUX_KOHYA: dict[str, Any] = {
    "baseModel": "flux_dev",
    "baseModelType": "flux",
    "type": "Character",
    "mediaType": "image",
    "samplePrompts": ["t0k3n, portrait photo", "", "t0k3n at the beach"],
    "negativePrompt": "",
    "staging": False,
    "highPriority": False,
    "params": {
        "engine": "kohya",
        "unetLR": 0.0005,
        "textEncoderLR": 0,
        "optimizerType": "AdamW8Bit",
        "optimizerArgs": "weight_decay=0.01, eps=0.00000001, betas=(0.9, 0.999)",
        "networkDim": 2,
        "networkAlpha": 16,
        "lrScheduler": "cosine_with_restarts",
        "lrSchedulerNumCycles": 3,
        "maxTrainEpochs": 5,
        "numRepeats": 20,
        "resolution": 1024,
        "loraType": "lora",
        "enableBucket": True,
        "keepTokens": 0,
        "clipSkip": 1,
        "flipAugmentation": False,
        "noiseOffset": 0.1,
        "trainBatchSize": 4,
        "minSnrGamma": 5,
        "shuffleCaption": False,
        "targetSteps": 500,
    },
}

# The params of CivitAI's AI Toolkit Flux trainer (engine "ai-toolkit", ecosystem "flux1").
CIVITAI_FLUX_AI_TOOLKIT: dict[str, Any] = {
    "engine": "ai-toolkit",
    "ecosystem": "flux1",
    "modelVariant": "dev",
    "epochs": 5,
    "steps": 2000,
    "resolution": 1024,
    "lr": 0.0001,
    "textEncoderLr": None,
    "trainTextEncoder": False,
    "lrScheduler": "cosine",
    "optimizerType": "adamw8bit",
    "networkDim": 16,
    "networkAlpha": 16,
    "noiseOffset": None,
    "minSnrGamma": None,
    "flipAugmentation": False,
    "shuffleTokens": False,
    "keepTokens": 0,
}


def read_quietly(tmp_path: Path, data: dict[str, Any], name: str = "c.json") -> ConfigFile:
    """The file read, its unknown keys not warned (the tests look at `unknown`)."""
    path = tmp_path / name
    path.write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return read_config_file(path)


def family_of(tmp_path: Path, data: dict[str, Any]) -> str | None:
    return read_quietly(tmp_path, data, "family.json").model_family


def flux_config(**changes: Any) -> LoraConfig:
    return LoraConfig(model_family="flux", resolution=1024, max_bucket_reso=1536, **changes)


def test_the_flux_fields_have_sd_scripts_names_and_recommended_defaults():
    config = LoraConfig()
    assert (config.timestep_sampling, config.discrete_flow_shift, config.sigmoid_scale) == ("shift", 3.1582, 1.0)
    assert (config.model_prediction_type, config.guidance_scale) == ("raw", 1.0)
    assert config.t5xxl_max_token_length is None and not config.apply_t5_attn_mask
    assert not config.fp8_base and not config.nf4_base
    assert (config.clip_l, config.t5xxl, config.ae) == (None, None, None)
    assert set(FLUX_FIELDS) <= set(LoraConfig.model_fields)


def test_fp8_and_nf4_base_together_are_refused_naming_both(tmp_path):
    with pytest.raises(ValueError, match=r"fp8_base and nf4_base"):
        flux_config(fp8_base=True, nf4_base=True)
    path = tmp_path / "both.json"
    path.write_text(json.dumps({"model_family": "flux", "fp8_base": True, "nf4_base": True}))
    with pytest.raises(ConfigError, match=r"both\.json: .*fp8_base and nf4_base"):
        read_config_file(path).over(LoraConfig())


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("timestep_sampling", "logit_normal", r"'timestep_sampling'.*'sigma'.*'flux_shift'.*'logit_normal'"),
        ("model_prediction_type", "v", r"'model_prediction_type'.*'raw'.*'sigma_scaled'"),
        ("discrete_flow_shift", 0, r"'discrete_flow_shift'.*greater than 0"),
        ("t5xxl_max_token_length", 1024, r"'t5xxl_max_token_length'.*less than or equal to 512"),
        ("guidance_scale", -1, r"'guidance_scale'.*greater than or equal to 0"),
    ],
)
def test_bad_flux_values_name_the_file_and_the_field(tmp_path, field, value, pattern):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"LoRA_type": "Flux1", "flux1_checkbox": True, field: value}))
    with pytest.raises(ConfigError, match=pattern) as info:
        read_config_file(path).over(flux_config())
    assert str(path) in str(info.value)


def test_a_kohya_ss_flux_json_imports_as_flux_with_its_values(tmp_path):
    path = tmp_path / "flux1D.json"
    path.write_text(json.dumps(KOHYA_SS_FLUX))
    with pytest.warns(ConfigWarning, match="flux1_cache_text_encoder_outputs.*max_train_steps") as caught:
        read = read_config_file(path)
    ignored = str(caught[0].message)
    assert "model_type" not in ignored and "flux1_checkbox" not in ignored and "sd3_checkbox" not in ignored
    assert read.model_family == "flux" and read.origin["model_family"] == "flux1_checkbox"
    config = read.over(flux_config())
    expected = {
        "timestep_sampling": "sigmoid",
        "discrete_flow_shift": 3.0,
        "model_prediction_type": "raw",
        "guidance_scale": 1.0,
        "t5xxl_max_token_length": 512,
        "apply_t5_attn_mask": True,
        "fp8_base": True,
        "nf4_base": False,
        "clip_l": "/models/flux/clip_l.safetensors",
        "t5xxl": "/models/flux/t5xxl_fp16.safetensors",
        "ae": "/models/flux/ae.safetensors",
        "pretrained_model_name_or_path": "/models/flux/flux1-dev.safetensors",
        "max_train_epochs": 1,  # epoch, as max_train_epochs 0 is kohya_ss's "no override"
        "resolution": 512,
        "network_dim": 16,
        "unet_lr": 0.0003,
        "mixed_precision": "bf16",
    }
    assert {k: getattr(config, k) for k in expected} == expected


def test_flux_json_round_trips_every_flux_field(tmp_path):
    for config in (flux_config(**FLUX_FIELDS), flux_config()):
        gui = to_kohya_gui(config, train_data_dir="/x", output_dir="/y", output_name="t")
        assert gui["flux1_checkbox"] is True and gui["LoRA_type"] == "Flux1"  # what kohya_ss trains FLUX.1 with
        assert gui["sdxl"] is False and gui["model_family"] == "flux"
        assert {name: gui[name] for name in FLUX_FIELDS if gui[name] not in ("", None)} == {
            name: getattr(config, name) for name in FLUX_FIELDS if getattr(config, name) is not None
        }
        path = tmp_path / "export.json"
        path.write_text(json.dumps(gui))
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConfigWarning)  # our own export has no unknown keys
            back = read_config_file(path).over(LoraConfig())
        assert back == config


def test_sd_exports_and_imports_leave_the_flux_keys_alone(tmp_path):
    for family in ("sd15", "sdxl"):
        gui = to_kohya_gui(LoraConfig(model_family=family, resolution=1024))
        assert not set(FLUX_FIELDS) & set(gui) and "flux1_checkbox" not in gui and gui["LoRA_type"] == "Standard"
    # kohya_ss writes its hidden FLUX panel into every file: an SD file's FLUX keys stay ignored, as before
    sd = {**KOHYA_SS_FLUX, "LoRA_type": "Standard", "flux1_checkbox": False, "max_resolution": "512,512"}
    path = tmp_path / "sd.json"
    path.write_text(json.dumps(sd))
    with pytest.warns(ConfigWarning, match="ae, apply_t5_attn_mask.*guidance_scale.*model_type.*timestep_sampling"):
        read = read_config_file(path)
    assert read.model_family == "sd15" and not set(FLUX_FIELDS) & set(read.fields)
    assert read.over(LoraConfig()).timestep_sampling == "shift"


@pytest.mark.parametrize(
    ("keys", "pattern"),
    [
        ({"flux1_checkbox": True, "sdxl": True}, r"'sdxl' and 'flux1_checkbox' are checked together"),
        ({"sd3_checkbox": True}, r"field 'sd3_checkbox': SD3 is not a model family"),
        ({"flux1_checkbox": True, "model_type": "chroma"}, r"field 'model_type': 'chroma' is not supported"),
        ({"LoRA_type": "Flux1"}, r"field 'LoRA_type': 'Flux1' is a FLUX.1 LoRA, but flux1_checkbox"),
        ({"flux1_checkbox": True, "LoRA_type": "Flux1 OFT"}, r"field 'LoRA_type': 'Flux1 OFT' is not supported"),
    ],
)
def test_kohya_ss_model_types_we_do_not_train_are_refused(tmp_path, keys, pattern):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"network_dim": 16, **keys}))
    with pytest.raises(ConfigError, match=pattern):
        read_config_file(path)


def test_a_civitai_flux_training_json_imports_as_flux(tmp_path):
    read = read_quietly(tmp_path, CIVITAI_FLUX_KOHYA)
    assert read.model_family == "flux" and read.origin["model_family"] == "baseModel"  # not SDXL for its 1024 px
    assert set(read.unknown) == {"type", "mediaType", "negativePrompt", "staging", "highPriority", "engine"}
    config = read.over(flux_config())
    assert (config.unet_lr, config.text_encoder_lr, config.train_text_encoder) == (0.0005, 0, False)
    assert config.optimizer_args == {"weight_decay": 0.01, "eps": 1e-8, "betas": (0.9, 0.999)}
    assert (config.network_dim, config.network_alpha, config.resolution) == (2, 16, 1024)
    assert (config.max_train_epochs, config.num_repeats, config.train_batch_size) == (5, 20, 4)
    assert config.sample_prompts == "t0k3n, portrait photo\nt0k3n at the beach"


def test_civitai_flux_params_alone_are_told_by_engine_or_base_model(tmp_path):
    rapid = {**CIVITAI_FLUX_KOHYA["params"], "engine": "rapid", "optimizerArgs": "(empty)", "resolution": 512}
    read = read_quietly(tmp_path, rapid)
    assert (read.model_family, read.origin["model_family"]) == ("flux", "engine") and "engine" not in read.unknown
    assert "optimizer_args" not in read.fields  # CivitAI's "(empty)": the preset's
    flat = {**CIVITAI_FLUX_KOHYA["params"], "baseModel": "flux_dev"}
    assert family_of(tmp_path, flat) == family_of(tmp_path, CIVITAI_FLUX_AI_TOOLKIT) == "flux"


def test_civitai_ai_toolkit_flux_params_map_what_maps(tmp_path):
    read = read_quietly(tmp_path, CIVITAI_FLUX_AI_TOOLKIT)
    assert read.origin["model_family"] == "ecosystem"
    assert set(read.unknown) == {"engine", "modelVariant", "epochs", "steps"}  # steps-based: not our epochs
    config = read.over(flux_config())
    assert (config.unet_lr, config.train_text_encoder, config.optimizer) == (0.0001, False, "AdamW8bit")
    assert (config.lr_scheduler, config.network_dim, config.shuffle_caption) == ("cosine", 16, False)
    assert config.noise_offset == 0 and config.min_snr_gamma == 5  # nulls: the preset's values


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        ({"baseModel": "sdxl", "resolution": 1024}, "sdxl"),
        ({"baseModel": "realistic"}, "sd15"),
        ({"baseModel": "civitai:123@456", "baseModelType": "flux"}, "flux"),
        ({"ecosystem": "sd1", "resolution": 1024}, "sd15"),  # the base model, not the resolution, says the family
        ({"resolution": 1024}, "sdxl"),  # no base model: CivitAI's 1024 px trainings are its SDXL ones
        ({"engine": "kohya", "resolution": 512}, None),
    ],
)
def test_civitai_base_models_name_the_family(tmp_path, keys, family):
    assert family_of(tmp_path, {"networkDim": 16, **keys}) == family


def test_civitai_base_models_we_do_not_train_are_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"baseModel": "qwen_image", "params": {"networkDim": 16}}))
    with pytest.raises(ConfigError, match=r"c\.json: field 'baseModel': 'qwen_image' is not a base model.*flux_dev"):
        read_config_file(path)


def test_optimizer_args_read_civitai_commas_and_parentheses():
    assert parse_optimizer_args("weight_decay=0.01, eps=0.00000001, betas=(0.9, 0.999)") == {
        "weight_decay": 0.01,
        "eps": 1e-8,
        "betas": (0.9, 0.999),
    }
    assert parse_optimizer_args("weight_decay=0.1 betas=0.9,0.99") == {"weight_decay": 0.1, "betas": (0.9, 0.99)}
    with pytest.raises(ValueError, match="key=value"):
        parse_optimizer_args("weight_decay=0.1 betas 0.9,0.99")
