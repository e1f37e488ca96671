"""`svdiff export-lora` files read back by their readers: diffusers' `load_lora_weights`, a re-implementation of
ComfyUI's key mapping and LyCORIS (benchmarks/export_check.py), on tiny SD 1.5 and SDXL pipelines.

The reference is the shift itself, applied by the package's spectral layers; errors are relative to the shift's own
effect, ‖out_reader − out_shift‖ / ‖out_shift − out_base‖, per component on the probe inputs.
"""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import svdiff_adapter as sa
from benchmarks.export_check import (
    PIPELINES,
    comfyui_load,
    components,
    diffusers_load,
    lycoris_load,
    output_errors,
    shifted_pipeline,
)
from svdiff_adapter import SpectralShiftConfig
from svdiff_adapter.cli import main
from svdiff_adapter.format import load_shift_file
from svdiff_adapter.tools import ToolError, export_lora
from svdiff_adapter.tuner import spectral_layers

from .tiny_models import tiny_pipeline, tiny_unet


FULL_RANK = 10_000
CLOSE = 1e-4  # float32 round-off of a full-rank export, relative to the shift's effect


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per model: (files, shift outputs) of a full-rank export of a random shift on every linear, conv and
    embedding layer of the UNet and the text encoder(s)."""
    torch.set_num_threads(1)
    made = {}
    for model_name in PIPELINES:
        folder = tmp_path_factory.mktemp(model_name.replace(" ", "_"))
        shift_path, base, shifted = shifted_pipeline(model_name, folder)
        files = {"diffusers": folder / "lora.safetensors", "kohya": folder / "kohya.safetensors"}
        result = export_lora(shift_path, components(PIPELINES[model_name]()), rank=FULL_RANK,
                             output=files["diffusers"], kohya_output=files["kohya"], svd_cache=False)
        made[model_name] = {"files": files, "base": base, "shifted": shifted, "result": result, "shift": shift_path}
    return made


def errors_of(reader, model_name, path, made):
    models, used = reader(model_name, path)
    return output_errors(models, made["base"], made["shifted"]), set(load_file(path)) - used


# --------------------------------------------------------------------------------- item 9: SDXL kohya names
@pytest.mark.slow
def test_sdxl_kohya_file_names_text_model_once_and_loads_in_diffusers(exports):
    made = exports["SDXL"]
    keys = set(load_file(made["files"]["kohya"]))
    assert not any("text_model_text_model" in k for k in keys)
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in keys
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in keys  # sd-scripts' SDXL prefix
    assert "lora_te2_text_projection.lora_down.weight" in keys  # outside text_model in the transformers layout
    assert made["result"].kohya_metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    errors, ignored = errors_of(diffusers_load, "SDXL", made["files"]["kohya"], made)
    assert not ignored
    assert errors["unet"] < CLOSE, errors
    # The kohya file has no embeddings: the text encoders keep only part of the change (see the report test).
    assert 0.05 < errors["text_encoder"] < 1 and 0.05 < errors["text_encoder_2"] < 1, errors


# ----------------------------------------------------------- items 10, 12, 14: every reader, both files
@pytest.mark.slow
@pytest.mark.parametrize("model_name", list(PIPELINES))
def test_diffusers_file_is_read_whole_by_diffusers_and_comfyui(exports, model_name):
    made = exports[model_name]
    path = made["files"]["diffusers"]
    keys = set(load_file(path))
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "text_encoder.text_model.embeddings.token_embedding.lora_embedding_A" in keys
    for reader in (diffusers_load, comfyui_load):
        errors, ignored = errors_of(reader, model_name, path, made)
        assert max(errors.values()) < CLOSE, (reader.__name__, errors)
        # Each reader skips only the other one's copy of the modules it cannot name the other way.
        skipped = {k for k in keys if k.startswith("text_encoders.")} if reader is diffusers_load else {
            k for k in keys if "lora_embedding_" in k or k.startswith("text_encoder_2.text_projection.")}
        assert ignored == skipped, (reader.__name__, sorted(ignored ^ skipped)[:4])


@pytest.mark.slow
@pytest.mark.parametrize("model_name", list(PIPELINES))
def test_kohya_file_is_read_whole_by_comfyui_and_lycoris(exports, model_name):
    made = exports[model_name]
    path = made["files"]["kohya"]
    errors, ignored = errors_of(comfyui_load, model_name, path, made)
    assert not ignored and errors["unet"] < CLOSE, errors
    errors, ignored = errors_of(lycoris_load, model_name, path, made)
    if model_name == "SDXL":
        # sd-scripts' SDXL name of the added-conditioning MLP, which a diffusers UNet (LyCORIS names modules after
        # the model it is given) has under add_embedding.
        assert ignored == {k for k in load_file(path) if k.startswith("lora_unet_label_emb_")}
    else:
        assert not ignored and errors["unet"] < CLOSE, errors
    assert all(errors[c] < 1 for c in errors if c != "unet"), errors


@pytest.mark.slow
def test_report_predicts_each_files_output_change(exports, tmp_path):
    """The export's own measurement agrees with what diffusers loads, at full rank and at rank 2 (where the
    truncation error dominates), for both files."""
    for model_name, rank in (("SD 1.5", FULL_RANK), ("SD 1.5", 2), ("SDXL", 2)):
        made = exports[model_name]
        if rank == FULL_RANK:
            files, result = made["files"], made["result"]
        else:
            files = {"diffusers": tmp_path / f"{rank}.safetensors", "kohya": tmp_path / f"{rank}-kohya.safetensors"}
            result = export_lora(made["shift"], components(PIPELINES[model_name]()), rank=rank, svd_cache=False,
                                 output=files["diffusers"], kohya_output=files["kohya"], overwrite=True)
        for file_format, path in files.items():
            errors, _ = errors_of(diffusers_load, model_name, path, made)
            for component, error in errors.items():
                predicted = 1 - result.reproduced[component][file_format]
                assert abs(predicted - error) < 1e-4 + 1e-3 * error, (model_name, rank, file_format, component)
    # Embeddings carry most of the text encoder's change here: the kohya file, which has none, keeps far less.
    scores = exports["SD 1.5"]["result"].reproduced["text_encoder"]
    assert scores["diffusers"] > 0.999 and scores["kohya"] < 0.9
    assert set(exports["SD 1.5"]["result"].kohya_skipped) == {"text_encoder.embeddings.token_embedding",
                                                              "text_encoder.embeddings.position_embedding"}


# ------------------------------------------------------------------------------- item 11: default initialisation
def test_modules_missing_from_the_file_stay_unchanged(tmp_path):
    """transformers' `load_adapter` (diffusers' text-encoder path) builds every module the metadata targets: one
    whose tensors a reader does not find must stay as it was, not get PEFT's `init_lora_weights=False` weights."""
    text_encoder = tiny_pipeline().text_encoder
    sa.add_spectral_shift(text_encoder, SpectralShiftConfig(), "a", svd_cache=False)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, layer in spectral_layers(text_encoder):
            layer.spectral_delta["a"].copy_(torch.randn(layer.shift_size, generator=generator) * 0.3)
    sa.save_spectral_shift(tmp_path / "shift.safetensors", {"text_encoder": text_encoder}, "a")
    result = export_lora(tmp_path / "shift.safetensors", {"text_encoder": tiny_pipeline().text_encoder}, rank=4,
                         svd_cache=False, probe=False)
    config = json.loads(result.metadata["lora_adapter_metadata"])
    missing = "encoder.layers.0.mlp.fc1"
    tensors = {k: v for k, v in result.state_dict.items() if f".{missing}." not in k}
    save_file(tensors, tmp_path / "missing.safetensors", metadata=result.metadata)
    config["text_encoder.target_modules"].remove(missing)  # the same LoRA without that module
    save_file(tensors, tmp_path / "without.safetensors",
              metadata={**result.metadata, "lora_adapter_metadata": json.dumps(config)})
    ids = torch.randint(3, 300, (1, 77), generator=torch.Generator().manual_seed(2))
    outputs = []
    for name in ("missing", "without"):
        pipe = tiny_pipeline()
        pipe.load_lora_weights(str(tmp_path / f"{name}.safetensors"))
        with torch.no_grad():
            outputs.append(pipe.text_encoder(ids).last_hidden_state)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6), (outputs[0] - outputs[1]).abs().max()


