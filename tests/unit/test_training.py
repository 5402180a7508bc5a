"""The training engine on tiny real models: it learns, it resumes exactly, it continues from a kohya LoRA."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from lora_core.config.lora_config import LoraConfig
from lora_core.config.settings import IngestSettings
from lora_core.dataset.buckets import BucketAssignment, BucketPlan, bucket_subject
from lora_core.dataset.captioning import caption_subject
from lora_core.dataset.ingest import ingest
from lora_core.dataset.train_data import SplitError, TrainItem, epoch_batches, split_items, training_items
from lora_core.families import preset_config
from lora_core.families.loading import load_base_model
from lora_core.foundation.layout import SubjectLayout
from lora_core.foundation.lora_file import read_lora
from lora_core.training.state import read_state, save_epoch, write_state
from lora_core.training.trainer import Trainer
from tests.conftest import ROOT, TINY_BLIP, photo

TINY_SD15 = "builtin:tiny-sd15"
SMALL = {"resolution": 256, "min_bucket_reso": 128, "max_bucket_reso": 512, "network_dim": 8, "network_alpha": 4}
# Samples cost seconds per round on a CPU: off unless a test is about them (test_sampling, the train stage).
NO_SAMPLES = {"sample_every_n_epochs": 0, "sample_every_n_steps": 0}


def small_config(**updates) -> LoraConfig:
    """The seed's recipe at 256 px with a rank-8 network: seconds per epoch on a CPU."""
    return LoraConfig.model_validate(preset_config().model_dump() | SMALL | NO_SAMPLES | updates)


def captioned_photos(root: Path, seed: int, count: int = 5, caption: str = "a man") -> Path:
    """`count` distinct photos, each with its own caption file."""
    photos = root / "photos"
    photos.mkdir()
    for i in range(count):
        photo((256, 320), seed + i).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(caption)
    return photos


def flow_config(**updates) -> LoraConfig:
    """`small_config` for a whole flow run on the tiny models."""
    config = small_config(**({"pretrained_model_name_or_path": TINY_SD15} | updates))
    config.captioning.model = TINY_BLIP
    return config


def make_subject(root: Path, config: LoraConfig, sizes=((256, 320),), token: str = "t0k3n") -> SubjectLayout:
    """Photos with their own captions, ingested, bucketed and captioned (no BLIP needed).

    Photos under 256 px (the seed's floor) are let in here, never upscaled: small
    buckets keep the slow half-precision CPU tests short.
    """
    photos = root / "photos"
    photos.mkdir(parents=True)
    for i, size in enumerate(sizes):
        photo(size, 70 + i).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(f"a man in a suit, photo {i}")
    layout = SubjectLayout(root / "work", token)
    settings = IngestSettings(min_images=1, min_short_side=64)
    ingest(photos, layout, settings, num_repeats=config.num_repeats, show_progress=False)
    bucket_subject(layout, BucketPlan.from_config(config), config.train_batch_size)
    caption_subject(layout, config.captioning.model_copy(update={"model": TINY_BLIP}), show_progress=False)
    return layout


def test_loss_falls_when_overfitting_one_image(builtin_models_home, tmp_path):
    config = small_config(
        num_repeats=40, unet_lr=3e-3, lr_scheduler="constant", min_snr_gamma=0, train_text_encoder=False
    )
    trainer = Trainer(config, load_base_model(TINY_SD15), make_subject(tmp_path, config), show_progress=False)
    before = trainer.training_loss()
    steps = []
    stats = trainer.run_epoch(1, on_step=lambda *step: steps.append(step))
    assert len(stats.losses) == 20
    assert steps == [(i + 1, loss, lr) for i, (loss, lr) in enumerate(zip(stats.losses, stats.lrs, strict=True))]
    assert trainer.training_loss() < 0.85 * before  # learning, not just running
    assert trainer.training_loss() == trainer.training_loss()  # deterministic
    assert trainer.heldout_loss() is None  # nothing held out (validation_split 0)


def test_a_new_process_continues_to_the_same_weights(builtin_models_home, tmp_path):
    config = small_config(num_repeats=3, max_train_epochs=2)
    layout = make_subject(tmp_path, config, sizes=((256, 320), (320, 256), (256, 256)))
    straight = Trainer(config, load_base_model(TINY_SD15), layout, show_progress=False)
    straight.run_epoch(1)
    write_state(straight, tmp_path / "state.safetensors")
    straight.run_epoch(2)
    resumed = Trainer(config, load_base_model(TINY_SD15), layout, show_progress=False)
    read_state(resumed, tmp_path / "state.safetensors")
    assert resumed.epoch == 1 and resumed.global_step == straight.steps_per_epoch
    resumed.run_epoch(2)
    a, b = straight.network.weights(), resumed.network.weights()
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
    assert resumed.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()
    with pytest.raises(ValueError, match="load that epoch's state"):
        resumed.run_epoch(4)


