"""Pipeline methods (`SpectralShiftLoaderMixin`) on a tiny random-weight Stable Diffusion pipeline.

References are computed here by hand from `torch.linalg.svd` in float64: W' = U·diag(ReLU(σ + Σᵢ wᵢδᵢ))·Vᵀ.
"""

import copy

import diffusers
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import svdiff_adapter as sa
from svdiff_adapter import SpectralShiftFormatError
from svdiff_adapter.loaders.hub import SpectralShiftNotFoundError
from svdiff_adapter.tuner.layer import find_spectral_layer

from .tiny_models import assert_unchanged, state_snapshot, tiny_pipeline, unet_inputs

UNET_MODULES = [
    "conv_in",
    "time_embedding.linear_1",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.resnets.0.conv1",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.0.resnets.1.conv2",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_v",
]
TEXT_MODULES = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def prototype():
    return tiny_pipeline(sa.StableDiffusionPipeline)


@pytest.fixture
def pipe(prototype):
    return copy.deepcopy(prototype)


def _sigma(module):
    weight = module.weight.detach().double()
    return torch.linalg.svd(weight.reshape(weight.shape[0], -1), full_matrices=False).S


def _make_deltas(pipe, seed):
    """δ = -0.7·σ·u with u ∈ [0.5, 1.5): two such shifts summed clip most singular values at 0 in the ReLU."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for component, names in (("unet", UNET_MODULES), ("text_encoder", TEXT_MODULES)):
        model = getattr(pipe, component)
        deltas[component] = {}
        for name in names:
            sigma = _sigma(model.get_submodule(name))
            deltas[component][name] = (-0.7 * sigma * (0.5 + torch.rand(sigma.shape, generator=generator))).float()
    return deltas


@pytest.fixture(scope="module")
def shifts(prototype, tmp_path_factory):
    """Two shift files A and B (format v1 with fingerprints, unet + text_encoder) and their δ."""
    folder = tmp_path_factory.mktemp("shifts")
    result = {"dir": folder}
    for label, seed in (("A", 1), ("B", 2)):
        deltas = _make_deltas(prototype, seed)
        maker = copy.deepcopy(prototype)
        maker.load_spectral_shift(deltas, label)
        path = maker.save_spectral_shift(folder / label, label)
        result[label] = {"deltas": deltas, "file": path}
    return result


@pytest.fixture(scope="module")
def lora_dir(prototype, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    unet = copy.deepcopy(prototype.unet)
    torch.manual_seed(5)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False))
    state = diffusers.utils.convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    diffusers.StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state)
    return folder


# ----------------------------------------------------------------------------------------- references
def reference(prototype, terms):
    """A copy of the base pipeline whose weights are set by hand: terms = [(weight or {component: w}, deltas)]."""
    ref = copy.deepcopy(prototype)
    for component in ("unet", "text_encoder"):
        model = getattr(ref, component)
        for name in set().union(*(d[component] for _, d in terms)):
            module = model.get_submodule(name)
            weight = module.weight.detach().double()
            U, S, Vh = torch.linalg.svd(weight.reshape(weight.shape[0], -1), full_matrices=False)
            shift = torch.zeros_like(S)
            for w, deltas in terms:
                w = w(component, name) if callable(w) else w
                if name in deltas[component]:
                    shift += w * deltas[component][name].double()
            module.weight.data = ((U * torch.relu(S + shift)) @ Vh).reshape(weight.shape).float()
    return ref


def outputs(pipe):
    """UNet output (8×8 latents) and text-encoder output (2 prompts of 77 random tokens) for fixed inputs."""
    sample, timestep, hidden = unet_inputs()
    tokens = torch.randint(3, 300, (2, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return pipe.unet(sample, timestep, hidden).sample, pipe.text_encoder(tokens)[0]


def assert_close(got, expected, rtol=1.5e-2):
    # Default tolerance: the library keeps U and Vᵀ in float16 (docs/api.md); with changes as large as σ here that
    # gives ~0.6% relative error on outputs, while the alternatives tested against differ by > 10%.
    for g, e in zip(got, expected):
        error = (g - e).abs().max() / e.abs().max()
        assert error < rtol, f"relative error {error:.2e}"


def assert_differs(got, expected, rtol=1e-1):
    assert any(((g - e).abs().max() / e.abs().max()) > rtol for g, e in zip(got, expected))


def snapshots(pipe):
    return [state_snapshot(pipe.unet), state_snapshot(pipe.text_encoder)]


def assert_pipe_unchanged(pipe, snaps):
    assert_unchanged(pipe.unet, snaps[0])
    assert_unchanged(pipe.text_encoder, snaps[1])


# --------------------------------------------------------------------------------------------- loading
def test_load_file_folder_and_state_dict_match_the_hand_reference(prototype, shifts, pipe):
    expected = outputs(reference(prototype, [(1.0, shifts["A"]["deltas"])]))
    assert pipe.load_spectral_shift(shifts["A"]["file"]) == "default_0"
    assert_close(outputs(pipe), expected)

    from_folder = copy.deepcopy(prototype)
    assert from_folder.load_spectral_shift(shifts["dir"] / "A", "x") == "x"
    from_dict = copy.deepcopy(prototype)
    state = load_file(shifts["A"]["file"])
    assert all(k.startswith(("unet.", "text_encoder.")) and "lora" not in k for k in state)
    from_dict.load_spectral_shift(state, "y")
    for other in (from_folder, from_dict):
        for got, want in zip(outputs(other), outputs(pipe)):
            assert torch.equal(got, want)


def test_default_names_never_collide(shifts, lora_dir, pipe):
    pipe.load_spectral_shift(shifts["A"]["file"], "default_1")
    assert pipe.load_spectral_shift(shifts["B"]["file"]) == "default_0"
    pipe.load_lora_weights(lora_dir)  # diffusers' own naming would crash on spectral layers (`len(module.r)`)
    assert set(pipe.get_list_adapters()["unet"]) == {"default_0", "default_1", "default_2"}
    assert pipe.load_spectral_shift(shifts["A"]["file"]) == "default_3"


def test_svdiff_pytorch_two_files_from_a_folder(prototype, shifts, pipe, tmp_path):
    deltas = shifts["A"]["deltas"]
    save_file({f"{k}.delta": v for k, v in deltas["unet"].items()}, tmp_path / "spectral_shifts.safetensors")
    save_file({f"text_model.{k}.delta": v for k, v in deltas["text_encoder"].items()},
              tmp_path / "spectral_shifts_te.safetensors")
    pipe.load_spectral_shift(tmp_path, "legacy")
    assert pipe.get_list_adapters() == {"unet": ["legacy"], "text_encoder": ["legacy"]}
    assert_close(outputs(pipe), outputs(reference(prototype, [(1.0, deltas)])))


# ---------------------------------------------------------------------------------------- composition
def test_weights_combine_inside_the_relu(prototype, shifts, pipe):
    pipe.load_spectral_shift(shifts["A"]["file"], "A")
    pipe.load_spectral_shift(shifts["B"]["file"], "B")
    assert pipe.get_active_adapters() == ["B"]  # like two LoRAs: the last loaded is active

    single = copy.deepcopy(prototype)
    single.load_spectral_shift(shifts["A"]["file"], "A")
    pipe.set_adapters(["A", "B"], weights=[1.0, 0.0])  # a = 1
    for got, want in zip(outputs(pipe), outputs(single)):
        assert torch.equal(got, want)

    a, b = shifts["A"]["deltas"], shifts["B"]["deltas"]
    pipe.set_adapters(["A", "B"], adapter_weights=[1.0, 1.0])  # diffusers' keyword
    added = outputs(pipe)
    assert_close(added, outputs(reference(prototype, [(1.0, a), (1.0, b)])))
    # The sum of the two separate changes (outside the ReLU) is a different model.
    outside = reference(prototype, [(1.0, a)])
    for component in ("unet", "text_encoder"):
        base, only_b = getattr(prototype, component), getattr(reference(prototype, [(1.0, b)]), component)
        for name in b[component]:
            change = only_b.get_submodule(name).weight.data - base.get_submodule(name).weight.data
            getattr(outside, component).get_submodule(name).weight.data += change
    assert_differs(added, outputs(outside))

    pipe.set_adapters(["A", "B"], weights=[0.25, 0.75])
    assert_close(outputs(pipe), outputs(reference(prototype, [(0.25, a), (0.75, b)])))
    assert pipe.get_active_adapters() == ["A", "B"]


def test_switch_cache_rebuilds_linearly_and_matches_the_relu_reference(prototype, shifts, pipe):
    pipe.load_spectral_shift(shifts["A"]["file"], "A")
    pipe.load_spectral_shift(shifts["B"]["file"], "B")
    direct = copy.deepcopy(pipe)
    pipe.enable_spectral_switch_cache()
    a, b = shifts["A"]["deltas"], shifts["B"]["deltas"]
    # (1, 1) clips most singular values (see _make_deltas), so the clip correction is exercised.
    for weights in ([1.0, 1.0], [0.25, 0.75], [1.0, 0.0]):
        pipe.set_adapters(["A", "B"], weights=weights)
        direct.set_adapters(["A", "B"], weights=weights)
        got = outputs(pipe)
        assert_close(got, outputs(reference(prototype, [(weights[0], a), (weights[1], b)])))
        assert_close(got, outputs(direct), rtol=1e-5)  # same maths, different float rounding
    layer = pipe.unet.get_submodule(UNET_MODULES[3])
    assert set(layer.spectral_cache.adapter_matrices) == {"A", "B"}  # the memory it costs: one matrix per adapter

    # A hotswap changes δ in place: the cached matrix follows.
    pipe.load_spectral_shift(shifts["A"]["file"], "B", hotswap=True)
    pipe.set_adapters(["A", "B"], weights=[0.5, 0.5])
    assert_close(outputs(pipe), outputs(reference(prototype, [(1.0, a)])))

    pipe.delete_adapters("B")
    assert set(layer.spectral_cache.adapter_matrices) == {"A"}
    pipe.disable_spectral_switch_cache()
    assert not layer.spectral_cache.adapter_matrices and not layer.spectral_cache.switch_enabled


def test_per_component_and_per_block_weights(prototype, shifts, pipe):
    pipe.load_spectral_shift(shifts["A"]["file"], "A")
    blocks = {"down": 0.0, "mid": 0.5, "up": {"block_0": [0.0, 2.0]}}
    pipe.set_adapters("A", {"unet": blocks, "text_encoder": 0.0})

    def expected_weight(component, name):
        if component == "text_encoder":
            return 0.0
        if name.startswith("down_blocks"):
            return 0.0
        if name.startswith("mid_block"):
            return 0.5
        if name.startswith("up_blocks.0.resnets."):
            return [0.0, 2.0][int(name.split(".")[3])]
        return 1.0  # conv_in, time_embedding.linear_1 (diffusers' own code raises IndexError on such names)

    assert_close(outputs(pipe), outputs(reference(prototype, [(expected_weight, shifts["A"]["deltas"])])))
    _, text = outputs(pipe)
    assert torch.equal(text, outputs(prototype)[1])


def test_set_adapters_bad_input_leaves_pipeline_unchanged(shifts, pipe):
    pipe.load_spectral_shift(shifts["A"]["file"], "A")
    pipe.load_spectral_shift(shifts["B"]["file"], "B")
    pipe.set_adapters(["A", "B"], weights=[0.3, 0.6])
    before = outputs(pipe)
    bad_calls = [
        (["A", "nope"], None, "Unknown adapter"),
        (["A", "B"], [1.0], "2 adapter name"),
        (["A", "B"], [1.0, 2.0, 3.0], "2 adapter name"),
        (["A"], [{"down": 1.0}], "keys are components"),
        (["A"], [{"unet": {"down": {"block_7": 1.0}}}], "block_7"),
        (["A"], [{"unet": {"up": {"block_0": [1.0, 2.0, 3.0]}}}], "2 layer"),
        (["A"], [{"text_encoder": {"down": 1.0}}], "only a UNet"),
        (["A"], ["high"], "should be a number"),
        (["A"], [float("nan")], "finite number"),
        (["A", "B"], [1.0, -float("inf")], "finite number"),
        (["A"], [{"unet": {"mid": float("nan")}}], "finite number"),
        (["A"], [{"unet": {"up": {"block_1": [1.0, float("inf")]}}}], "finite number"),
        (["A"], [{"text_encoder": float("nan")}], "finite number"),
    ]
    for names, weights, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            pipe.set_adapters(names, weights=weights)
    with pytest.raises(ValueError, match="not both"):
        pipe.set_adapters(["A"], adapter_weights=[1.0], weights=[1.0])
    assert pipe.get_active_adapters() == ["A", "B"]
    for got, want in zip(outputs(pipe), before):
        assert torch.equal(got, want)


def test_disable_enable_delete_and_cross_attention_scale(prototype, shifts, pipe):
    base = outputs(prototype)
    pipe.load_spectral_shift(shifts["A"]["file"], "A")
    shifted = outputs(pipe)
    pipe.disable_lora()
    for got, want in zip(outputs(pipe), base):
        assert torch.equal(got, want)
    pipe.enable_lora()
    for got, want in zip(outputs(pipe), shifted):
        assert torch.equal(got, want)

    def image(p, **kwargs):
        return p("a dog", num_inference_steps=1, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0), **kwargs).images

    # scale 0 multiplies every wᵢ by 0: the base model (UNet and text encoder)
    assert torch.allclose(image(pipe, cross_attention_kwargs={"scale": 0.0}), image(prototype), atol=1e-5)
    for got, want in zip(outputs(pipe), shifted):  # scale undone after the call
        assert torch.allclose(got, want, atol=1e-6)

    pipe.delete_adapters("A")
    assert pipe.get_list_adapters() == {"unet": [], "text_encoder": []}
    assert_unchanged(pipe.unet, state_snapshot(prototype.unet))


# ------------------------------------------------------------------------------ save / fuse / unload
def test_save_round_trip(prototype, shifts, pipe, tmp_path):
    pipe.load_spectral_shift(shifts["A"]["file"], "A")
    path = pipe.save_spectral_shift(tmp_path, dtype=torch.float16)
    assert path == tmp_path / sa.DEFAULT_WEIGHT_NAME
    fresh = copy.deepcopy(prototype)
    fresh.load_spectral_shift(tmp_path, "A")
    assert_close(outputs(fresh), outputs(pipe), rtol=2e-3)
    pipe.load_spectral_shift(shifts["B"]["file"], "B")
    with pytest.raises(ValueError, match="Pass `adapter_name`"):
        pipe.save_spectral_shift(tmp_path)


def test_fuse_unfuse_and_unload_are_exact(prototype, shifts, pipe):
    with pytest.raises(ValueError, match="Nothing to fuse"):
        pipe.fuse_spectral_shift()
    base = snapshots(prototype)
    pipe.load_spectral_shift(shifts["A"]["file"], "A")
    loaded = snapshots(pipe)
    unfused = outputs(pipe)
    pipe.fuse_spectral_shift()
    assert pipe.fused_loras == {"A"}
    assert not torch.equal(pipe.unet.conv_in.base_layer.weight, prototype.unet.conv_in.weight)
    assert_close(outputs(pipe), unfused, rtol=1e-5)
    pipe.unfuse_spectral_shift()
    assert_pipe_unchanged(pipe, loaded)
    pipe.fuse_spectral_shift(components=["unet"])
    with pytest.raises(ValueError, match="Unknown component"):
        pipe.fuse_spectral_shift(components=["vae"])
    with pytest.raises(ValueError, match="Unknown spectral"):
        pipe.unload_spectral_shift("nope")
    pipe.unload_spectral_shift()  # unfuses first
    assert_pipe_unchanged(pipe, base)
    assert pipe.fused_loras == set()


# ------------------------------------------------------------------------------------- LoRA alongside
def test_lora_and_spectral_shift_coexist(prototype, shifts, lora_dir, pipe):
    only_lora = copy.deepcopy(prototype)
    only_lora.load_lora_weights(lora_dir, adapter_name="L")
    only_shift = copy.deepcopy(prototype)
    only_shift.load_spectral_shift(shifts["A"]["file"], "A")

    pipe.load_spectral_shift(shifts["A"]["file"], "A")
    pipe.load_lora_weights(lora_dir, adapter_name="L")
    assert pipe.get_active_adapters() == ["A", "L"]  # loading a LoRA keeps the spectral shift active
    both = outputs(pipe)
    assert_differs(both, outputs(only_lora), rtol=1e-3)
    assert_differs(both, outputs(only_shift), rtol=1e-3)
    pipe.set_adapters(["A", "L"], weights=[0.0, 1.0])
    assert_close(outputs(pipe), outputs(only_lora), rtol=1e-5)
    pipe.set_adapters(["A", "L"], weights=[1.0, 0.0])
    assert_close(outputs(pipe), outputs(only_shift), rtol=1e-5)
    pipe.set_adapters(["A", "L"])

    # a spectral shift saved while a LoRA wraps its modules has the plain module names
    saved = pipe.save_spectral_shift(shifts["dir"] / "with_lora", "A")
    assert not [k for k in load_file(saved) if "base_layer" in k]

    pipe.set_lora_device(["L", "A"], "cpu")  # diffusers' version reads `lora_A` on every tuner layer
    pipe.unload_lora_weights()  # removes only the LoRA
    assert pipe.get_list_adapters()["unet"] == ["A"]
    for got, want in zip(outputs(pipe), outputs(only_shift)):
        assert torch.equal(got, want)

    pipe.load_lora_weights(lora_dir, adapter_name="L")
    pipe.unload_spectral_shift()  # removes only the shift
    assert pipe.get_list_adapters()["unet"] == ["L"]
    assert pipe.get_active_adapters() == ["L"]
    assert_close(outputs(pipe), outputs(only_lora), rtol=1e-6)


# ------------------------------------------------------------------------------------------ hotswap
def test_hotswap_copies_in_place(prototype, shifts, pipe):
    pipe.load_spectral_shift(shifts["A"]["file"], "x")
    pipe.set_adapters("x", weights=0.5)
    parameters = {id(p) for n, p in pipe.unet.named_parameters() if "spectral_delta" in n}
    assert pipe.load_spectral_shift(shifts["B"]["file"], "x", hotswap=True) == "x"
    assert parameters == {id(p) for n, p in pipe.unet.named_parameters() if "spectral_delta" in n}
    expected = copy.deepcopy(prototype)
    expected.load_spectral_shift(shifts["B"]["file"], "x")
    expected.set_adapters("x", weights=0.5)  # the weight survives the swap
    for got, want in zip(outputs(pipe), outputs(expected)):
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_and_leaves_the_pipeline_unchanged(shifts, lora_dir, pipe, tmp_path):
    pipe.load_spectral_shift(shifts["A"]["file"], "A")
    snaps, adapters = snapshots(pipe), pipe.get_list_adapters()

    other_base = tiny_pipeline(sa.StableDiffusionPipeline, seed=1)
    other_snaps = snapshots(other_base)
    with pytest.raises(SpectralShiftFormatError, match="fingerprint"):
        other_base.load_spectral_shift(shifts["A"]["file"])
    assert_pipe_unchanged(other_base, other_snaps)

    with pytest.raises(SpectralShiftFormatError, match="load_lora_weights"):
        pipe.load_spectral_shift(load_file(lora_dir / "pytorch_lora_weights.safetensors"))
    with pytest.raises(SpectralShiftNotFoundError, match="load_lora_weights"):
        pipe.load_spectral_shift(lora_dir)
    with pytest.raises(SpectralShiftNotFoundError, match="No spectral-shift file"):
        pipe.load_spectral_shift(tmp_path)
    with pytest.raises(SpectralShiftNotFoundError, match="No such file"):
        pipe.load_spectral_shift(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="already in use"):
        pipe.load_spectral_shift(shifts["B"]["file"], "A")
    with pytest.raises(ValueError, match="no spectral shift of that name"):
        pipe.load_spectral_shift(shifts["B"]["file"], "missing", hotswap=True)
    shorter = {c: {m: d[: d.numel() // 2] for m, d in mods.items()} for c, mods in shifts["B"]["deltas"].items()}
    with pytest.raises(ValueError, match="shape"):
        pipe.load_spectral_shift(shorter, "A", hotswap=True)
    other_modules = {"unet": {"conv_out": torch.zeros(4)}}
    with pytest.raises(ValueError, match="not shifted by"):
        pipe.load_spectral_shift(other_modules, "A", hotswap=True)
    nan = {c: {m: torch.full_like(d, float("nan")) for m, d in mods.items()} for c, mods in shifts["B"]["deltas"].items()}
    with pytest.raises(SpectralShiftFormatError, match="NaN or inf"):
        pipe.load_spectral_shift(nan, "A", hotswap=True)
    with pytest.raises(SpectralShiftFormatError, match="holds a list, not a tensor"):
        pipe.load_spectral_shift({"unet.conv_in.spectral_delta": [0.0] * 4})
    with pytest.raises(SpectralShiftFormatError, match="dtype torch.int64"):
        pipe.load_spectral_shift({"unet.conv_in.spectral_delta": torch.zeros(4, dtype=torch.int64)})
    with pytest.raises(SpectralShiftNotFoundError, match="Give a file, a folder or a Hub repo id"):
        pipe.load_spectral_shift("")
    for name in ["", "a.b", "to", "__class__", "keys", 3]:
        with pytest.raises(ValueError, match="Invalid adapter name"):
            pipe.load_spectral_shift(shifts["B"]["file"], name)
    with pytest.raises(ValueError, match="load it with `pipe.load_spectral_shift"):
        pipe.load_lora_weights(shifts["B"]["file"])
    with pytest.raises(ValueError, match="load it with `pipe.load_spectral_shift"):
        pipe.load_lora_weights(shifts["B"]["file"].parent)
    with pytest.raises(ValueError, match="load it with `pipe.load_spectral_shift"):
        pipe.load_lora_weights({f"unet.{m}.spectral_delta": d for m, d in shifts["B"]["deltas"]["unet"].items()})
    assert_pipe_unchanged(pipe, snaps)
    assert pipe.get_list_adapters() == adapters


def test_loading_after_a_fuse_keeps_the_fused_shift_fused_and_adds_on_top(prototype, shifts, pipe):
    """The new shift joins the fused one inside the ReLU; `fused_loras` (diffusers' view) stays truthful."""
    pipe.load_spectral_shift(shifts["A"]["file"], "A")
    pipe.fuse_spectral_shift()
    fused_weights = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "base_layer.weight" in n}
    assert pipe.fused_loras == {"A"}
    pipe.load_spectral_shift(shifts["B"]["file"], "B")
    assert pipe.fused_loras == {"A"}
    for name, parameter in pipe.unet.named_parameters():
        if name in fused_weights:
            assert torch.equal(parameter, fused_weights[name]), name  # still fused, untouched
    assert pipe.get_active_adapters() == ["B"]
    both = outputs(pipe)
    reference = copy.deepcopy(prototype)
    reference.load_spectral_shift(shifts["A"]["file"], "A")
    reference.load_spectral_shift(shifts["B"]["file"], "B")
    reference.set_adapters(["A", "B"])
    for got, want in zip(both, outputs(reference)):
        assert torch.allclose(got, want, atol=1e-5)
    pipe.unload_spectral_shift()
    assert pipe.fused_loras == set()
    for got, want in zip(outputs(pipe), outputs(prototype)):
        assert torch.equal(got, want)


