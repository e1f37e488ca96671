"""Tools (`svdiff_adapter.tools`) and the `svdiff` CLI on tiny models: inspect, merge, convert, export-lora, extract."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import svdiff_adapter as sa
from svdiff_adapter import SpectralShiftConfig
from svdiff_adapter.cli import SUBCOMMANDS, build_parser, main, register_subcommand
from svdiff_adapter.format import load_shift_file, save_shift_file
from svdiff_adapter.tools import (
    ToolError,
    export_lora,
    extract_shift,
    inspect_shift,
    merge_shifts,
    read_shift,
    svdiff_pytorch_to_v1,
    v1_to_svdiff_pytorch,
)
from svdiff_adapter.tuner import spectral_layers

from .tiny_models import text_inputs, tiny_unet, unet_output


FIXTURE = Path(__file__).parent / "fixtures" / "svdiff_pytorch"



def shifted_unet(seed, kinds=("linear", "conv2d", "norm"), scale=0.3, name="a", clip=True):
    """A tiny UNet with one random shift `name`; some leading values of conv_in pushed below zero (ReLU clips).

    `clip=False`: δ = scale·σ·N(0, 1) bounded below by −σ/2, so σ + δ > 0 everywhere (no clipping at all).
    """
    unet = tiny_unet()
    sa.add_spectral_shift(unet, SpectralShiftConfig(target_kinds=list(kinds)), name, svd_cache=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module_name, layer in spectral_layers(unet):
            delta = torch.randn(layer.shift_size, generator=generator) * scale
            if not clip and layer.uses_factors:
                delta = torch.maximum(delta * layer.spectral_S, -0.5 * layer.spectral_S)
            if clip and module_name == "conv_in":
                delta[:3] = -2 * layer.spectral_S[:3] - 1  # σ + δ < 0 for the 3 leading values
            layer.spectral_delta[name].copy_(delta)
    return unet


def save_shift(tmp_path, seed, file_name=None, base_model="tests/tiny-unet", **kwargs):
    unet = shifted_unet(seed, **kwargs)
    path = tmp_path / (file_name or f"shift{seed}.safetensors")
    sa.save_spectral_shift(path, {"unet": unet}, "a", base_model=base_model)
    return path, unet_output(unet)


def other_base():
    unet = tiny_unet()
    with torch.no_grad():
        unet.conv_in.weight.mul_(1.5)
    return unet


# ---------------------------------------------------------------------------------------------------- inspect
def test_inspect_reports_contents_clipping_and_base_match(tmp_path):
    path, _ = save_shift(tmp_path, 1)
    alone = inspect_shift(path)
    assert alone["format"] == "v1" and alone["format_version"] == 1 and alone["base_model"] == "tests/tiny-unet"
    assert alone["size_bytes"] == path.stat().st_size and alone["base_match"] is None
    unet_info = alone["components"]["unet"]
    assert unet_info["parameters"] == alone["parameters"] == load_shift_file(path).num_parameters
    assert set(unet_info["layers_by_kind"]) == {"linear", "conv2d", "norm"}
    assert alone["blocks"]["unet:conv_in"]["clipped"] >= 3  # the 3 forced ones are known from the fingerprint

    with_base = inspect_shift(path, base=tiny_unet(), svd_cache=False)
    assert with_base["kinds_from"] == "base model"
    exact, guessed = with_base["components"]["unet"]["layers_by_kind"], unet_info["layers_by_kind"]
    # Without a base, kinds come from names: right for norms; proj_in/proj_out 1×1 convs are counted as linear.
    assert exact["norm"] == guessed["norm"] and sum(exact.values()) == sum(guessed.values())
    assert exact["conv2d"] == guessed["conv2d"] + 8
    assert with_base["base_match"]["matches"] and with_base["base_match"]["checked"] == unet_info["layers"]
    for name, block in with_base["blocks"].items():
        bounds = alone["blocks"][name]
        assert block["clipped_exact"] and bounds["clipped"] <= block["clipped"] <= bounds["clipped_max"], name
        assert block["mean_abs_delta"] == pytest.approx(bounds["mean_abs_delta"])
    assert with_base["blocks"]["unet:conv_in"]["clipped"] >= 3

    wrong = inspect_shift(path, base={"unet": other_base()}, svd_cache=False)
    assert not wrong["base_match"]["matches"] and wrong["base_match"]["mismatched"] == ["unet.conv_in"]


def test_inspect_svdiff_pytorch_folder_against_pipeline_folder():
    report = inspect_shift(FIXTURE, base=FIXTURE / "base")
    assert report["format"] == "svdiff-pytorch" and report["format_version"] is None
    assert set(report["components"]) == {"unet", "text_encoder"}
    assert report["components"]["text_encoder"]["layers_by_kind"]["embedding"] == 2
    assert report["base_match"]["checked"] == 0 and not report["base_match"]["matches"]
    assert "no fingerprints" in report["base_match"]["reason"]
    assert "text_encoder:encoder.layers.0" in report["blocks"]


# ------------------------------------------------------------------------------------------------------ merge
def _load_pair(path_a, path_b):
    unet = tiny_unet()
    sa.load_spectral_shift({"unet": unet}, path_a, "a", svd_cache=False)
    sa.load_spectral_shift({"unet": unet}, path_b, "b", svd_cache=False)
    return unet


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, -0.7)])
def test_merge_is_exactly_set_adapters(tmp_path, weights):
    path_a, _ = save_shift(tmp_path, 1)
    path_b, _ = save_shift(tmp_path, 2)
    partial = load_shift_file(path_b)  # b lacks some modules: they count as δ = 0 there
    for name in [n for n in partial.deltas["unet"] if n.startswith("up_blocks")]:
        del partial.deltas["unet"][name]
    save_shift_file(partial, path_b)

    unet = _load_pair(path_a, path_b)
    unet.set_adapters(["a", "b"], weights=list(weights))
    expected = unet_output(unet)

    merged_path = tmp_path / "merged.safetensors"
    merge_shifts([path_a, path_b], weights, output=merged_path)
    fresh = tiny_unet()
    sa.load_spectral_shift({"unet": fresh}, merged_path, "m", svd_cache=False)
    # Bit for bit: Σ wᵢδᵢ is computed with the same float32 operations in the same order as the layer does.
    assert torch.equal(unet_output(fresh), expected)
    assert load_shift_file(merged_path).base_model == "tests/tiny-unet"


def test_merge_interpolate_and_block_selection(tmp_path):
    path_a, _ = save_shift(tmp_path, 1)
    path_b, _ = save_shift(tmp_path, 2)
    a, b = load_shift_file(path_a).deltas["unet"], load_shift_file(path_b).deltas["unet"]
    blend = merge_shifts([path_a, path_b], [3, 1], mode="interpolate").deltas["unet"]
    assert torch.allclose(blend["conv_in"], 0.75 * a["conv_in"] + 0.25 * b["conv_in"])

    mixed = merge_shifts([path_a, path_b], blocks={"A": ["down_blocks", "mid_block"], "B": ["unet.up_blocks"]})
    deltas = mixed.deltas["unet"]
    assert deltas and all(n.split(".")[0] in ("down_blocks", "mid_block", "up_blocks") for n in deltas)
    for name, delta in deltas.items():
        assert torch.equal(delta, b[name] if name.startswith("up_blocks") else a[name]), name
    assert "conv_in" not in deltas and set(mixed.fingerprints["unet"]) == set(deltas)


def test_merge_refuses_other_bases_and_bad_options(tmp_path):
    path_a, _ = save_shift(tmp_path, 1)
    path_b, _ = save_shift(tmp_path, 2, base_model="other/model")
    # Same base weights under another id (a mirror, a local copy): the fingerprints decide, and they agree.
    assert merge_shifts([path_a, path_b]).base_model is None
    shifted = shifted_unet(3)
    shifted_other = other_base()
    sa.add_spectral_shift(shifted_other, SpectralShiftConfig(target_kinds=["linear", "conv2d", "norm"]), "a",
                          svd_cache=False)
    path_c = tmp_path / "c.safetensors"
    sa.save_spectral_shift(path_c, {"unet": shifted_other}, "a")
    path_d = tmp_path / "d.safetensors"
    sa.save_spectral_shift(path_d, {"unet": shifted}, "a")
    with pytest.raises(ToolError, match="fingerprint of unet.conv_in"):
        merge_shifts([path_d, path_c])
    with pytest.raises(ToolError, match="`mode` should be one of"):
        merge_shifts([path_a, path_a], mode="multiply")
    with pytest.raises(ToolError, match="2 weight"):
        merge_shifts([path_a], [1, 2])
    with pytest.raises(ToolError, match="selects no module"):
        merge_shifts([path_a, path_a], blocks={"B": ["down_blokcs"]})
    with pytest.raises(FileNotFoundError):
        merge_shifts([path_a, tmp_path / "missing.safetensors"])
    scalar = tmp_path / "scalar.safetensors"
    unet = tiny_unet()
    sa.add_spectral_shift(unet, SpectralShiftConfig(target_kinds=["norm"], norm_mode="scalar"), "a", svd_cache=False)
    sa.save_spectral_shift(scalar, {"unet": unet}, "a", base_model="tests/tiny-unet")
    with pytest.raises(ToolError, match="norm_mode"):
        merge_shifts([path_a, scalar])


# ---------------------------------------------------------------------------------------------------- convert
def test_convert_svdiff_pytorch_to_v1_and_back(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    v1_path = tmp_path / "v1.safetensors"
    converted = svdiff_pytorch_to_v1(FIXTURE, FIXTURE / "base", v1_path, base_model="tests/fixture-base")
    loaded = load_shift_file(v1_path)
    assert loaded.source == "v1" and loaded.base_model == "tests/fixture-base"
    assert set(loaded.fingerprints) == {"unet", "text_encoder"}
    assert loaded.configs["unet"]["norm_mode"] == "scalar"
    assert all(not n.startswith("text_model.") for n in loaded.deltas["text_encoder"])
    assert converted.num_parameters == loaded.num_parameters

    # Same outputs as loading svdiff-pytorch's files directly; the fingerprints now guard the base.
    outputs = []
    for source in (read_shift(FIXTURE), v1_path):
        unet = UNet2DConditionModel.from_pretrained(FIXTURE / "base" / "unet").eval()
        text_encoder = CLIPTextModel.from_pretrained(FIXTURE / "base" / "text_encoder").eval()
        sa.load_spectral_shift({"unet": unet, "text_encoder": text_encoder}, source, svd_cache=False)
        with torch.no_grad():
            outputs.append((unet_output(unet), text_encoder(text_inputs()).last_hidden_state))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])

    back = v1_to_svdiff_pytorch(v1_path, tmp_path / "legacy")
    for component, file_name in (("unet", "spectral_shifts.safetensors"), ("text_encoder", "spectral_shifts_te.safetensors")):
        original, round_trip = load_file(FIXTURE / file_name), load_file(back[component])
        assert set(original) == set(round_trip)  # keys `<module>.delta`, `text_model.` prefix restored
        assert all(torch.equal(original[k].reshape(-1), round_trip[k]) for k in original)
        with safe_open(str(back[component]), "pt") as handle:
            assert not handle.metadata()


def test_convert_refuses_elementwise_norms_and_missing_base(tmp_path):
    path, _ = save_shift(tmp_path, 1)
    with pytest.raises(ToolError, match="cannot represent"):
        v1_to_svdiff_pytorch(path, tmp_path / "out")
    paths = v1_to_svdiff_pytorch(path, tmp_path / "out", drop_norms=True, base=tiny_unet())
    kept = load_file(paths["unet"])
    assert "conv_in.delta" in kept and "conv_norm_out.delta" not in kept
    with pytest.raises(ToolError, match="already a v1 file"):
        svdiff_pytorch_to_v1(path, tiny_unet())
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        svdiff_pytorch_to_v1(FIXTURE, tmp_path / "no-such-base")
    assert main(["convert", str(FIXTURE), "-o", str(tmp_path / "x.safetensors")]) == 1  # --base required


# ------------------------------------------------------------------------------------------------ export-lora
def test_export_lora_full_rank_reproduces_the_shift(tmp_path):
    path, expected = save_shift(tmp_path, 1)  # with norm shifts: dropped (no LoRA form) ...
    linear_path, linear_expected = save_shift(tmp_path, 5, kinds=("linear", "conv2d"))
    lora_path, kohya_path = tmp_path / "lora.safetensors", tmp_path / "kohya.safetensors"
    result = export_lora(linear_path, tiny_unet(), rank=10_000, output=lora_path, kohya_output=kohya_path,
                         svd_cache=False)
    assert result.relative_error == 0 and not result.dropped
    fresh = tiny_unet()
    fresh.load_lora_adapter(str(lora_path), prefix="unet", adapter_name="lora")
    got = unet_output(fresh)
    assert torch.allclose(got, linear_expected, rtol=1e-4, atol=1e-5), (got - linear_expected).abs().max()
    assert not torch.allclose(unet_output(tiny_unet()), linear_expected, atol=1e-3)  # the shift does something

    kohya = load_file(kohya_path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert len({float(v) for k, v in kohya.items() if k.endswith(".alpha")}) == 1  # one alpha (see _kohya_state_dict)
    assert kohya["lora_unet_conv_in.lora_down.weight"].shape[1:] == fresh.conv_in.base_layer.weight.shape[1:]
    assert kohya["lora_unet_conv_in.lora_up.weight"].shape[2:] == (1, 1)

    with_norms = export_lora(path, tiny_unet(), rank=4, svd_cache=False)
    assert "unet.conv_norm_out" in with_norms.dropped and "no LoRA form" in with_norms.dropped["unet.conv_norm_out"]


def test_exported_loras_load_with_pipe_load_lora_weights(tmp_path):
    """Both files (diffusers keys and kohya keys), UNet and text encoder, through diffusers' pipeline loader."""
    from .tiny_models import tiny_pipeline

    pipe = tiny_pipeline()
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    generator = torch.Generator().manual_seed(3)
    for model in components.values():
        sa.add_spectral_shift(model, SpectralShiftConfig(), "a", svd_cache=False)
        with torch.no_grad():
            for _, layer in spectral_layers(model):
                layer.spectral_delta["a"].copy_(torch.randn(layer.shift_size, generator=generator) * 0.3)
    ids = torch.randint(3, 300, (1, 77), generator=torch.Generator().manual_seed(2))
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))

    def outputs(p):
        with torch.no_grad():
            hidden = p.text_encoder(ids).last_hidden_state
            return hidden, p.unet(sample, torch.tensor(10), hidden[:, :7]).sample

    expected = outputs(pipe)
    sa.save_spectral_shift(tmp_path / "shift.safetensors", components, "a")
    base = tiny_pipeline()
    result = export_lora(tmp_path / "shift.safetensors", {"unet": base.unet, "text_encoder": base.text_encoder},
                         rank=1000, output=tmp_path / "lora.safetensors", kohya_output=tmp_path / "kohya.safetensors")
    assert result.relative_error == 0 and any(k.startswith("text_encoder.") for k in result.state_dict)
    for file_name in ("lora.safetensors", "kohya.safetensors"):
        fresh = tiny_pipeline()
        fresh.load_lora_weights(str(tmp_path / file_name))
        for got, want in zip(outputs(fresh), expected):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (file_name, (got - want).abs().max())