def test_held_out_images_are_never_trained_on_and_their_loss_is_measured(builtin_models_home, tmp_path):
    """validation_split (sd-scripts' name): one of three images is held out by validation_seed; the epoch
    never draws it, its fixed loss is measured apart and moves with training; the metadata says so."""
    config = small_config(num_repeats=1, validation_split=0.3, validation_seed=5, train_text_encoder=False)
    layout = make_subject(tmp_path, config, sizes=((128, 160),) * 3)
    trainer = Trainer(config, load_base_model(TINY_SD15), layout, show_progress=False)  # the CPU in fp32
    assert len(trainer.items) == 2 and len(trainer.heldout) == 1
    drawn = []
    real = trainer.latents.batch
    trainer.latents.batch = lambda indices, *rest: drawn.extend(indices) or real(indices, *rest)
    once = (500,)  # one timestep: the same for every measurement, and cheap
    before = trainer.heldout_loss(once)
    assert before == trainer.heldout_loss(once) and before != trainer.training_loss(once)  # fixed; other images
    drawn.clear()
    trainer.run_epoch(1)
    assert sorted(drawn) == [0, 1]  # the held-out image, index 2, is never drawn
    assert trainer.heldout_loss(once) != before  # measured on the trained network
    meta = read_lora(save_epoch(trainer, "v" * 64, {"session_id": "1", "started_at": "0"})).metadata
    assert (meta["ss_validation_split"], meta["ss_validation_seed"], meta["ss_num_train_images"]) == ("0.3", "5", "2")
    tags = [{t.strip() for t in item.caption.split(",")} for item in trainer.items + trainer.heldout]
    unique = tags[-1] - set().union(*tags[:-1])  # "photo <i>": the held-out caption's own tag
    assert unique and not any(f'"{tag}"' in meta["ss_tag_frequency"] for tag in unique)
    # validation_seed, not the training seed, chose it (the two would hold out different images).
    every = training_items(layout)
    assert trainer.heldout == split_items(every, 0.3, 5)[1] != split_items(every, 0.3, config.seed)[1]


def _items(count: int) -> list[TrainItem]:
    return [
        TrainItem(BucketAssignment(f"i/{n}.png", 64, 64, 64, 64, 1.0, 64, 64, 0, 0, 64, 64), "c", 1)
        for n in range(count)
    ]


@given(st.integers(3, 30), st.floats(0.01, 0.6), st.integers(0, 1000))
def test_a_split_is_by_image_and_seed_alone(count, split, seed):
    items = _items(count)
    held = max(1, round(count * split))
    if count - held < 2:
        with pytest.raises(SplitError, match="lower validation_split or add photos"):
            split_items(items, split, seed)
        return
    train, heldout = split_items(items, split, seed)
    assert len(heldout) == held and sorted(train + heldout, key=items.index) == items
    again = split_items(list(reversed(items)), split, seed)  # the same images, whatever the order
    assert {i.assignment.image for i in again[1]} == {i.assignment.image for i in heldout}
    assert split_items(items, 0.0, seed) == (items, [])


def test_epoch_file_has_the_metadata_tools_read(builtin_models_home, tmp_path):
    config = small_config(num_repeats=2, max_train_epochs=3)
    layout = make_subject(tmp_path, config)
    trainer = Trainer(config, load_base_model(TINY_SD15), layout, show_progress=False)
    trainer.run_epoch(1)
    info = {"session_id": "7", "started_at": "1700000000.0", "date": "2026-11-26T00:00:00"}
    path = save_epoch(trainer, "k" * 64, info)
    assert path.name == "t0k3n-000001.safetensors"
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    expected = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "8",
        "ss_network_alpha": "4.0",
        "ss_base_model_version": "sd_v1",
        "ss_resolution": "(256, 256)",
        "ss_num_epochs": "3",
        "ss_epoch": "1",
        "ss_steps": str(trainer.global_step),
        "ss_learning_rate": "0.0004",
        "ss_unet_lr": "0.0004",
        "ss_text_encoder_lr": "4e-05",
        "ss_output_name": "t0k3n",
        "ss_training_started_at": "1700000000.0",
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["ss_tag_frequency"] == '{"2_t0k3n": {"t0k3n": 1, "a man in a suit": 1, "photo 0": 1}}'
    assert len(meta["sshs_model_hash"]) == 64
    assert all(alpha == 4.0 for _, _, alpha in read_lora(path).modules.values())


def test_sdxl_trains_and_writes_kohyas_sdxl_file(builtin_models_home, tmp_path):
    config = LoraConfig.model_validate(
        preset_config("sdxl").model_dump()
        | SMALL
        | {"num_repeats": 2, "max_train_epochs": 1, "train_text_encoder": True}  # the preset trains the UNet only
    )
    layout = make_subject(tmp_path, config)
    trainer = Trainer(config, load_base_model("builtin:tiny-sdxl"), layout, show_progress=False)
    stats = trainer.run_epoch(1)
    assert stats.losses and all(loss == loss for loss in stats.losses)  # no NaN
    path = save_epoch(trainer, "s" * 64, {"session_id": "1", "started_at": "0"})
    lora = read_lora(path)
    prefixes = {name.split("_")[0] + "_" + name.split("_")[1] for name in lora.modules}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"} and len(lora.modules) == 986
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