def test_safe_fusing_refuses_an_overflowing_fuse_with_nothing_fused(prototype, pipe):
    """A float16 weight can overflow when a shift grows a singular value; safe_fusing finds it before writing."""
    pipe.unet.to(torch.float16)
    name = UNET_MODULES[2]
    sigma = _sigma(pipe.unet.get_submodule(name))
    pipe.load_spectral_shift({"unet": {name: torch.full((sigma.numel(),), 1e6)}}, "big")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    with pytest.raises(ValueError, match="nothing was fused"):
        pipe.fuse_spectral_shift(safe_fusing=True)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())
    assert pipe.fused_loras == set()


def test_lora_file_path_is_named_a_lora(lora_dir, pipe):
    with pytest.raises(SpectralShiftFormatError, match="load_lora_weights"):
        pipe.load_spectral_shift(lora_dir / "pytorch_lora_weights.safetensors")


def test_patch_diffusers_reaches_existing_instances(shifts):
    plain = tiny_pipeline(diffusers.StableDiffusionImg2ImgPipeline)  # built before patching
    assert not hasattr(plain, "load_spectral_shift")
    patched = sa.patch_diffusers()
    assert diffusers.StableDiffusionPipeline in patched and diffusers.StableDiffusionImg2ImgPipeline in patched
    assert sa.patch_diffusers() == []  # idempotent
    assert plain.load_spectral_shift(shifts["A"]["file"]) == "default_0"
    plain.set_adapters(["default_0"], weights=[0.5])
    # drop-in subclasses still resolve diffusers' methods through the patched classes
    dropin = tiny_pipeline(sa.StableDiffusionPipeline)
    dropin.load_spectral_shift(shifts["A"]["file"], "A")
    dropin.delete_adapters("A")
    assert dropin.get_list_adapters() == {"unet": [], "text_encoder": []}