def test_export_lora_error_grows_as_rank_shrinks(tmp_path):
    path, _ = save_shift(tmp_path, 5, kinds=("linear", "conv2d"))
    errors = {r: export_lora(path, tiny_unet(), rank=r, svd_cache=False) for r in (1, 2, 4, 8, 16, 32, 128)}
    overall = [errors[r].relative_error for r in sorted(errors)]
    assert all(a > b for a, b in zip(overall, overall[1:])) and overall[-1] == 0, overall
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    per_layer = [errors[r].layers[layer]["relative_error"] for r in sorted(errors)]
    assert all(a >= b for a, b in zip(per_layer, per_layer[1:]))
    # Energy mode: per layer the smallest rank keeping 90% of ‖ΔW‖².
    by_energy = export_lora(path, tiny_unet(), energy=0.9, svd_cache=False)
    assert all(v["relative_error"] <= (0.1 ** 0.5) + 1e-6 for v in by_energy.layers.values())
    # Rank from the shapes: a rank-2 layer's up projection is (out, 2) (diffusers' attention-processor layout, which
    # ComfyUI also reads).
    up = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight"
    assert errors[2].state_dict[up].shape == (32, 2)
    with pytest.raises(ToolError, match="exactly one"):
        export_lora(path, tiny_unet(), rank=2, energy=0.9)
    with pytest.raises(ToolError, match="positive integer"):
        export_lora(path, tiny_unet(), rank=0)