def _kohya_file(base, path: Path, rank: int = 8, alpha: float = 8.0) -> int:
    """A LoRA as sd-scripts names it, written here from its rules (not by our writer)."""
    tensors = {}
    generator = torch.Generator().manual_seed(3)

    def add(name: str, layer) -> None:
        shape_in = layer.in_features if isinstance(layer, torch.nn.Linear) else layer.in_channels
        shape_out = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
        tail = () if isinstance(layer, torch.nn.Linear) else (1, 1)
        tensors[f"{name}.lora_down.weight"] = torch.randn((rank, shape_in, *tail), generator=generator).half()
        tensors[f"{name}.lora_up.weight"] = torch.randn((shape_out, rank, *tail), generator=generator).half() * 0.01
        tensors[f"{name}.alpha"] = torch.tensor(alpha).half()

    for path_, module in base.unet.named_modules():
        if type(module).__name__ == "Transformer2DModel":
            for child, layer in module.named_modules():
                if type(layer) is torch.nn.Linear or (type(layer) is torch.nn.Conv2d and layer.kernel_size == (1, 1)):
                    add("lora_unet_" + f"{path_}.{child}".replace(".", "_"), layer)
    for index in range(12):
        for part in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"):
            add(
                f"lora_te_text_model_encoder_layers_{index}_{part}",
                base.text_encoders[0].encoder.layers[index].self_attn.q_proj,
            )
        for part in ("mlp_fc1", "mlp_fc2"):
            mlp = base.text_encoders[0].encoder.layers[index].mlp
            add(f"lora_te_text_model_encoder_layers_{index}_{part}", mlp.fc1 if part == "mlp_fc1" else mlp.fc2)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank)})
    return len(tensors) // 3


def test_a_kohya_lora_loads_and_training_continues_from_it(builtin_models_home, tmp_path):
    base = load_base_model(TINY_SD15)
    source = tmp_path / "from_kohya.safetensors"
    assert _kohya_file(base, source) == 264
    config = small_config(num_repeats=2, network_dim=8, network_alpha=8, network_weights=str(source))
    trainer = Trainer(config, base, make_subject(tmp_path, config), show_progress=False)
    report = trainer.network.load(read_lora(source))
    assert report.loaded == 264 and report.missing == [] and report.unexpected == []
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
    start = trainer.network.weights()[name][1].clone()
    assert torch.allclose(start, read_lora(source).modules[name][1].float())
    trainer.run_epoch(1)
    assert not torch.equal(trainer.network.weights()[name][1], start)  # it trained on from there


def test_a_kohya_lora_continues_through_the_flow_and_sdxl_runs_end_to_end(
    prefect_harness, builtin_models_home, tmp_path
):
    """`--network-weights` with sd-scripts' file on SD1.5, then the same flow with the SDXL preset."""
    from flows.train_subject import train_subject

    photos = captioned_photos(tmp_path, seed=80)
    source = tmp_path / "kohya.safetensors"
    _kohya_file(load_base_model(TINY_SD15), source, rank=8, alpha=8.0)
    config = flow_config(num_repeats=2, max_train_epochs=1, network_weights=str(source))
    summary = train_subject(photos=photos, token="kh", workdir=tmp_path / "work", config=config, stop_after="train")
    final = Path(summary["train"]["final"])
    with safe_open(final, framework="pt") as handle:
        meta = handle.metadata()
    assert str(source) in meta["ss_training_comment"] and meta["ss_network_dim"] == "8"
    assert meta["ss_network_alpha"] == "8.0"  # the file's rank and alpha, not the config's 8/4
    sdxl = LoraConfig.model_validate(
        preset_config("sdxl").model_dump()
        | SMALL
        | {"num_repeats": 2, "max_train_epochs": 1, "pretrained_model_name_or_path": "builtin:tiny-sdxl"}
        | {"train_text_encoder": True}  # the preset trains the UNet only; both encoders' names are tested here
        | {"sample_every_n_epochs": 1, "sample_prompts": "{token}, portrait photo --w 64 --h 64 --s 2"}
        | {"selection": {"size": 64, "steps": 2, "seeds": [1, 2], "prompts": ["{token}, photo"], "max_resumes": 0}}
        | {"validation_split": 0.2}  # one of the five photos held out: the verdict comes from its loss
    )
    sdxl.captioning.model = TINY_BLIP
    summary = train_subject(photos=photos, token="xl", workdir=tmp_path / "work", config=sdxl)
    lora = read_lora(Path(summary["train"]["final"]))
    assert len(lora.modules) == 986 and any(name.startswith("lora_te2_") for name in lora.modules)
    assert len(summary["train"]["epochs"][0]["samples"]) == 2  # SDXL samples render too
    assert lora.metadata["ss_validation_split"] == "0.2" and lora.metadata["ss_num_train_images"] == str(4 * 2)
    # ... and its metric grids and selection: on the tiny random model no render has a face, so the
    # face-based metrics are unavailable and the decision rests on the held-out photo's loss.
    record = json.loads((tmp_path / "work" / "xl" / "result_current" / "selection.json").read_text())
    assert record["chosen_epoch"] == 1 and {"fidelity", "preservation"} <= set(record["unavailable"])
    assert isinstance(record["metrics"][0]["training_loss"], float)
    assert isinstance(record["metrics"][0]["heldout_loss"], float)
    assert record["verdict"] != "needs_review"
    assert any("rests on the held-out loss" in reason for reason in record["reasons"])
    assert all(len(reason) <= 160 and "guard" not in reason for reason in record["reasons"])  # plain and short
    assert len(list((tmp_path / "work" / "xl" / "txt2img-images").glob("xl_e000001_w*.png"))) == 3 * 2