def test_hotswap_does_not_recompile_a_compiled_unet(prototype, shifts, pipe):
    """torch.compile with a counting backend (dynamo only; no inductor codegen, to stay fast on a CPU)."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    pipe.load_spectral_shift(shifts["A"]["file"], "x")
    torch._dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, backend=counting_backend)
    sample, timestep, hidden = unet_inputs()
    with torch.no_grad():
        pipe.unet(sample, timestep, hidden)
    compiled = len(graphs)
    pipe.load_spectral_shift(shifts["B"]["file"], "x", hotswap=True)
    with torch.no_grad():
        swapped = pipe.unet(sample, timestep, hidden).sample
    assert len(graphs) == compiled  # no recompilation
    expected = copy.deepcopy(prototype)
    expected.load_spectral_shift(shifts["B"]["file"], "x")
    assert torch.equal(swapped, outputs(expected)[0])
    torch._dynamo.reset()


def test_sdxl_pipeline_loads_composes_fuses_and_saves_all_three_components(tmp_path):
    """The same loader on SDXL: UNet, text_encoder and text_encoder_2 shifts, weights inside the ReLU, exact fuse
    round trip, save → load round trip, and a full pipeline call with SDXL's added conditioning."""
    from .tiny_models import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(sa.StableDiffusionXLPipeline)
    base = copy.deepcopy(pipe)
    modules = {"unet": "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
               "text_encoder": "encoder.layers.0.self_attn.q_proj",
               "text_encoder_2": "text_model.encoder.layers.1.mlp.fc1"}
    deltas = {}
    for label, seed in (("A", 1), ("B", 2)):
        generator = torch.Generator().manual_seed(seed)
        deltas[label] = {}
        for component, name in modules.items():
            sigma = _sigma(getattr(pipe, component).get_submodule(name))
            deltas[label][component] = {name: (-0.7 * sigma * (0.5 + torch.rand(sigma.shape, generator=generator))).float()}
        pipe.load_spectral_shift(deltas[label], label)
    pipe.set_adapters(["A", "B"], weights=[0.25, 0.75])
    for component, name in modules.items():
        module = getattr(base, component).get_submodule(name)
        weight = module.weight.detach().double()
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        shift = 0.25 * deltas["A"][component][name].double() + 0.75 * deltas["B"][component][name].double()
        expected = ((U * torch.relu(S + shift)) @ Vh).float()
        got = sa.tuner.layer.find_spectral_layer(getattr(pipe, component).get_submodule(name)).effective_weight()
        assert (got - expected).abs().max() / expected.abs().max() < 1.5e-2

    before = {c: copy.deepcopy(getattr(pipe, c).state_dict()) for c in modules}
    pipe.fuse_spectral_shift()
    pipe.unfuse_spectral_shift()
    for component in modules:
        for key, value in getattr(pipe, component).state_dict().items():
            assert torch.equal(value, before[component][key]), key

    path = pipe.save_spectral_shift(tmp_path / "sdxl", "A")
    reloaded = sa.StableDiffusionXLPipeline.spectral_shift_state_dict(path)
    assert sorted(reloaded.deltas) == sorted(modules)
    for component, name in modules.items():
        assert torch.equal(reloaded.deltas[component][name], deltas["A"][component][name])

    images = pipe("a b", num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3)
    offloaded = copy.deepcopy(pipe)  # sequential offload reaches text_encoder_2 too
    offloaded.enable_sequential_cpu_offload(device="cpu")
    _accelerate_hooks_on_plain_cpu(offloaded)
    assert offloaded.text_encoder_2._hf_hook is not None
    assert np.array_equal(offloaded("a b", num_inference_steps=2, height=32, width=32, output_type="np",
                                    generator=torch.Generator().manual_seed(0)).images, images)
    pipe.unload_spectral_shift()
    for component in modules:
        assert_unchanged(getattr(pipe, component), state_snapshot(getattr(base, component)))


