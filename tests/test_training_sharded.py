"""Sharded (FSDP) training: two CPU processes over gloo shard the base weights of tiny Flux and SD pipelines and end
with the shift a DDP run of the same launch ends with, resumed runs included."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import svdiff_adapter as sa
from svdiff_adapter.training.sharding import (
    FSDP_ENVIRONMENT,
    ShardingPlan,
    kept_whole,
    shard_blocks,
    sharding_plan,
)

from .test_training import build_tiny_pipeline, two_process_run
from .transformer_models import tiny_flux_training_pipeline

RESOLUTION = 32
T5_TOKENS = 16


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux")
    tiny_flux_training_pipeline().save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_fsdp_run_shards_the_base_and_ends_with_the_ddp_shift(flux_dir, tmp_path):
    """Two runs of the same 2-process launch (~1 min): DDP, then FSDP (accelerate's environment variable). Both
    train the transformer and the CLIP encoder, with a validation image at step 2."""
    options = ("--resolution", RESOLUTION, "--train_text_encoder", "--max_sequence_length", T5_TOKENS,
               "--validation_prompt", "a photo of sks dog", "--validation_steps", 2, "--num_validation_images", 1,
               "--validation_inference_steps", 2)
    runs = {}
    for kind, port, environment in (("ddp", 29521, None), ("fsdp", 29522, {FSDP_ENVIRONMENT: "true"})):
        folder = tmp_path / kind
        folder.mkdir()
        ranks = two_process_run(flux_dir, folder, *options, port=port, environment=environment)
        counts = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]
        runs[kind] = ranks, counts, sa.load_shift_file(folder / "out" / sa.DEFAULT_WEIGHT_NAME)

    (ddp0, ddp1), ddp_counts, ddp_file = runs["ddp"]
    (fsdp0, fsdp1), fsdp_counts, fsdp_file = runs["fsdp"]
    # Sharded: each process holds half of every sharded base weight; DDP shards nothing.
    assert all(c["sharded"] == 0 for c in ddp_counts)
    for counts in fsdp_counts:
        assert counts["sharded"] > 0 and 0.45 * counts["total"] <= counts["local"] <= 0.55 * counts["total"]
    # The shifts are whole on both processes, identical there, and DDP's. Not bit for bit: the all-gathered weights
    # sit elsewhere in memory, and the CPU's matmul kernels round differently by alignment (observed ≤ 5e-9 after
    # two Adam steps of ~2e-3; the bound leaves room for other CPUs). Gradients left unaveraged would make the ranks
    # differ and move δ by ~lr = 1e-3.
    assert fsdp0.keys() == ddp0.keys() == fsdp1.keys()
    assert {key.split(".")[0] for key in fsdp0} == {"transformer", "text_encoder"}
    for key in ddp0:
        assert torch.equal(ddp0[key], ddp1[key]) and torch.equal(fsdp0[key], fsdp1[key]), key
        torch.testing.assert_close(fsdp0[key], ddp0[key], rtol=0, atol=1e-6, msg=key)
    assert any(v.abs().max() > 1e-4 for v in fsdp0.values())
    # The saved file is complete: the same values and base fingerprints as the unsharded run's.
    assert fsdp_file.deltas.keys() == ddp_file.deltas.keys()
    for component, deltas in ddp_file.deltas.items():
        assert deltas.keys() == fsdp_file.deltas[component].keys()
        for key in deltas:
            torch.testing.assert_close(fsdp_file.deltas[component][key], deltas[key], rtol=0, atol=1e-6)
    assert fsdp_file.fingerprints == ddp_file.fingerprints
    images = sorted(p.name for p in (tmp_path / "fsdp" / "out" / "validation").iterdir())
    assert images == ["step-000002-0.png"]


@pytest.mark.slow
def test_fsdp_unet_run_resumes_exactly_and_ends_near_the_ddp_shift(tmp_path):
    """A UNet pipeline (nested blocks: the outermost ones are sharded) with prior preservation, under FSDP: 2 steps
    resumed to 3 from the checkpoint equal a straight 3-step run bit for bit, and end within rounding of a 3-step
    DDP run (~2.5 min)."""
    model = tmp_path / "tiny-sd"
    build_tiny_pipeline().save_pretrained(model)
    options = ("--resolution", RESOLUTION, "--train_text_encoder", "--with_prior_preservation", "--class_data_dir",
               tmp_path / "class", "--class_prompt", "a photo of dog", "--num_class_images", 2,
               "--class_inference_steps", 2)
    fsdp = {FSDP_ENVIRONMENT: "true"}

    def run(name, *extra, port, environment=fsdp):
        (tmp_path / name).mkdir(exist_ok=True)
        return two_process_run(str(model), tmp_path / name, *options, *extra, port=port, environment=environment)

    run("split", port=29523)
    resumed = run("split", "--max_train_steps", 3, "--resume_from_checkpoint", "latest", port=29524)
    counts = json.loads((tmp_path / "split" / "rank0.json").read_text())
    assert counts["sharded"] > 0 and counts["local"] < 0.55 * counts["total"]
    straight = run("straight", "--max_train_steps", 3, port=29525)
    ddp = run("ddp", "--max_train_steps", 3, port=29526, environment=None)
    assert {key.split(".")[0] for key in resumed[0]} == {"unet", "text_encoder"}
    # Within rounding of DDP: after 3 Adam steps of ~1e-3 the CPU kernels' alignment-dependent rounding has grown to
    # ≤ 1.3e-7 (Adam divides by √v, which magnifies it where gradients are small); no averaging would differ by ~1e-3.
    for key in ddp[0]:
        assert torch.equal(resumed[0][key], resumed[1][key]) and torch.equal(resumed[0][key], straight[0][key]), key
        torch.testing.assert_close(straight[0][key], ddp[0][key], rtol=0, atol=1e-6, msg=key)


def test_blocks_follow_no_split_modules_or_the_plugins_classes():
    transformer = tiny_flux_training_pipeline().transformer
    blocks = shard_blocks(transformer, ShardingPlan())
    assert blocks == [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))] + [
        f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))]
    assert shard_blocks(transformer, ShardingPlan(block_classes=("FluxSingleTransformerBlock",))) == [
        f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))]
    # Outermost matches only: a block inside a sharded block is not sharded again.
    nested = nn.Sequential(nn.Sequential(nn.Sequential(nn.Linear(2, 2))), nn.Sequential(nn.Linear(2, 2)))
    assert shard_blocks(nested, ShardingPlan(block_classes=("Sequential",))) == ["0", "1"]


def test_trained_values_and_norm_weights_stay_whole():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    for p in model.parameters():
        p.requires_grad_(False)
    sa.add_spectral_shift(model, sa.SpectralShiftConfig(target_kinds=["linear", "norm"], norm_mode="elementwise"), "default",
                          svd_cache=False)
    whole = kept_whole(model)
    deltas = {p for n, p in model.named_parameters() if "spectral_delta" in n}
    assert deltas and deltas <= whole
    assert model[1].base_layer.weight in whole and model[1].base_layer.bias in whole
    assert model[0].base_layer.weight not in whole


def test_plan_reads_accelerates_fsdp_settings(monkeypatch):
    monkeypatch.setenv(FSDP_ENVIRONMENT, "true")
    assert sharding_plan() == ShardingPlan(reshard_after_forward=True, block_classes=None)
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP")
    assert not sharding_plan().reshard_after_forward
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD")
    with pytest.raises(NotImplementedError, match="HYBRID_SHARD"):
        sharding_plan()
    monkeypatch.delenv("FSDP_SHARDING_STRATEGY")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert not sharding_plan().reshard_after_forward
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(NotImplementedError, match="fsdp_offload_params"):
        sharding_plan()
    monkeypatch.delenv("FSDP_OFFLOAD_PARAMS")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(ValueError, match="fsdp_cpu_ram_efficient_loading"):
        sharding_plan()