@given(
    st.lists(
        st.tuples(st.sampled_from([(512, 512), (448, 576), (576, 448)]), st.integers(1, 4)), min_size=1, max_size=8
    ),
    st.integers(1, 4),
    st.integers(0, 10_000),
)
def test_batches_never_mix_buckets_and_show_each_image_its_repeats(spec, batch_size, seed):
    items = [
        TrainItem(BucketAssignment(f"{i}.png", w, h, w, h, 1.0, w, h, 0, 0, w, h), "c", repeats)
        for i, ((w, h), repeats) in enumerate(spec)
    ]
    batches = epoch_batches(items, batch_size, seed)
    assert batches == epoch_batches(items, batch_size, seed)  # the seed fixes the order
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert len({items[i].assignment.bucket for i in batch}) == 1
    shown = [i for batch in batches for i in batch]
    assert sorted(shown) == sorted(i for i, item in enumerate(items) for _ in range(item.repeats))


def _group_gone(pgid: int, within: float = 10.0) -> bool:
    """No process of the group `pgid` is left (the test leaves nothing running behind it)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("base, preset", [(TINY_SD15, "sd15"), ("builtin:tiny-flux", "flux")])
def test_a_killed_run_resumes_at_its_first_unfinished_epoch(builtin_models_home, tmp_path, base, preset):
    """Kill the CLI mid-run, run it again: same final weights as a run never killed (SD1.5 and FLUX.1)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(5):
        photo((256 + 32 * i, 320), 90 + i).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(f"a man, photo {i}")
    config = tmp_path / "config.json"
    config.write_text(
        '{"resolution": 256, "min_bucket_reso": 128, "max_bucket_reso": 512, "num_repeats": 3, '
        '"epoch": 2, "network_dim": 4, "network_alpha": 2, "sample_every_n_epochs": 0}'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(ROOT),
    }

    def command(work: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "flows.train_subject",
            str(photos),
            "--token",
            "t0k3n",
            "--workdir",
            str(work),
            "--base-model",
            base,
            "--preset",
            preset,
            "--caption-model",
            TINY_BLIP,
            "--config",
            str(config),
            "--stop-after",
            "train",
        ]

    killed = tmp_path / "killed"
    # A job of its own, as a terminal starts it: kill -9 takes the whole job, Prefect's temporary server too.
    process = subprocess.Popen(
        command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    first = killed / "t0k3n" / "result_current" / "t0k3n-000001.safetensors"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.exists(), "epoch 1 never finished"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert _group_gone(process.pid), "a process of the killed run is still there"
    assert not (killed / "t0k3n" / "result_current" / "t0k3n-000002.safetensors").exists()  # killed mid-run
    done = subprocess.run(command(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # The killed run's record is not left RUNNING (a ghost in the UI): the next run marked it Crashed.
    with sqlite3.connect(tmp_path / "home" / "prefect.db") as db:
        states = dict(db.execute("select state_type, count(*) from flow_run group by state_type").fetchall())
        running_tasks = db.execute("select count(*) from task_run where state_type = 'RUNNING'").fetchone()[0]
    assert states.get("RUNNING", 0) == 0 and states.get("CRASHED") == 1 and running_tasks == 0, states
    # Epoch 1 is not trained again: Prefect's cache serves it, or, when the kill came before Prefect
    # recorded it, the finished files on disk do.
    kept = "epoch 1 was finished before the last run stopped; kept" in done.stdout + done.stderr
    assert "train (cached): epoch 1" in done.stdout or kept, done.stdout[-6000:]
    clean = subprocess.run(command(tmp_path / "clean"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    resumed = read_lora(killed / "t0k3n" / "result_current" / "t0k3n.safetensors").modules
    straight = read_lora(tmp_path / "clean" / "t0k3n" / "result_current" / "t0k3n.safetensors").modules
    assert resumed.keys() == straight.keys()
    for name, (down, up, _) in straight.items():
        assert torch.equal(resumed[name][0], down) and torch.equal(resumed[name][1], up), name


def test_the_train_stage_caches_each_epoch_and_publishes_it(prefect_harness, builtin_models_home, tmp_path):
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.train_subject import train_subject

    photos = captioned_photos(tmp_path, seed=40)
    prompts = "{token}, portrait photo --w 64 --h 64 --s 2\n{token} at the beach --w 64 --h 64 --s 2 --d 5"
    # Steps set too, as in a kohya_ss JSON: with the epochs set they are ignored, as sd-scripts ignores them.
    config = flow_config(
        num_repeats=2, max_train_epochs=2, sample_every_n_epochs=1, sample_every_n_steps=2, sample_prompts=prompts
    )
    work = tmp_path / "work"
    first = train_subject(photos=photos, token="Ep", workdir=work, config=config, stop_after="train")
    assert [e["epoch"] for e in first["train"]["epochs"]] == [1, 2] and "train-epoch" not in first["cached"]
    result = work / "Ep" / "result_current"
    # Samples after each epoch, named as sd-scripts names them: 2 seeds for the first prompt, seed 5 for the second.
    names = sorted(p.name for p in (result / "sample").glob("Ep_e*.png"))
    assert len(names) == 6 and all(re.fullmatch(r"Ep_e00000[12]_0[01]_\d{14}_[125]\.png", n) for n in names)
    assert not list((result / "sample").glob("Ep_0*.png"))  # one round an epoch, none at steps
    assert sum("_01_" in n and n.endswith("_5.png") for n in names) == 2
    assert (result / "Ep.safetensors").read_bytes() == (result / "Ep-000002.safetensors").read_bytes()
    exported = json.loads((result / "kohya_ss_config.json").read_text())
    assert exported["pretrained_model_name_or_path"] == TINY_SD15 and exported["epoch"] == 2
    again = train_subject(photos=photos, token="Ep", workdir=work, config=config, stop_after="train")
    assert again["cached"].count("train-epoch") == 2
    # A deleted epoch file is trained again, not trusted from the cache; the other epoch stays cached.
    (result / "Ep-000002.safetensors").unlink()
    third = train_subject(photos=photos, token="Ep", workdir=work, config=config, stop_after="train")
    assert third["cached"].count("train-epoch") == 1 and (result / "Ep-000002.safetensors").is_file()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ep-epoch-1", "ep-samples-epoch-2"]))
        )
    assert {a.key for a in artifacts} == {"ep-epoch-1", "ep-samples-epoch-2"}
    for artifact in artifacts:  # the epoch's loss chart (PNG), the samples' preview (JPEG; the images on disk)
        kind = "png" if artifact.key == "ep-epoch-1" else "jpeg"
        assert f"data:image/{kind};base64," in artifact.data, artifact.key


def test_oom_ladder_follows_the_seed():
    from lora_core.training.memory import apply_steps, oom_step

    config = small_config(mixed_precision="no", train_batch_size=4, cache_latents=False)
    seen = []
    while (step := oom_step(config, bf16_ok=True)) is not None:
        seen.append(step[1])
        config = apply_steps(config, [{"updates": step[0], "note": step[1]}]).model_copy(
            update={"training_comment": ""}
        )
    # Cheapest first: rungs that save memory and time, then checkpointing, the batch, and what changes the recipe.
    assert seen == [
        "cache latents",
        "train in bf16",
        "gradient checkpointing",
        "halve the batch to 2",
        "halve the batch to 1",
        "train the UNet only",
    ]
    assert oom_step(small_config(mixed_precision="no"), bf16_ok=False)[1] == "train in fp16"
    assert oom_step(small_config(cache_latents=False, cache_latents_to_disk=True), bf16_ok=False)[1] != "cache latents"


def test_flux_steps_down_through_its_presets_memory_before_the_shared_rungs():
    """`flux` (fp8) -> NF4 (`flux-16gb`'s base) -> T5 at 256 tokens (`flux-12gb`'s), then the batch."""
    from lora_core.training.memory import apply_steps, oom_step

    config = LoraConfig.model_validate(preset_config("flux").model_dump() | {"train_batch_size": 2})
    start, steps = config, []
    while (step := oom_step(config, bf16_ok=True)) is not None:
        steps.append({"updates": step[0], "note": step[1]})
        config = apply_steps(start, steps)
    assert [s["note"] for s in steps] == ["4-bit NF4 base weights", "T5 reads 256 tokens", "halve the batch to 1"]
    assert config.nf4_base and not config.fp8_base and config.t5xxl_max_token_length == 256
    assert config.training_comment == "out of memory; took: " + ", ".join(s["note"] for s in steps)
    twelve = preset_config("flux-12gb")
    for field in ("nf4_base", "t5xxl_max_token_length", "gradient_checkpointing", "mixed_precision"):
        assert getattr(config, field) == getattr(twelve, field), field  # the ladder ends on the 12 GB preset's


def test_out_of_memory_climbs_the_ladder_and_is_recorded(prefect_harness, builtin_models_home, tmp_path, monkeypatch):
    import json
    import weakref

    from flows.train_subject import train_subject

    real, real_init = Trainer.run_epoch, Trainer.__init__
    failures, failed = [], []

    def run_epoch(self, epoch, **kwargs):
        if len(failures) < 3:
            failures.append(self.config.train_batch_size)
            failed.append(weakref.ref(self))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, epoch, **kwargs)

    def init(self, *args, **kwargs):
        # The failed attempt's models are gone before the next attempt loads its own copy.
        assert all(ref() is None for ref in failed), "a failed attempt's trainer is still alive"
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "run_epoch", run_epoch)
    monkeypatch.setattr(Trainer, "__init__", init)
    photos = captioned_photos(tmp_path, seed=60)
    config = flow_config(num_repeats=2, max_train_epochs=1, mixed_precision="no")
    work = tmp_path / "work"
    train_subject(photos=photos, token="oom", workdir=work, config=config, stop_after="train")
    assert failures == [2, 2, 2]  # the batch is halved only at the third rung
    exported = json.loads((work / "oom" / "result_current" / "kohya_ss_config.json").read_text())
    assert exported["mixed_precision"] == "fp16" and exported["gradient_checkpointing"] is True
    assert exported["train_batch_size"] == 1
    assert exported["training_comment"] == (
        "out of memory; took: train in fp16, gradient checkpointing, halve the batch to 1"
    )
    with safe_open(work / "oom" / "result_current" / "oom.safetensors", framework="pt") as handle:
        assert handle.metadata()["ss_training_comment"] == exported["training_comment"]
        assert handle.metadata()["ss_batch_size_per_device"] == "1"


def test_a_render_out_of_memory_never_changes_training(prefect_harness, builtin_models_home, tmp_path, monkeypatch):
    """Samples that run out of memory (injected, every try) are retried lighter, then skipped and named in the
    epoch's notes: the settings, the epochs and each epoch's LoRA are those of a run without samples."""
    import tasks.train
    from flows.train_subject import train_subject

    tries: list[bool] = []

    def render(base, spec, precision, light=False):
        tries.append(light)
        raise torch.OutOfMemoryError("CUDA out of memory (injected in a render)")

    prompts = "{token}, portrait photo --w 64 --h 64 --s 2"
    photos = captioned_photos(tmp_path, seed=61)
    plain = flow_config(num_repeats=2, max_train_epochs=2)
    train_subject(photos=photos, token="rq", workdir=tmp_path / "plain", config=plain, stop_after="train")
    monkeypatch.setattr(tasks.train, "render", render)
    sampled = plain.model_copy(update={"sample_every_n_epochs": 1, "sample_prompts": prompts})
    summary = train_subject(photos=photos, token="rq", workdir=tmp_path / "work", config=sampled, stop_after="train")
    assert tries == [False, True, False, True]  # each epoch's round: once as is, once lighter; never again
    epochs = summary["train"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for number, epoch in enumerate(epochs, 1):
        assert f"samples at epoch {number} skipped: out of GPU memory" in " ".join(epoch["notes"])
    result, reference = tmp_path / "work" / "rq" / "result_current", tmp_path / "plain" / "rq" / "result_current"
    exported = json.loads((result / "kohya_ss_config.json").read_text())
    assert exported["training_comment"] == "" and exported["train_batch_size"] == plain.train_batch_size
    for name in ("rq-000001.safetensors", "rq-000002.safetensors"):
        ours, theirs = read_lora(result / name).modules, read_lora(reference / name).modules
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k][i], theirs[k][i]) for k in ours for i in (0, 1)), name