# ---------------------------------------------------------------------------------------------------- extract
def _merged_copy(shifted):
    """A plain tiny UNet whose weights are the shifted ones (a 'fully fine-tuned' model)."""
    tuned = tiny_unet()
    with torch.no_grad():
        for name, layer in spectral_layers(shifted):
            tuned.get_submodule(name).weight.add_(layer.get_delta_weight("a"))
    return tuned


def test_extract_recovers_a_spectral_shift(tmp_path):
    shifted = shifted_unet(6, clip=False)  # σ + δ > 0 everywhere: no ReLU clipping
    for _, layer in spectral_layers(shifted):
        if layer.uses_factors:
            assert bool((layer.spectral_S + layer.spectral_delta["a"] > 0).all())
    tuned = _merged_copy(shifted)
    output = tmp_path / "extracted.safetensors"
    result = extract_shift(tiny_unet(), tuned, output, base_model="tests/tiny-unet", svd_cache=False)
    assert result.kept > 1 - 1e-8 and result.relative_residual < 1e-4
    truth = sa.get_spectral_shift_state_dict(shifted, "a")
    extracted = load_shift_file(output).deltas[""]
    assert set(extracted) == set(truth)
    for name, delta in truth.items():
        assert torch.allclose(extracted[name], delta, atol=1e-4), name
    fresh = tiny_unet()
    sa.load_spectral_shift(fresh, output, svd_cache=False)  # fingerprints match the base
    assert torch.allclose(unet_output(fresh), unet_output(shifted), atol=1e-5)


