"""The tools on transformer (DiT) pipelines: a base read from a pipeline folder's model_index.json, inspect per DiT
block, merge, convert, extract and export-lora for Flux, SD3 and Wan 2.2 (two experts), on tiny random pipelines.

References are independent of the tools: the shift applied by the package's layers (`load_spectral_shift`), and
diffusers' own `load_lora_weights` / `load_lora_adapter` reading the exported files. Export errors are relative to
the shift's own effect, ‖out_lora − out_shift‖ / ‖out_shift − out_base‖, on each component's probe input.
"""

import json
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import svdiff_adapter as sa
from svdiff_adapter import SpectralShiftConfig
from svdiff_adapter.cli import main
from svdiff_adapter.format import load_shift_file
from svdiff_adapter.tools import (
    ToolError,
    export_lora,
    extract_shift,
    inspect_shift,
    load_base,
    merge_shifts,
    v1_to_svdiff_pytorch,
)
from svdiff_adapter.tools.lora_probe import probe_inputs
from svdiff_adapter.tuner import spectral_layers

from .tiny_models import tiny_text_encoder
from .transformer_models import FAMILIES


FULL_RANK = 10_000
CLOSE = 1e-4  # float32 round-off of a full-rank export, relative to the shift's effect



# ----------------------------------------------------------------------------------------------- tiny pipelines
def clip_with_projection(seed):
    """SD3's CLIP text encoders (with a projection), tiny."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=32)).eval()


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4)).eval()


def pipeline(family):
    """A tiny random pipeline of `tests/transformer_models.py` with tiny text encoders: Flux's CLIP, SD3's two CLIPs
    and T5. Same call → same weights."""
    pipe = FAMILIES[family].pipeline()
    if family == "flux":
        pipe.register_modules(text_encoder=tiny_text_encoder())
    elif family == "sd3":
        pipe.register_modules(text_encoder=clip_with_projection(0), text_encoder_2=clip_with_projection(1),
                              text_encoder_3=tiny_t5())
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def shift(models, seed, kinds=("linear",), scale=0.3, clip=True, name="a"):
    """A random shift `name` on every module of these kinds: δ ~ scale·N(0, 1) (`clip=False`: δ = scale·σ·N(0, 1)
    bounded below by −σ/2, so that σ + δ > 0 and nothing clips)."""
    generator = torch.Generator().manual_seed(seed)
    for model in models.values():
        sa.add_spectral_shift(model, SpectralShiftConfig(target_kinds=list(kinds)), name, svd_cache=False)
        with torch.no_grad():
            for _, layer in spectral_layers(model):
                delta = torch.randn(layer.shift_size, generator=generator) * scale
                if not clip and layer.uses_factors:
                    delta = torch.maximum(delta * layer.spectral_S, -0.5 * layer.spectral_S)
                layer.spectral_delta[name].copy_(delta)
    return models


def output(model, inputs=None):
    """The model's output on its probe input (the export's own probe input, `lora_probe.probe_inputs`)."""
    inputs = inputs or probe_inputs(model)
    with torch.no_grad():
        result = model(**inputs)
    return result.sample if hasattr(result, "sample") else result.last_hidden_state


def relative_error(got, shifted, base):
    return float((got - shifted).norm() / (shifted - base).norm())


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A Flux pipeline folder (transformer + CLIP text encoder; no VAE, no T5) and a shift of both."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("flux")
    pipeline("flux").save_pretrained(folder / "base")
    shifted = pipeline("flux")
    models = shift({"transformer": shifted.transformer, "text_encoder": shifted.text_encoder}, 1,
                   kinds=("linear", "embedding"))
    sa.save_spectral_shift(folder / "shift.safetensors", models, "a")
    return {"folder": folder, "base": folder / "base", "shift": folder / "shift.safetensors", "shifted": shifted}


# ------------------------------------------------------------------------------------------------- load_base
def test_load_base_reads_the_model_index(flux, tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    models = load_base(flux["base"])  # default: the denoisers and text encoders present (no VAE: saved as None)
    assert set(models) == {"transformer", "text_encoder"} and models.pipeline_class is FluxPipeline
    assert type(models["transformer"]) is FluxTransformer2DModel and type(models["text_encoder"]) is CLIPTextModel
    assert set(load_base(flux["base"], ["transformer"])) == {"transformer"}
    with pytest.raises(ToolError, match=r"no model for component\(s\) \['text_encoder_2'\]"):
        load_base(flux["base"], ["transformer", "text_encoder_2"])  # saved as None

    index = json.loads((flux["base"] / "model_index.json").read_text())
    for entry, message in ((["my_module", "MyTransformer"], "only model classes of diffusers and transformers"),
                           (["diffusers", "FlowMatchEulerDiscreteScheduler"], "not a ModelMixin class"),
                           (["transformers", "AutoTokenizer"], "not a PreTrainedModel class")):
        (flux["base"] / "model_index.json").write_text(json.dumps({**index, "transformer": entry}))
        try:
            with pytest.raises(ToolError, match=message):
                load_base(flux["base"], ["transformer"])
        finally:
            (flux["base"] / "model_index.json").write_text(json.dumps(index))
    assert "my_module" not in sys.modules  # nothing named by the folder was imported

    shutil.copytree(flux["base"] / "transformer", tmp_path / "bare" / "transformer")  # no model_index.json
    bare = load_base(tmp_path / "bare")
    assert set(bare) == {"transformer"} and bare.pipeline_class is None


# --------------------------------------------------------------------------------------------------- inspect
def test_inspect_reports_dit_blocks(flux, capsys):
    alone = inspect_shift(flux["shift"])
    with_base = inspect_shift(flux["shift"], base=flux["base"], svd_cache=False)
    for report in (alone, with_base):
        assert {"transformer:transformer_blocks.0", "transformer:single_transformer_blocks.0",
                "transformer:x_embedder", "transformer:context_embedder", "transformer:time_text_embed",
                "text_encoder:encoder.layers.0", "text_encoder:embeddings"} <= set(report["blocks"])
    # Names alone give the right kinds here: Flux's `*_embedder` projections are linear, CLIP's embeddings are not.
    assert alone["components"]["transformer"]["layers_by_kind"] == {"linear": 28}
    assert with_base["components"] == alone["components"]
    blocks = with_base["blocks"]["transformer:single_transformer_blocks.0"]
    assert blocks["layers"] == 6  # norm.linear, proj_mlp, proj_out, attn.to_q / to_k / to_v
    assert with_base["base_match"]["matches"]
    assert main(["inspect", str(flux["shift"]), "--base", str(flux["base"])]) == 0
    out = capsys.readouterr().out
    assert "MATCHES" in out and "transformer:single_transformer_blocks.0" in out


# ----------------------------------------------------------------------------------------------------- merge
def test_merge_of_two_transformer_shifts_is_set_adapters(flux, tmp_path):
    second = shift({"transformer": pipeline("flux").transformer}, 2)
    sa.save_spectral_shift(tmp_path / "b.safetensors", second, "a")
    transformer = pipeline("flux").transformer
    sa.load_spectral_shift({"transformer": transformer}, flux["shift"], "a", components=["transformer"],
                           svd_cache=False)
    sa.load_spectral_shift({"transformer": transformer}, tmp_path / "b.safetensors", "b", svd_cache=False)
    transformer.set_adapters(["a", "b"], weights=[0.3, -0.7])
    expected = output(transformer)

    merged = merge_shifts([flux["shift"], tmp_path / "b.safetensors"], [0.3, -0.7], output=tmp_path / "m.safetensors")
    assert set(merged.components) == {"transformer", "text_encoder"}
    fresh = pipeline("flux").transformer
    sa.load_spectral_shift({"transformer": fresh}, tmp_path / "m.safetensors", "m", components=["transformer"],
                           svd_cache=False)
    assert torch.equal(output(fresh), expected)  # bit for bit, as for UNets

    mixed = merge_shifts([flux["shift"], tmp_path / "b.safetensors"],
                         blocks={"A": ["transformer_blocks"], "B": ["transformer.single_transformer_blocks"]})
    a, b = load_shift_file(flux["shift"]).deltas["transformer"], load_shift_file(tmp_path / "b.safetensors").deltas
    for name, delta in mixed.deltas["transformer"].items():
        source = b["transformer"] if name.startswith("single_transformer_blocks") else a
        assert name.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")
        assert torch.equal(delta, source[name]), name


# --------------------------------------------------------------------------------------------------- convert
def test_convert_to_svdiff_pytorch_refuses_transformer_components(flux, tmp_path, capsys):
    with pytest.raises(ToolError, match=r"svdiff-pytorch files hold only .* this file also has \['transformer'\]"):
        v1_to_svdiff_pytorch(flux["shift"], tmp_path / "legacy")
    assert main(["convert", str(flux["shift"]), "-o", str(tmp_path / "legacy")]) == 1
    assert "svdiff-pytorch files hold only" in capsys.readouterr().err and not (tmp_path / "legacy").exists()


# --------------------------------------------------------------------------------------------------- extract
def test_extract_recovers_a_shift_of_a_fine_tuned_transformer(tmp_path):
    shifted = shift({"transformer": pipeline("flux").transformer}, 3, clip=False)["transformer"]
    tuned = pipeline("flux")  # a "fully fine-tuned" pipeline: the shifted weights written into a plain model
    with torch.no_grad():
        for name, layer in spectral_layers(shifted):
            tuned.transformer.get_submodule(name).weight.add_(layer.get_delta_weight("a"))
    tuned.save_pretrained(tmp_path / "tuned")
    pipeline("flux").save_pretrained(tmp_path / "base")

    result = extract_shift(tmp_path / "base", tmp_path / "tuned", tmp_path / "x.safetensors", svd_cache=False)
    assert result.kept > 1 - 1e-8 and result.relative_residual < 1e-4
    assert any(name.startswith("text_encoder.") for name in result.unchanged)  # compared, equal, left out
    extracted = load_shift_file(tmp_path / "x.safetensors")
    assert extracted.components == ["transformer"]
    truth = sa.get_spectral_shift_state_dict(shifted, "a")
    assert set(extracted.deltas["transformer"]) == set(truth)
    for name, delta in truth.items():
        assert torch.allclose(extracted.deltas["transformer"][name], delta, atol=1e-4), name
    fresh = pipeline("flux").transformer
    sa.load_spectral_shift({"transformer": fresh}, tmp_path / "x.safetensors", svd_cache=False)
    base = output(pipeline("flux").transformer)
    assert relative_error(output(fresh), output(shifted), base) < 1e-4

    assert main(["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--components",
                 "transformer", "-o", str(tmp_path / "cli.safetensors")]) == 0
    assert load_shift_file(tmp_path / "cli.safetensors").deltas.keys() == extracted.deltas.keys()


# ----------------------------------------------------------------------------------------------- export-lora
def test_flux_export_loads_in_diffusers(flux, tmp_path, capsys):
    path = tmp_path / "lora.safetensors"
    result = export_lora(flux["shift"], flux["base"], rank=FULL_RANK, output=path, svd_cache=False)
    keys = set(load_file(path))
    # The keys of diffusers' FluxLoraLoaderMixin.save_lora_weights: PEFT names under `transformer.`, never
    # `processor` (Flux's loader would take the file for an XLabs one).
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.single_transformer_blocks.0.proj_out.lora_B.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "text_encoder.text_model.embeddings.token_embedding.lora_embedding_A" in keys
    assert not any("processor" in k or k.startswith("text_encoders.") for k in keys)
    with safe_open(path, "pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert config["transformer.lora_alpha"] == config["transformer.r"] and "text_encoder.target_modules" in config

    base, shifted = pipeline("flux"), flux["shifted"]
    ids = probe_inputs(base.text_encoder)
    references = {"transformer": (output(shifted.transformer), output(base.transformer)),
                  "text_encoder": (output(shifted.text_encoder, ids), output(base.text_encoder, ids))}
    loaded = pipeline("flux")
    loaded.load_lora_weights(str(path), adapter_name="exported")
    errors = {"transformer": relative_error(output(loaded.transformer), *references["transformer"]),
              "text_encoder": relative_error(output(loaded.text_encoder, ids), *references["text_encoder"])}
    assert max(errors.values()) < CLOSE, errors
    for component, error in errors.items():  # the export's own measurement agrees with what diffusers loads
        assert abs((1 - result.reproduced[component]["diffusers"]) - error) < 1e-5, (component, error)
    model_level = pipeline("flux").transformer
    model_level.load_lora_adapter(str(path), prefix="transformer", adapter_name="exported")
    assert relative_error(output(model_level), *references["transformer"]) < CLOSE

    assert main(["export-lora", str(flux["shift"]), "--base", str(flux["base"]), "--rank", "4",
                 "-o", str(tmp_path / "r4.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("transformer: the files reproduce") and "(diffusers file)" in line for line in lines)


def test_kohya_is_refused_for_transformer_pipelines(flux, tmp_path, capsys):
    lora, kohya = tmp_path / "lora.safetensors", tmp_path / "kohya.safetensors"
    with pytest.raises(ToolError, match="Stable Diffusion 1/2 and SDXL only"):
        export_lora(flux["shift"], flux["base"], rank=4, output=lora, kohya_output=kohya, svd_cache=False)
    assert main(["export-lora", str(flux["shift"]), "--base", str(flux["base"]), "--rank", "4", "-o", str(lora),
                 "--kohya", str(kohya)]) == 1
    assert "double_blocks" in capsys.readouterr().err
    assert not lora.exists() and not kohya.exists()
    # A dict base without a pipeline class: the transformer component alone says it is not Stable Diffusion.
    with pytest.raises(ToolError, match="Stable Diffusion 1/2 and SDXL only"):
        export_lora(flux["shift"], {"transformer": pipeline("flux").transformer, "text_encoder": tiny_text_encoder()},
                    rank=4, kohya_output=kohya, svd_cache=False)


def test_sd3_export_loads_in_diffusers_and_leaves_out_t5(tmp_path):
    pipeline("sd3").save_pretrained(tmp_path / "base")
    shifted = pipeline("sd3")
    names = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    shift({name: getattr(shifted, name) for name in names}, 4, kinds=("linear", "conv2d"))
    sa.save_spectral_shift(tmp_path / "shift.safetensors", {name: getattr(shifted, name) for name in names}, "a")

    path = tmp_path / "lora.safetensors"
    result = export_lora(tmp_path / "shift.safetensors", tmp_path / "base", rank=FULL_RANK, output=path,
                         svd_cache=False)
    # StableDiffusion3Pipeline's loader reads transformer and the two CLIPs; T5 is reported, not written.
    t5 = {k: v for k, v in result.dropped.items() if k.startswith("text_encoder_3.")}
    assert t5 and all("StableDiffusion3Pipeline.load_lora_weights reads LoRAs of" in v for v in t5.values())
    assert set(result.reproduced) == {"transformer", "text_encoder", "text_encoder_2"}
    keys = set(load_file(path))
    assert "transformer.pos_embed.proj.lora_A.weight" in keys  # the patch-embedding conv: a conv LoRA
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_B.weight" in keys
    assert "text_encoder_2.text_projection.lora_A.weight" in keys
    assert not any(k.startswith("text_encoder_3.") for k in keys)

    base = pipeline("sd3")
    loaded = pipeline("sd3")
    loaded.load_lora_weights(str(path), adapter_name="exported")
    errors = {}
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        inputs = probe_inputs(getattr(base, name))
        references = output(getattr(shifted, name), inputs), output(getattr(base, name), inputs)
        errors[name] = relative_error(output(getattr(loaded, name), inputs), *references)
        assert abs((1 - result.reproduced[name]["diffusers"]) - errors[name]) < 1e-5, (name, errors[name])
    assert max(errors.values()) < CLOSE, errors
    assert torch.equal(output(loaded.text_encoder_3), output(base.text_encoder_3))  # nothing loaded there


def test_wan_second_expert_gets_its_own_file(tmp_path):
    """Wan 2.2: diffusers reads only `transformer.` keys and puts them into `transformer_2` with
    `load_into_transformer_2=True`; the export writes one file per expert, as Wan 2.2 LoRAs ship."""
    pipeline("wan").save_pretrained(tmp_path / "base")
    shifted = pipeline("wan")
    models = shift({"transformer": shifted.transformer, "transformer_2": shifted.transformer_2}, 5)
    sa.save_spectral_shift(tmp_path / "shift.safetensors", models, "a")
    path = tmp_path / "lora.safetensors"
    result = export_lora(tmp_path / "shift.safetensors", tmp_path / "base", rank=FULL_RANK, output=path,
                         svd_cache=False)
    second = tmp_path / "lora_transformer_2.safetensors"
    assert result.paths == {"diffusers": path, "diffusers transformer_2": second}
    for file in (path, second):  # both keyed `transformer.`, as WanLoraLoaderMixin.save_lora_weights writes
        assert all(k.startswith("transformer.") for k in load_file(file)), sorted(load_file(file))[:3]
        assert "transformer.blocks.1.ffn.net.0.proj.lora_A.weight" in load_file(file)
    with pytest.raises(ToolError, match="exists"):
        export_lora(tmp_path / "shift.safetensors", tmp_path / "base", rank=2, output=path, svd_cache=False)

    base = pipeline("wan")
    loaded = pipeline("wan")
    loaded.load_lora_weights(str(path), adapter_name="high")
    loaded.load_lora_weights(str(second), adapter_name="low", load_into_transformer_2=True)
    for name in ("transformer", "transformer_2"):
        error = relative_error(output(getattr(loaded, name)), output(getattr(shifted, name)),
                               output(getattr(base, name)))
        assert error < CLOSE and abs((1 - result.reproduced[name]["diffusers"]) - error) < 1e-5, (name, error)