def test_gradient_checkpointing_trains_the_same_network(builtin_models_home, tmp_path):
    config = small_config(num_repeats=2, gradient_checkpointing=True)
    trainer = Trainer(config, load_base_model(TINY_SD15), make_subject(tmp_path, config), show_progress=False)
    assert trainer.base.unet.is_gradient_checkpointing
    stats = trainer.run_epoch(1)
    assert stats.losses and all(loss == loss for loss in stats.losses)
    assert any(torch.count_nonzero(up) for _, up in trainer.network.weights().values())  # lora_up moved off zero


def test_continuing_a_lora_archives_the_last_run_and_records_the_source(prefect_harness, builtin_models_home, tmp_path):
    """The seed: download the undertrained LoRA, train 2-3 more epochs from it, keep the old one."""
    import json

    from flows.train_subject import train_subject

    photos = captioned_photos(tmp_path, seed=20)
    config = flow_config(num_repeats=2, max_train_epochs=2)
    work = tmp_path / "work"
    train_subject(photos=photos, token="res", workdir=work, config=config, stop_after="train")
    current = work / "res" / "result_current"
    first_final = (current / "res.safetensors").read_bytes()
    # Continue from the final LoRA where it lies, in result_current itself.
    more = config.model_copy(update={"network_weights": str(current / "res.safetensors"), "max_train_epochs": 1})
    summary = train_subject(photos=photos, token="res", workdir=work, config=more, stop_after="train")
    archives = sorted((work / "res").glob("result_2*"))
    assert len(archives) == 1 and (archives[0] / "res.safetensors").read_bytes() == first_final
    assert (archives[0] / "res-000002.safetensors").is_file() and (archives[0] / "kohya_ss_config.json").is_file()
    assert [e["epoch"] for e in summary["train"]["epochs"]] == [1]
    exported = json.loads((current / "kohya_ss_config.json").read_text())
    assert exported["network_weights"] == str((current / "res.safetensors").resolve())  # where it came from
    with safe_open(current / "res.safetensors", framework="pt") as handle:
        assert str(current / "res.safetensors") in handle.metadata()["ss_training_comment"]
    # It started from the old weights, not from zero: its up weights are not those of a fresh start.
    continued = read_lora(current / "res.safetensors").modules
    old = read_lora(archives[0] / "res.safetensors").modules
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    assert torch.count_nonzero(old[name][1]) and not torch.equal(continued[name][1], old[name][1])
    # The same starting LoRA, now in the archive, is the same run: served from the cache, nothing archived.
    same = more.model_copy(update={"network_weights": str(archives[0] / "res.safetensors")})
    again = train_subject(photos=photos, token="res", workdir=work, config=same, stop_after="train")
    assert again["cached"].count("train-epoch") == 1 and len(sorted((work / "res").glob("result_2*"))) == 1


