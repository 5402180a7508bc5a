"""The training benches run end to end on tiny models: finite losses, a ratio, the GPU bench's checks."""

from __future__ import annotations

import json
import math

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread: tiny steps on a busy 2-core machine slow down manyfold with two spinning threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_gpu_bench_smoke_runs_every_check(one_thread, tmp_path, monkeypatch, capsys):
    from bench import gpu

    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu.main(["--smoke"]) == 0
    result = json.loads((tmp_path / "bench-gpu.json").read_text())
    assert [case["case"] for case in result["cases"]] == ["sd15-fp32", "sdxl-bf16"]
    for case in result["cases"]:
        assert case["ours"]["losses_finite"] and case["bare"]["losses_finite"]
        assert case["bare"]["same_weights"]
        assert math.isfinite(case["ratio"]) and case["ratio"] > 0
        assert case["sample_finite"]
        assert case["resume"]["finite"] and case["resume"]["loaded_global_step"] == 2
        assert case["resume"]["values_match"] and case["resume"]["optimizer_slots"]
        assert len(case["ours"]["rounds_steps_per_s"]) == len(case["bare"]["rounds_steps_per_s"]) == 3
        assert case["ours"]["peak_epoch_gb"] is None  # a CPU has no VRAM figure; the render round still ran
        assert case["boundary"]["lora_bytes"] > 0 and case["boundary"]["markdown_chars"] > 0
    assert "ours/bare" in capsys.readouterr().out
    assert (tmp_path / "bench-gpu.md").read_text().startswith("# bench.gpu (smoke")


def test_gpu_bench_without_cuda_says_so(capsys):
    from bench import gpu

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_train_step_bench_reports_a_ratio(one_thread, tmp_path, monkeypatch, capsys):
    from bench import train_step

    monkeypatch.setenv("OUT", str(tmp_path))
    args = ["--model", "tiny", "--steps", "2", "--rounds", "1", "--resolution", "64", "--threads", "1"]
    assert train_step.main(args) == 0
    result = json.loads((tmp_path / "bench-train-step.json").read_text())
    assert result["ours"]["losses_finite"] and result["bare"]["losses_finite"]
    assert result["ours"]["steps"] == result["bare"]["steps"] == 1
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert 0 < result["boundary_share_seed_epoch"] < 1
    assert "ratio ours/bare" in capsys.readouterr().out


def test_ingest_speed_bench_reports_a_ratio(tmp_path, monkeypatch, capsys):
    from bench import ingest_speed

    monkeypatch.setenv("OUT", str(tmp_path))
    assert ingest_speed.main(["--photos", "6", "--size", "640x480", "--pool-photos", "2"]) == 0
    result = json.loads((tmp_path / "bench-ingest-speed.json").read_text())
    assert result["ours"]["accepted"] == 6, "distinct photos: none is a near-duplicate of another"
    for way in ("ours", "plain", "same_work", "threads", "processes"):
        assert result[way]["images_per_s"] > 0
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert "ratio ours/plain loop" in capsys.readouterr().out


def test_vram_cap_plays_a_smaller_card(monkeypatch, capsys):
    """`--vram-cap GB` caps the process's share of the card (torch refuses past it, as a 12 GB card would)."""
    import types

    from bench.gpu import main
    from bench.measure import cap_vram

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--vram-cap GB" in capsys.readouterr().out
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: asked.append((f, d)))
    assert cap_vram(torch.device("cuda:0"), 12) == 12 and asked == [(12 / 80, torch.device("cuda:0"))]
    assert cap_vram(torch.device("cuda:0"), 200) == 200 and asked[-1][0] == 1.0  # never above the card
    assert cap_vram(torch.device("cpu"), 12) is None and len(asked) == 2