def test_model_cpu_offload_stays_on_through_load_and_unload(prototype, shifts):
    """With `enable_model_cpu_offload` (here onto the CPU itself, the only device of the test machine) the hooks are
    taken off while the shift is added, put back on the device the user chose, and images match a pipeline without
    offloading."""
    def image(pipe):
        return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                    height=32, width=32).images

    plain = copy.deepcopy(prototype)
    plain.load_spectral_shift(shifts["A"]["file"], "A")
    offloaded = copy.deepcopy(prototype)
    offloaded.enable_model_cpu_offload(device="cpu")
    base_image = image(offloaded)
    offloaded.load_spectral_shift(shifts["A"]["file"], "A")
    assert offloaded._offload_device.type == "cpu" and offloaded.unet._hf_hook is not None
    torch.testing.assert_close(image(offloaded), image(plain), rtol=0, atol=0)
    offloaded.unload_spectral_shift()
    assert offloaded.unet._hf_hook is not None
    torch.testing.assert_close(image(offloaded), base_image, rtol=0, atol=0)


def _accelerate_hooks_on_plain_cpu(pipe):
    """diffusers names the offload device `cpu:0`, and with torch 2.13 `Parameter.to("cpu:0")` returns a plain
    tensor, on which accelerate's next offload step fails (a pipeline without adapters too). Point accelerate's
    hooks at `cpu` so that sequential offload runs on this CPU-only machine."""
    from accelerate.hooks import AlignDevicesHook

    for component in pipe.components.values():
        for module in component.modules() if isinstance(component, torch.nn.Module) else ():
            hook = getattr(module, "_hf_hook", None)
            for part in getattr(hook, "hooks", [hook]):
                if isinstance(part, AlignDevicesHook) and part.execution_device is not None:
                    part.execution_device = torch.device("cpu")