def test_long_captions_are_encoded_in_75_token_windows(builtin_models_home, tmp_path):
    from lora_core.families.stable_diffusion import token_windows

    config = small_config(num_repeats=1, max_token_length=150, train_text_encoder=False)
    trainer = Trainer(config, load_base_model(TINY_SD15), make_subject(tmp_path, config), show_progress=False)
    tokenizer = trainer.base.tokenizers[0]
    captions = ["t0k3n, a man", "y" * 120]  # the tiny tokenizer spends one token per character
    first, second = token_windows(tokenizer, captions, 150, trainer.device)
    standard = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(first.cpu(), standard.input_ids)  # one window is exactly what CLIP's tokenizer gives
    assert second[1, 0] == tokenizer.bos_token_id and second[1, 1 + 45] == tokenizer.eos_token_id  # 120 - 75 = 45
    # sd-scripts' length: one BOS, 75 tokens per window, one EOS; the inner BOS/EOS pairs are dropped.
    text = trainer.conditioning.encode(captions, trainer.device)
    assert text.hidden.shape[:2] == (2, 152)
    encoder = trainer.base.text_encoders[0]
    whole = [encoder(ids).last_hidden_state for ids in (first, second)]
    assert torch.equal(text.hidden[:, :76], whole[0][:, :76])
    assert torch.equal(text.hidden[:, 76:151], whole[1][:, 1:76]) and torch.equal(text.hidden[:, 151], whole[1][:, 76])
    assert trainer.run_epoch(1).losses

    conditioning = trainer.base.family.conditioning(
        trainer.base, config.model_copy(update={"clip_skip": 1, "max_token_length": 225})
    )
    assert conditioning.encode(captions, trainer.device).hidden.shape[1] == 227