# ---------------------------------------------------------------------------------------------- item 13: metadata
def _unet_shift(tmp_path, base_model=None):
    unet = tiny_unet()
    sa.add_spectral_shift(unet, SpectralShiftConfig(), "a", svd_cache=False)
    with torch.no_grad():
        for _, layer in spectral_layers(unet):
            layer.spectral_delta["a"].normal_(0, 0.3)
    path = tmp_path / "shift.safetensors"
    sa.save_spectral_shift(path, {"unet": unet}, "a", base_model=base_model)
    return path


def test_metadata_names_the_hub_base_and_kohyas_fields(tmp_path):
    path = _unet_shift(tmp_path, base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    local = dataclasses.replace(load_shift_file(path), base_model="/home/someone/models/sd15")
    assert "base_model" not in export_lora(local, tiny_unet(), rank=4, svd_cache=False, probe=False).metadata
    result = export_lora(path, tiny_unet(), rank=4, output=tmp_path / "l.safetensors",
                         kohya_output=tmp_path / "k.safetensors", svd_cache=False, probe=False)
    with safe_open(tmp_path / "l.safetensors", "pt") as handle:
        assert handle.metadata()["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with safe_open(tmp_path / "k.safetensors", "pt") as handle:
        kohya = handle.metadata()
    assert {r["rank"] for r in result.layers.values()} == {4}
    assert kohya["ss_network_dim"] == "4" and kohya["ss_network_alpha"] == "4.0"
    assert kohya["ss_base_model_version"] == "sd_v1" and kohya["ss_network_module"] == "networks.lora"
    by_energy = export_lora(path, tiny_unet(), energy=0.9, svd_cache=False, probe=False)
    assert len({r["rank"] for r in by_energy.layers.values()}) > 1
    assert by_energy.kohya_metadata["ss_network_dim"] == by_energy.kohya_metadata["ss_network_alpha"] == "Dynamic"


# ----------------------------------------------------------------------------- items 15, 28: refusals
def test_wrong_base_and_one_path_for_both_files_are_refused(tmp_path, capsys):
    path = _unet_shift(tmp_path)
    other = tiny_unet()
    with torch.no_grad():
        other.conv_in.weight.mul_(1.5)
    with pytest.raises(sa.WrongBaseModelError):
        export_lora(path, other, rank=4, svd_cache=False)
    other.save_pretrained(tmp_path / "other" / "unet")
    lora = tmp_path / "lora.safetensors"
    assert main(["export-lora", str(path), "--base", str(tmp_path / "other"), "--rank", "4", "-o", str(lora)]) == 1
    assert "Wrong base model" in capsys.readouterr().err and not lora.exists()

    tiny_unet().save_pretrained(tmp_path / "base" / "unet")
    same = str(tmp_path / "sub" / ".." / "lora.safetensors")
    with pytest.raises(ToolError, match="both"):
        export_lora(path, tiny_unet(), rank=4, output=lora, kohya_output=same, svd_cache=False)
    assert main(["export-lora", str(path), "--base", str(tmp_path / "base"), "--rank", "4", "-o", str(lora),
                 "--kohya", same]) == 1
    assert "give two paths" in capsys.readouterr().err and not lora.exists()


# ------------------------------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_cli_reports_what_each_file_reproduces(tmp_path, capsys):
    pipe = tiny_pipeline()
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        sa.add_spectral_shift(model, SpectralShiftConfig(target_kinds=["linear", "conv2d", "embedding"]), "a",
                              svd_cache=False)
        with torch.no_grad():
            for _, layer in spectral_layers(model):
                layer.spectral_delta["a"].normal_(0, 0.3)
    sa.save_spectral_shift(tmp_path / "shift.safetensors", {"unet": pipe.unet, "text_encoder": pipe.text_encoder},
                           "a")
    base = tiny_pipeline()
    base.unet.save_pretrained(tmp_path / "base" / "unet")
    base.text_encoder.save_pretrained(tmp_path / "base" / "text_encoder")
    assert main(["export-lora", str(tmp_path / "shift.safetensors"), "--base", str(tmp_path / "base"), "--rank",
                 "1000", "-o", str(tmp_path / "l.safetensors"), "--kohya", str(tmp_path / "k.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "not in the kohya file text_encoder.embeddings.token_embedding" in "\n".join(lines)
    text_line = next(line for line in lines if line.startswith("text_encoder: the files reproduce"))
    assert "100.0% (diffusers file)" in text_line and "(kohya file)" in text_line
    assert any(line.startswith("unet: the files reproduce 100.0% (diffusers file), 100.0% (kohya file)")
               for line in lines)