def test_extract_reports_what_a_random_change_loses(tmp_path):
    tuned = tiny_unet()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in tuned.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.add_(torch.randn(module.weight.shape, generator=generator) * 0.01)
    result = extract_shift(tiny_unet(), tuned, target_kinds=["linear", "conv2d"], svd_cache=False)
    assert 0 < result.kept < 0.5 and all(0 <= v["kept"] < 1 for v in result.layers.values())
    with pytest.raises(ToolError, match="nothing to extract"):
        extract_shift(tiny_unet(), tiny_unet(), svd_cache=False)
    with pytest.raises(ToolError, match="target_kinds"):
        extract_shift(tiny_unet(), tuned, target_kinds=["attention"])


# -------------------------------------------------------------------------------------------------------- CLI
def test_cli_runs_the_tools_and_reports_errors(tmp_path, capsys):
    path_a, _ = save_shift(tmp_path, 1)
    path_b, _ = save_shift(tmp_path, 2)
    assert main(["inspect", str(path_a), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["components"]["unet"]["layers"] > 0
    assert main(["inspect", str(FIXTURE)]) == 0
    assert "svdiff-pytorch" in capsys.readouterr().out

    out = tmp_path / "merged.safetensors"
    args = ["merge", str(path_a), str(path_b), "--weights", "0.5", "0.5", "--mode", "interpolate", "-o", str(out)]
    assert main(args) == 0 and out.is_file()
    assert main(args) == 1 and "exists" in capsys.readouterr().err
    assert main(["merge", str(path_a), str(path_b), "--mode", "nope", "-o", str(tmp_path / "n.safetensors")]) == 1
    assert "`mode` should be one of" in capsys.readouterr().err
    assert main(["merge", str(path_a), str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "m2")]) == 1
    assert "missing.safetensors" in capsys.readouterr().err
    assert main(["merge", str(path_a), str(path_b), "--blocks", "A:down_blocks", "B:up_blocks",
                 "-o", str(tmp_path / "mix.safetensors")]) == 0

    other = tmp_path / "other.safetensors"
    sa.save_spectral_shift(other, {"unet": sa.add_spectral_shift(other_base(), SpectralShiftConfig(), "a",
                                                                 svd_cache=False)}, "a")
    assert main(["merge", str(path_a), str(other), "-o", str(tmp_path / "bad.safetensors")]) == 1
    assert "fingerprint" in capsys.readouterr().err
    assert main(["extract", "--base", str(tmp_path / "nope"), "--tuned", str(tmp_path / "nope"), "-o",
                 str(tmp_path / "e.safetensors")]) == 1
    assert "not a local folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export-lora", str(path_a), "--base", "x", "-o", "y"])  # --rank or --energy required