def test_sequential_cpu_offload_before_and_after_loading(prototype, shifts, lora_dir):
    """`enable_sequential_cpu_offload` with shifts: the same images as without offloading, through load, weights,
    hotswap, fuse / unfuse, disable and unload, with offload enabled before or after loading; the rest of the
    pipeline stays offloaded (meta weights)."""
    from svdiff_adapter.tuner import SpectralOffloadHook

    def image(pipe):
        return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                    height=32, width=32).images

    def spectral_hooks(pipe):
        return sum(isinstance(getattr(m, "_hf_hook", None), SpectralOffloadHook)
                   for component in ("unet", "text_encoder") for m in getattr(pipe, component).modules())

    plain = copy.deepcopy(prototype)
    base_image = image(plain)
    plain.load_spectral_shift(shifts["A"]["file"], "A")
    shifted_image = image(plain)
    plain.set_adapters(["A"], [0.5])
    half_image = image(plain)
    plain.load_spectral_shift(shifts["B"]["file"], "A", hotswap=True)
    swapped_image = image(plain)

    offloaded = copy.deepcopy(prototype)
    offloaded.enable_sequential_cpu_offload(device="cpu")
    offloaded.load_spectral_shift(shifts["A"]["file"], "A")
    _accelerate_hooks_on_plain_cpu(offloaded)
    assert spectral_hooks(offloaded) == len(UNET_MODULES) + len(TEXT_MODULES)
    assert offloaded.unet.conv_out.weight.is_meta and offloaded.vae.decoder.conv_out.weight.is_meta
    assert torch.equal(image(offloaded), shifted_image)
    offloaded.set_adapters(["A"], [0.5])
    assert torch.equal(image(offloaded), half_image)
    offloaded.load_spectral_shift(shifts["B"]["file"], "A", hotswap=True)
    assert torch.equal(image(offloaded), swapped_image)
    offloaded.fuse_spectral_shift()
    assert torch.equal(image(offloaded), swapped_image)
    offloaded.unfuse_spectral_shift()
    offloaded.disable_lora()
    assert torch.equal(image(offloaded), base_image)
    offloaded.enable_lora()
    offloaded.unload_spectral_shift()
    _accelerate_hooks_on_plain_cpu(offloaded)
    assert spectral_hooks(offloaded) == 0 and offloaded.unet.conv_out.weight.is_meta
    assert torch.equal(image(offloaded), base_image)

    loaded_first = copy.deepcopy(prototype)
    loaded_first.load_spectral_shift(shifts["A"]["file"], "A")
    loaded_first.enable_sequential_cpu_offload(device="cpu")
    _accelerate_hooks_on_plain_cpu(loaded_first)
    assert torch.equal(image(loaded_first), shifted_image)

    # A LoRA wrapping shifted modules (to_q, to_k) keeps its own accelerate hooks and still applies.
    with_lora = copy.deepcopy(prototype)
    with_lora.load_lora_weights(lora_dir, adapter_name="lora")
    with_lora.load_spectral_shift(shifts["A"]["file"], "A")
    both_image = image(with_lora)
    assert not torch.equal(both_image, shifted_image)
    with_lora.enable_sequential_cpu_offload(device="cpu")
    _accelerate_hooks_on_plain_cpu(with_lora)
    assert torch.equal(image(with_lora), both_image)


def test_bfloat16_weight_builds_through_the_pipeline(pipe, shifts):
    def image():
        return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                    height=32, width=32).images

    pipe.load_spectral_shift(shifts["A"]["file"], "A")
    exact = image()
    pipe.set_spectral_shift_build_dtype(torch.bfloat16)
    layer = find_spectral_layer(pipe.unet.get_submodule(UNET_MODULES[0]))
    assert layer.spectral_build_dtype == torch.bfloat16
    assert find_spectral_layer(pipe.text_encoder.get_submodule(TEXT_MODULES[0])).spectral_build_dtype == torch.bfloat16
    rounded = image()
    assert not torch.equal(rounded, exact)
    torch.testing.assert_close(rounded, exact, rtol=0, atol=2e-2)
    pipe.set_spectral_shift_build_dtype(torch.float32, components=["unet"])
    assert layer.spectral_build_dtype == torch.float32
    pipe.set_spectral_shift_build_dtype(torch.float32)
    torch.testing.assert_close(image(), exact, rtol=0, atol=0)