def test_shuffle_tags_keeps_the_leading_tokens():
    import random

    from lora_core.dataset.train_data import shuffle_tags

    caption = "t0k3n, a man, suit, tie, smiling, outdoors"
    seen = {shuffle_tags(caption, 1, random.Random(seed)) for seed in range(20)}
    assert len(seen) > 1 and all(s.startswith("t0k3n, ") for s in seen)
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in seen)
    assert shuffle_tags(caption, 6, random.Random(0)) == caption


@pytest.mark.parametrize(
    "updates",
    [
        {"optimizer": "Adafactor", "lr_scheduler": "cosine_with_restarts", "lr_warmup": 50},
        {"v_parameterization": True, "clip_skip": 2, "noise_offset": 0.1, "shuffle_caption": True, "keep_tokens": 1},
        {"gradient_accumulation_steps": 2, "optimizer": "AdamW", "lr_scheduler": "linear"},
    ],
    ids=["adafactor-warmup", "vpred-clipskip-offset-shuffle", "accumulation"],
)
def test_recipe_options_train(builtin_models_home, tmp_path, updates):
    config = small_config(num_repeats=4, max_train_epochs=1, **updates)
    layout = make_subject(tmp_path, config, sizes=((256, 320), (256, 320), (320, 256)))
    trainer = Trainer(config, load_base_model(TINY_SD15), layout, show_progress=False)
    stats = trainer.run_epoch(1)
    batches = len(epoch_batches(trainer.items, config.train_batch_size, 0))
    assert len(stats.losses) == batches // config.gradient_accumulation_steps
    assert all(loss == loss and loss < 100 for loss in stats.losses)
    if config.lr_warmup:  # warm-up: the learning rate climbs over the first half
        assert stats.lrs[0] < stats.lrs[1] <= config.unet_lr
    if config.v_parameterization:
        assert trainer.base.noise_scheduler.config.prediction_type == "v_prediction"
    assert any(torch.count_nonzero(up) for _, up in trainer.network.weights().values())


def test_a_trained_epoch_file_changes_a_diffusers_pipeline(builtin_models_home, tmp_path, caplog):
    from tests.unit.test_lora_io import _diffusers_load

    config = small_config(num_repeats=4, max_train_epochs=1, unet_lr=3e-3)
    base = load_base_model(TINY_SD15)
    trainer = Trainer(config, base, make_subject(tmp_path, config), show_progress=False)
    trainer.run_epoch(1)
    path = save_epoch(trainer, "e" * 64, {"session_id": "1", "started_at": "0"})
    _, before, after = _diffusers_load(base, path, caplog)
    assert "unexpected" not in caplog.text.lower()
    assert abs(before - after).max() > 1e-4


def test_epochs_on_disk_are_kept_when_prefect_lost_their_records(
    prefect_harness, builtin_models_home, tmp_path, monkeypatch
):
    """A kill after an epoch's files were written but before Prefect recorded the task: no retraining."""
    import shutil

    from flows.train_subject import train_subject

    photos = captioned_photos(tmp_path, seed=30)
    config = flow_config(num_repeats=2, max_train_epochs=2)
    work = tmp_path / "work"
    first = train_subject(photos=photos, token="kp", workdir=work, config=config, stop_after="train")
    shutil.rmtree(SubjectLayout(work, "kp").prefect_results)  # every cache record gone, the files stay

    def never(self, epoch, **kwargs):
        raise AssertionError(f"epoch {epoch} trained again")

    monkeypatch.setattr(Trainer, "run_epoch", never)
    again = train_subject(photos=photos, token="kp", workdir=work, config=config, stop_after="train")
    assert [e["mean_loss"] for e in again["train"]["epochs"]] == [e["mean_loss"] for e in first["train"]["epochs"]]