def test_cli_export_and_inspect_with_base_folder(tmp_path, capsys):
    base = tmp_path / "base"
    tiny_unet().save_pretrained(base / "unet")
    path, _ = save_shift(tmp_path, 1)
    assert main(["inspect", str(path), "--base", str(base)]) == 0
    assert "MATCHES" in capsys.readouterr().out
    assert main(["inspect", str(path), "--base", str(base / "unet")]) == 0  # a single model folder works too
    capsys.readouterr()
    lora = tmp_path / "lora.safetensors"
    assert main(["export-lora", str(path), "--base", str(base), "--rank", "4", "-o", str(lora),
                 "--kohya", str(tmp_path / "k.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "overall relative error" in text and "dropped unet.conv_norm_out" in text
    other = tmp_path / "other"
    other_base().save_pretrained(other / "unet")
    assert main(["inspect", str(path), "--base", str(other)]) == 1
    assert "DOES NOT MATCH" in capsys.readouterr().out


def test_cli_subcommands_can_be_registered():
    assert {"inspect", "merge", "convert", "export-lora", "extract", "push", "pull"} <= set(SUBCOMMANDS)

    def add_train(subparsers):
        parser = subparsers.add_parser("train-test")
        parser.set_defaults(handler=lambda args: 7)
        return parser

    register_subcommand("train-test", add_train)
    try:
        assert main(["train-test"]) == 7
        with pytest.raises(ValueError, match="already registered"):
            register_subcommand("train-test", lambda subparsers: None)
    finally:
        del SUBCOMMANDS["train-test"]
    assert "train-test" not in build_parser().format_help()


# ------------------------------------------------------------------------------------------------- push / pull
def test_push_then_pull_and_inspect_a_repo(tmp_path, local_hub, hub_token, unique_repo_id):
    from svdiff_adapter.tools import pull_shift, push_shift

    pytest.importorskip("svdiff_adapter.loaders.hub")
    path, _ = save_shift(tmp_path, 1, file_name="spectral_shift_weights.safetensors")
    push_shift(path, unique_repo_id, token=hub_token)
    pulled = pull_shift(unique_repo_id, tmp_path / "pulled", cache_dir=tmp_path / "cache")
    assert [p.name for p in pulled] == ["spectral_shift_weights.safetensors"]
    assert pulled[0].read_bytes() == path.read_bytes()
    assert inspect_shift(unique_repo_id)["base_model"] == "tests/tiny-unet"  # Hub id through the Hub functions
    with pytest.raises(FileNotFoundError):
        push_shift(tmp_path / "missing.safetensors", unique_repo_id, token=hub_token)


def test_shifts_of_one_base_at_two_local_paths_merge(tmp_path):
    """Training records no local path as the base (a path means nothing elsewhere, and differs between two copies of
    one model): two shifts of the same weights merge, and the fingerprints still refuse another base."""
    first, _ = save_shift(tmp_path, 1, base_model=str(tmp_path / "copy-1"))
    second, _ = save_shift(tmp_path, 2, base_model=str(tmp_path / "elsewhere" / "copy-2"))
    assert load_shift_file(first).base_model is None and load_shift_file(second).base_model is None
    merged = merge_shifts([first, second], [0.5, 0.5])
    assert merged.base_model is None and merged.num_parameters == load_shift_file(first).num_parameters


def test_the_shipped_toyworld_shift_records_no_local_path():
    from svdiff_adapter import toyworld

    shipped = load_shift_file(toyworld.ASSETS_DIR / "shifts" / "dotted_square" / sa.DEFAULT_WEIGHT_NAME)
    assert shipped.base_model is None and not shipped.unfingerprinted()
