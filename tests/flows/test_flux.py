"""FLUX.1 through every stage on the tiny model: the file users load, the cache, continuing, the refusals."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from flows.cli import main
from lora_core.config.lora_config import LoraConfig
from lora_core.families import preset_config
from lora_core.families.loading import load_base_model
from lora_core.foundation.lora_file import read_lora
from lora_core.training.state import save_epoch
from lora_core.training.trainer import Trainer
from tests.conftest import ROOT
from tests.unit.test_training import NO_SAMPLES, SMALL, make_subject

TINY_FLUX = "builtin:tiny-flux"
INFO = {"session_id": "1", "started_at": "0"}
# sd-scripts' networks/lora_flux.py names: BFL's module paths, fused qkv and linear1.
FLUX_KEY = re.compile(
    r"lora_unet_(double_blocks_\d+_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin)"
    r"|single_blocks_\d+_(linear1|linear2|modulation_lin))\.(lora_down\.weight|lora_up\.weight|alpha)"
)


# What other libraries print on a run: transformers' torchvision notice, its and diffusers' progress bars,
# huggingface_hub's, bitsandbytes' kernel notice, torch's warnings, Prefect's docs link.
NOISE = (
    "[transformers]",
    "Loading weights",
    "Loading pipeline components",
    "Writing model shards",
    "gemm_4bit",
    "UserWarning",
    "prefect.io/docs",
)


def flux_config(preset: str = "flux", **updates) -> LoraConfig:
    values = preset_config(preset).model_dump() | SMALL | NO_SAMPLES
    return LoraConfig.model_validate(values | {"pretrained_model_name_or_path": TINY_FLUX} | updates)


def _cli(capsys: pytest.CaptureFixture, *args: str) -> SimpleNamespace:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_the_flux_preset_runs_every_stage_and_a_second_run_is_all_cache_hits(
    prefect_harness, capfd, demo_copy, tmp_path
):
    work = tmp_path / "W"
    # The acceptance command, with a token no other test of the session uses (its artifacts are counted).
    args = [str(demo_copy), "--token", "fl0x", "--workdir", str(work), "--base-model", TINY_FLUX]
    args += ["--preset", "flux", "--device", "cpu", "--config", str(ROOT / "demo" / "config.json")]
    first = _cli(capfd, *args)  # the file descriptors: library handlers and bars write to the real ones
    assert first.returncode == 0, first.stderr[-3000:]
    # A quiet terminal: our lines and Prefect's run lines, none of other libraries' notices or bars.
    said = first.stdout + first.stderr
    for noise in NOISE:
        assert noise not in said, noise
    # Plain, short select lines (those without a path in them), no internal names.
    picked = [line for line in first.stdout.splitlines() if line.startswith("select:")]
    long = [line for line in picked if "/" not in line and len(line) > 125]
    assert picked and not long, long
    assert not any(word in first.stdout for word in ("guard", "heldout_loss", "DIV", "PRES"))
    for stage in ("ingest", "checks", "crop", "buckets", "captions", "train", "samples", "select", "txt2img"):
        assert f"\n{stage}" in "\n" + first.stdout, stage
    final = work / "fl0x" / "result_current" / "fl0x.safetensors"
    lora = read_lora(final)
    assert lora.metadata["ss_base_model_version"] == "flux1"
    assert lora.metadata["modelspec.architecture"] == "flux-1-dev/lora"
    names = [f"{name}.{part}" for name in lora.modules for part in ("lora_down.weight", "lora_up.weight", "alpha")]
    assert names and all(FLUX_KEY.fullmatch(n) for n in names), [n for n in names if not FLUX_KEY.fullmatch(n)]
    assert any("_img_attn_qkv" in n for n in names) and any("_linear1" in n for n in names)
    for down, up, _ in lora.modules.values():
        assert torch.isfinite(down).all() and torch.isfinite(up).all()
    assert all(up.abs().sum() > 0 for _, up, _ in lora.modules.values())  # learned: kohya's lora_up starts at 0

    # Plain words: the recipe users follow is "the recipe", never our own nickname for it.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterName,
    )

    with get_client(sync_client=True) as client:
        artifacts = " ".join(str(a.data) + str(a.description) for a in client.read_artifacts())
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["fl0x"])))
        mine = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    assert artifacts and "the seed" not in (first.stdout + first.stderr + artifacts).lower()
    # Previews, not the images: the run's artifacts stay small in Prefect's database.
    size = sum(len(str(a.data)) + len(str(a.description or "")) for a in mine)
    sizes = sorted(((len(str(a.data)), a.key) for a in mine), reverse=True)
    assert len(mine) > 10 and size <= 300_000, f"{len(mine)} artifacts, {size} bytes: {sizes}"

    again = _cli(capfd, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("ingest", "checks", "crop", "buckets", "captions", "samples", "select"):
        assert f"{stage} (cached)" in again.stdout, stage
    assert [f"train (cached): epoch {e}" in again.stdout for e in (1, 2, 3)] == [True] * 3
    assert read_lora(final).modules.keys() == lora.modules.keys()

    # --verbose shows what was kept off the terminal (here: transformers' bar as BLIP loads).
    args[args.index(str(work))] = str(tmp_path / "W2")
    verbose = _cli(capfd, *args, "--stop-after", "captions", "--verbose")
    assert verbose.returncode == 0 and "Loading weights" in verbose.stdout + verbose.stderr, verbose.stderr[-2000:]


def _trained(tmp_path: Path, preset: str = "flux", **updates) -> Trainer:
    config = flux_config(preset, num_repeats=2, **updates)
    trainer = Trainer(config, load_base_model(TINY_FLUX), make_subject(tmp_path, config), show_progress=False)
    trainer.run_epoch(1)
    return trainer


def test_a_saved_flux_lora_and_its_peft_form_both_continue_training(builtin_models_home, tmp_path):
    first = _trained(tmp_path / "a", unet_lr=1e-2)
    kohya = save_epoch(first, "k" * 64, INFO)
    assert kohya is not None
    trained = first.network.weights()
    # The same network in the diffusers/PEFT format (diffusers' examples, ai-toolkit): one A/B pair per module.
    peft, scale = {}, first.network.alpha / first.network.rank
    for target in first.network.targets:
        down, up = trained[target.name]
        peft[f"transformer.{target.path}.lora_A.weight"] = down.contiguous()
        peft[f"transformer.{target.path}.lora_B.weight"] = (up * scale).contiguous()  # alpha = rank in PEFT
    save_file(peft, tmp_path / "peft.safetensors")

    for source in (kohya, tmp_path / "peft.safetensors"):
        config = flux_config(num_repeats=2, network_weights=str(source))
        trainer = Trainer(config, load_base_model(TINY_FLUX), first.layout, show_progress=False)
        report = trainer.network.load(read_lora(source))
        assert report.loaded == len(first.network.targets) and report.missing == [] and report.unexpected == []
        for target in first.network.targets:  # the same update as the network saved, module by module
            down, up = trainer.network.weights()[target.name]
            mine = trained[target.name][1] @ trained[target.name][0] * scale
            assert torch.allclose(up.float() @ down.float() * scale, mine.float(), atol=2e-3), target.name
        before = trainer.network.weights()[first.network.targets[0].name][1].clone()
        trainer.run_epoch(1)
        assert not torch.equal(trainer.network.weights()[first.network.targets[0].name][1], before)


@pytest.mark.parametrize("preset", ["flux", "flux-12gb"])
def test_fp8_and_nf4_bases_train_on_the_cpu_and_save_full_size_layers(builtin_models_home, tmp_path, preset):
    trainer = _trained(tmp_path, preset)
    stored = trainer.base.unet.transformer_blocks[0].attn.to_q.base_layer
    if preset == "flux":
        assert stored.weight.dtype == torch.float8_e4m3fn  # fp8 at rest, computed in bf16
    else:
        assert type(stored).__name__ == "Linear4bit" and stored.weight.dtype == torch.uint8
    path = save_epoch(trainer, "q" * 64, INFO)
    lora = read_lora(path)
    plain = load_base_model(TINY_FLUX).unet  # the unquantised layer shapes
    width = plain.transformer_blocks[0].attn.to_q.in_features
    rank = trainer.config.network_dim
    qkv_down, qkv_up, alpha = lora.modules["lora_unet_double_blocks_0_img_attn_qkv"]
    assert qkv_down.shape == (3 * rank, width) and qkv_up.shape == (3 * width, 3 * rank)
    assert alpha == 3 * trainer.config.network_alpha  # the same alpha / rank as each part's
    linear1 = plain.single_transformer_blocks[0]
    down, up, _ = lora.modules["lora_unet_single_blocks_0_linear1"]
    assert up.shape[0] == 3 * width + linear1.proj_mlp.out_features and down.shape == (4 * rank, width)
    assert all(torch.isfinite(t).all() for m in lora.modules.values() for t in m[:2])


def test_a_lora_of_another_family_is_refused_naming_the_file_and_both(prefect_harness, capsys, tmp_path):
    flux_lora = save_epoch(_trained(tmp_path / "f"), "f" * 64, INFO)
    photos = ROOT / "demo" / "photos"
    refused = _cli(
        capsys, str(photos), "--token", "t0k3n", "--workdir", str(tmp_path / "W"), "--base-model", "builtin:tiny-sd15",
        "--network-weights", str(flux_lora),
    )  # fmt: skip
    assert refused.returncode == 2
    assert str(flux_lora) in refused.stderr and "FLUX.1" in refused.stderr and "SD1" in refused.stderr
    assert "ingest" not in refused.stdout  # refused before any stage ran

    sd_config = preset_config().model_dump() | SMALL | NO_SAMPLES | {"num_repeats": 1}
    sd_config |= {"pretrained_model_name_or_path": "builtin:tiny-sd15"}
    sd = LoraConfig.model_validate(sd_config)
    sd_trainer = Trainer(
        sd, load_base_model("builtin:tiny-sd15"), make_subject(tmp_path / "s", sd), show_progress=False
    )
    sd_trainer.run_epoch(1)
    sd_lora = save_epoch(sd_trainer, "s" * 64, INFO)
    refused = _cli(
        capsys, str(photos), "--token", "t0k3n", "--workdir", str(tmp_path / "W"), "--base-model", TINY_FLUX,
        "--preset", "flux", "--network-weights", str(sd_lora),
    )  # fmt: skip
    assert refused.returncode == 2
    assert str(sd_lora) in refused.stderr and "FLUX.1" in refused.stderr and "SD1" in refused.stderr


def test_single_files_and_their_parts_load_from_the_config_fields(builtin_models_home, tmp_path):
    """BFL's transformer file with `--base-model-config`, and `clip_l`/`t5xxl`/`ae` from the config: each
    component is the file's (the part files hold other weights than the folder, so a test can tell)."""
    from lora_core.foundation.tiny_models import materialize
    from tests.flux_checkpoint import write_ae, write_clip_l, write_t5, write_transformer

    folder = materialize(TINY_FLUX)
    source = tmp_path / "flux1-dev.safetensors"
    write_transformer(folder, source)

    def other(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}

    parts = {name: tmp_path / f"{name}.safetensors" for name in ("clip_l", "t5xxl", "ae")}
    write_clip_l(folder, parts["clip_l"], tweak=other)
    write_t5(folder, parts["t5xxl"], tweak=other)
    write_ae(folder, parts["ae"], tweak=other)
    config = flux_config(pretrained_model_name_or_path=str(source), **{k: str(v) for k, v in parts.items()})
    model = load_base_model(str(source), "flux", str(folder), parts=config.component_files)
    plain = load_base_model(TINY_FLUX)
    assert model.family.name == "flux" and model.spec == str(source)
    pairs = [(model.unet, plain.unet, True), (model.vae, plain.vae, False)]
    pairs += [(a, b, False) for a, b in zip(model.text_encoders, plain.text_encoders, strict=True)]
    for mine, folders, equal in pairs:
        same = all(
            torch.equal(x, y) for x, y in zip(mine.state_dict().values(), folders.state_dict().values(), strict=True)
        )
        assert same == equal, type(mine).__name__
    # ... and a config without the parts takes every component from the folder.
    bare = load_base_model(str(source), "flux", str(folder), parts=flux_config().component_files)
    assert torch.equal(next(iter(bare.vae.state_dict().values())), next(iter(plain.vae.state_dict().values())))


def test_a_stored_base_starts_the_lora_from_the_same_fp32_values(builtin_models_home, tmp_path):
    """peft makes a LoRA in its layer's dtype: over fp8 (or bf16) weights its start would be rounded."""
    config = flux_config(num_repeats=2)
    layout = make_subject(tmp_path, config)
    starts = []
    for updates in ({"fp8_base": True}, {"fp8_base": False, "mixed_precision": "no"}):
        changed = config.model_copy(update=updates)
        trainer = Trainer(changed, load_base_model(TINY_FLUX), layout, device="cpu", show_progress=False)
        starts.append({name: down.clone() for name, (down, _) in trainer.network.weights().items()})
    fp8, full = starts
    assert fp8.keys() == full.keys() and all(torch.equal(fp8[k], full[k]) for k in fp8)
    down = next(iter(fp8.values()))
    assert down.dtype == torch.float32 and down.unique().numel() > 0.9 * down.numel()  # not 8-bit values