def test_save_every_n_epochs_writes_every_nth_epoch_and_the_last(prefect_harness, builtin_models_home, tmp_path):
    from flows.train_subject import train_subject

    photos = captioned_photos(tmp_path, seed=170)
    config = flow_config(num_repeats=1, max_train_epochs=3, save_every_n_epochs=2)
    work = tmp_path / "work"
    first = train_subject(photos=photos, token="sv", workdir=work, config=config, stop_after="train")
    result = work / "sv" / "result_current"
    assert sorted(p.name for p in result.glob("sv-*.safetensors")) == ["sv-000002.safetensors", "sv-000003.safetensors"]
    assert [e["lora"] is None for e in first["train"]["epochs"]] == [True, False, False]
    assert (result / "sv.safetensors").read_bytes() == (result / "sv-000003.safetensors").read_bytes()
    again = train_subject(photos=photos, token="sv", workdir=work, config=config, stop_after="train")
    assert again["cached"].count("train-epoch") == 3  # epoch 1, with no LoRA file, counts as done too


def test_samples_at_steps_only_when_no_epoch_cadence_is_set(prefect_harness, builtin_models_home, tmp_path):
    """sd-scripts' rule: `sample_every_n_steps` renders when `sample_every_n_epochs` is 0, at those steps."""
    from flows.train_subject import train_subject
    from lora_core.training.sampling import sample_step_interval

    assert sample_step_interval(small_config(sample_every_n_epochs=1, sample_every_n_steps=2)) == 0
    assert sample_step_interval(small_config(sample_every_n_epochs=0, sample_every_n_steps=2)) == 2
    prompts = "{token}, portrait photo --w 64 --h 64 --s 2"
    config = flow_config(
        num_repeats=2, max_train_epochs=1, sample_every_n_epochs=0, sample_every_n_steps=2, sample_prompts=prompts
    )
    train_subject(
        photos=captioned_photos(tmp_path, seed=41),
        token="St",
        workdir=tmp_path / "w",
        config=config,
        stop_after="train",
    )
    samples = tmp_path / "w" / "St" / "result_current" / "sample"
    # 5 optimizer steps (5 photos, 2 repeats, batches of 2): rounds at steps 2 and 4, 2 seeds each; no epoch round.
    steps = sorted(p.name for p in samples.glob("St_0*.png"))
    assert len(steps) == 4 and {n.split("_")[1] for n in steps} == {"000002", "000004"}
    assert not list(samples.glob("St_e*.png"))


def test_logging_dir_writes_tensorboard_events_of_every_step_and_epoch(prefect_harness, builtin_models_home, tmp_path):
    """kohya's logging_dir: per-step loss and learning rate, per-epoch mean and held-out loss, read back with
    tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flows.train_subject import train_subject

    photos = captioned_photos(tmp_path, seed=60)
    config = flow_config(num_repeats=2, max_train_epochs=2, logging_dir="tb", validation_split=0.2)
    summary = train_subject(photos=photos, token="tb", workdir=tmp_path / "work", config=config, stop_after="train")
    (folder,) = (tmp_path / "work" / "tb" / "tb").iterdir()  # <logging_dir>/<token>-<run key>, in the subject
    events = EventAccumulator(str(folder))
    events.Reload()
    assert [epoch["epoch"] for epoch in summary["train"]["epochs"]] == [1, 2]
    numbers = [json.loads(path.read_text()) for path in sorted((tmp_path / "work" / "tb").rglob("epoch-0*.json"))]
    losses = [loss for epoch in numbers for loss in epoch["losses"]]
    lrs = [lr for epoch in numbers for lr in epoch["lrs"]]
    assert len(numbers) == 2 and losses
    current, rate = events.Scalars("loss/current"), events.Scalars("lr/unet")
    assert [e.step for e in current] == list(range(1, len(losses) + 1))
    assert [e.value for e in current] == pytest.approx(losses, rel=1e-6)
    assert [e.value for e in rate] == pytest.approx(lrs, rel=1e-6)
    assert [e.step for e in events.Scalars("loss/epoch")] == [1, 2]
    validation = events.Scalars("loss/validation")
    assert [e.step for e in validation] == [1, 2] and all(e.value > 0 for e in validation)
    # The log is not part of what makes the run: another logging_dir trains nothing again.
    files = sorted((tmp_path / "work" / "tb" / "result_current").glob("tb-*.safetensors"))
    before = [path.stat().st_mtime_ns for path in files]
    train_subject(
        photos=photos,
        token="tb",
        workdir=tmp_path / "work",
        config=config.model_copy(update={"logging_dir": "tb2"}),
        stop_after="train",
    )
    assert len(files) == 2 and [path.stat().st_mtime_ns for path in files] == before
