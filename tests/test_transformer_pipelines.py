"""Spectral shifts on transformer (DiT) pipelines: Flux, Flux.2, SD3, Qwen-Image, Wan (two transformers) and Sana.

Tiny random configs (tests/transformer_models.py). References are computed here from a float64 SVD of each base
weight: W' = U·diag(ReLU(σ + Σᵢ wᵢδᵢ))·Vᵀ, written into a copy of the pipeline that has no adapter at all.

Outputs of two runs of the same weights are compared with a 1e-5 tolerance where the test is about weights coming
back bit for bit (those are compared exactly): MKL picks summation paths by memory alignment, so a model whose
modules were swapped and swapped back can differ in the last bits of a float32 output (MKL_CBWR=COMPATIBLE makes
such runs identical; PEFT's own LoRA injection with B = 0 shows the same 2e-6).
"""

import copy
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

import svdiff_adapter as sa
from svdiff_adapter.loaders.model_card import spectral_shift_model_card
from svdiff_adapter.loaders.pipelines import PIPELINE_CLASS_NAMES, diffusers_pipeline_name
from svdiff_adapter.tuner.layer import find_spectral_layer

from .tiny_models import assert_unchanged, state_snapshot
from .transformer_models import FAMILIES

FAMILY_NAMES = list(FAMILIES)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def prototype(family):
    return family.pipeline(getattr(sa, family.pipeline_class))


@pytest.fixture
def pipe(prototype):
    return copy.deepcopy(prototype)


def _denoisers(pipe):
    return {c: getattr(pipe, c) for c in ("transformer", "transformer_2") if getattr(pipe, c, None) is not None}


def _linear_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def _svd64(weight):
    return torch.linalg.svd(weight.detach().double(), full_matrices=False)


def _make_deltas(pipe, seed, scale=-0.7):
    """δ = scale·σ·u, u ∈ [0.5, 1.5), on every Linear of the transformer(s): summed with weights, many clip at 0."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for component, model in _denoisers(pipe).items():
        deltas[component] = {}
        for name in _linear_names(model):
            sigma = _svd64(model.get_submodule(name).weight).S
            deltas[component][name] = (scale * sigma * (0.5 + torch.rand(sigma.shape, generator=generator))).float()
    return deltas


def _reference(base_pipe, weighted_deltas):
    """A plain copy of the pipeline whose weights are U·diag(ReLU(σ + Σᵢ wᵢδᵢ))·Vᵀ, computed in float64."""
    reference = copy.deepcopy(base_pipe)
    for component, model in _denoisers(reference).items():
        names = {name for _, deltas in weighted_deltas for name in deltas.get(component, {})}
        for name in names:
            module = model.get_submodule(name)
            svd = _svd64(module.weight)
            shift = sum(w * deltas[component][name].double() for w, deltas in weighted_deltas if component in deltas)
            with torch.no_grad():
                module.weight.copy_((svd.U * torch.relu(svd.S + shift)) @ svd.Vh)
    return reference


def _effect_error(family, shifted, reference, base):
    effect = (family.call(reference) - family.call(base)).abs().max()
    assert effect > 1e-3, "the shift should change the output"
    return float((family.call(shifted) - family.call(reference)).abs().max() / effect)


# ------------------------------------------------------------------------------------------ the families
def test_components_come_from_the_pipelines_lora_loader(family, pipe):
    assert tuple(pipe._spectral_component_names()) == family.components
    assert list(pipe._spectral_components()) == list(_denoisers(pipe))  # the text encoders are absent here


def test_loaded_output_matches_the_float64_formula(family, prototype, pipe):
    deltas = _make_deltas(prototype, 1)
    pipe.load_spectral_shift(deltas, "a", factor_dtype=torch.float32)
    assert _effect_error(family, pipe, _reference(prototype, [(1.0, deltas)]), prototype) < 1e-4


def test_two_shifts_interpolate_inside_the_relu(family, prototype, pipe):
    a = 0.3
    dog, cat = _make_deltas(prototype, 1, scale=-1.2), _make_deltas(prototype, 2, scale=-1.2)
    pipe.load_spectral_shift(dog, "dog", factor_dtype=torch.float32)
    pipe.load_spectral_shift(cat, "cat", factor_dtype=torch.float32)
    pipe.set_adapters(["dog", "cat"], weights=[a, 1 - a])
    reference = _reference(prototype, [(a, dog), (1 - a, cat)])
    assert _effect_error(family, pipe, reference, prototype) < 1e-4
    # Not the interpolation of the two weights: the ReLU clips the combined shift, not each one.
    outside = _reference(prototype, [(a, dog)]), _reference(prototype, [(1 - a, cat)])
    for component in _denoisers(prototype):
        name = _linear_names(getattr(prototype, component))[0]
        w_in = getattr(reference, component).get_submodule(name).weight
        base_weight = getattr(prototype, component).get_submodule(name).weight
        w_out = sum(getattr(o, component).get_submodule(name).weight for o in outside) - base_weight
        assert not torch.allclose(w_in, w_out, atol=1e-4)


def test_fuse_unfuse_exact_and_unload_bit_exact(family, prototype, pipe):
    base_state = state_snapshot(pipe.transformer)
    pipe.load_spectral_shift(_make_deltas(prototype, 1), "a")
    unfused = family.call(pipe)
    pipe.fuse_spectral_shift()
    assert torch.allclose(family.call(pipe), unfused, atol=1e-5, rtol=0)
    pipe.unfuse_spectral_shift()
    weights = {name: getattr(pipe.transformer.get_submodule(name), "base_layer").weight
               for name in _linear_names(prototype.transformer)}
    for name, weight in weights.items():
        assert torch.equal(weight, prototype.transformer.get_submodule(name).weight), name
    pipe.unload_spectral_shift()
    for model in _denoisers(pipe).values():
        assert not any(find_spectral_layer(m) for m in model.modules())
    assert_unchanged(pipe.transformer, base_state)
    assert torch.allclose(family.call(pipe), family.call(prototype), atol=1e-5, rtol=0)


def test_lora_scale_kwarg_scales_the_shift_inside_the_relu(family, prototype, pipe):
    deltas = _make_deltas(prototype, 1)
    pipe.load_spectral_shift(deltas, "a", factor_dtype=torch.float32)
    scaled = family.call(pipe, **{family.scale_kwarg: {"scale": 0.5}})
    pipe.set_adapters(["a"], weights=[0.5])
    assert torch.allclose(scaled, family.call(pipe), atol=1e-5)
    pipe.set_adapters(["a"], weights=[1.0])
    assert not torch.allclose(scaled, family.call(pipe), atol=1e-3)


def test_file_round_trip_and_per_component_weights(family, prototype, pipe, tmp_path):
    deltas = _make_deltas(prototype, 1)
    maker = copy.deepcopy(prototype)
    maker.load_spectral_shift(deltas, "a")
    path = maker.save_spectral_shift(tmp_path, "a")
    expected = family.call(maker)
    assert pipe.load_spectral_shift(path, "b") == "b"
    assert pipe.read_spectral_shift(path).components == list(_denoisers(prototype))
    assert torch.allclose(family.call(pipe), expected, atol=1e-5, rtol=0)
    pipe.set_adapters("b", weights={c: 0.0 for c in _denoisers(pipe)})
    assert torch.allclose(family.call(pipe), family.call(prototype), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="only a UNet takes them"):
        pipe.set_adapters("b", weights={"transformer": {"down": 1.0}})


# ----------------------------------------------------------------------------------------------- Wan 2.2
def test_wan_shifts_each_expert_on_its_own():
    family = FAMILIES["wan"]
    prototype = family.pipeline(sa.WanPipeline)
    deltas = _make_deltas(prototype, 1)
    only_second = {"transformer_2": deltas["transformer_2"]}
    pipe = copy.deepcopy(prototype)
    pipe.load_spectral_shift(only_second, "low_noise")
    assert not sa.spectral_adapter_names(pipe.transformer)
    assert sa.spectral_adapter_names(pipe.transformer_2) == ["low_noise"]
    reference = _reference(prototype, [(1.0, only_second)])
    assert _effect_error(family, pipe, reference, prototype) < 2e-2  # float16 factors


@pytest.mark.parametrize("maker, components, error, match", [
    ("wan", ("transformer_2",), sa.SpectralShiftFormatError, "transformer_2"),  # Flux has one transformer
    # Flux and SD3 share module names and (in these configs) shapes; the fingerprints tell the bases apart.
    ("sd3", ("transformer",), sa.WrongBaseModelError, "18 of 18"),
])
def test_a_shift_made_on_another_pipeline_is_refused(maker, components, error, match, tmp_path):
    other = FAMILIES[maker].pipeline(getattr(sa, FAMILIES[maker].pipeline_class))
    other.load_spectral_shift({c: d for c, d in _make_deltas(other, 1).items() if c in components}, "a")
    path = other.save_spectral_shift(tmp_path, "a")
    flux = FAMILIES["flux"].pipeline(sa.FluxPipeline)
    before = state_snapshot(flux.transformer)
    with pytest.raises(error, match=match):
        flux.load_spectral_shift(path)
    assert_unchanged(flux.transformer, before)
    assert not flux.get_active_adapters()


# --------------------------------------------------------------------------------- diffusers integration
PATCH_CHECK = """
import copy, sys, torch
sys.path.insert(0, {root!r})
import svdiff_adapter as sa
from svdiff_adapter.loaders.pipelines import lora_pipeline_classes
from tests.test_transformer_pipelines import FAMILIES, _effect_error, _make_deltas, _reference
sa.patch_diffusers()
classes = lora_pipeline_classes()
names = {{cls.__name__ for cls in classes}}
assert {{"FluxPipeline", "Flux2Pipeline", "StableDiffusion3Pipeline", "QwenImagePipeline", "WanPipeline",
        "SanaPipeline", "FluxKontextPipeline", "HunyuanVideoPipeline", "LTXPipeline", "CogView4Pipeline"}} <= names
assert all(hasattr(cls, "load_spectral_shift") and hasattr(cls, "fuse_spectral_shift") for cls in classes)
family = FAMILIES["qwen_image"]
pipe = family.pipeline()  # diffusers' own class
deltas = _make_deltas(pipe, 1)
reference, base = _reference(pipe, [(1.0, deltas)]), copy.deepcopy(pipe)
pipe.load_spectral_shift(deltas, factor_dtype=torch.float32)
print(len(classes), _effect_error(family, pipe, reference, base))
"""


def test_patch_diffusers_covers_every_pipeline_with_a_lora_loader():
    """In a fresh process: patching is global, and other tests check diffusers' classes before it."""
    root = str(Path(__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", PATCH_CHECK.format(root=root)], capture_output=True, text=True,
                            cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    count, error = result.stdout.split()[-2:]
    assert int(count) > 100 and float(error) < 1e-4


def test_model_card_names_the_pipeline_class():
    assert diffusers_pipeline_name(sa.FluxPipeline) == "FluxPipeline"
    assert diffusers_pipeline_name(diffusers.FluxImg2ImgPipeline) == "FluxImg2ImgPipeline"
    card = spectral_shift_model_card("me/dog", pipeline_class="FluxPipeline", drop_in_classes=PIPELINE_CLASS_NAMES,
                                     components=["transformer"])
    assert "from svdiff_adapter import FluxPipeline" in card and ".images[0]" in card
    card = spectral_shift_model_card("me/dog", pipeline_class="WanImageToVideoPipeline",
                                     drop_in_classes=PIPELINE_CLASS_NAMES, components=["transformer"])
    assert "from diffusers import WanImageToVideoPipeline" in card and "svdiff_adapter.patch_diffusers()" in card
    assert ".frames[0]" in card


def test_lora_beside_a_shift_on_flux():
    family = FAMILIES["flux"]
    pipe = family.pipeline(sa.FluxPipeline)
    base = family.call(pipe)
    lora_model = copy.deepcopy(pipe.transformer)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False), lora_model)
    lora = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(lora_model).items()}
    pipe.load_spectral_shift(_make_deltas(pipe, 1), "shift")
    shifted = family.call(pipe)
    pipe.load_lora_weights(lora, adapter_name="lora")
    assert pipe.get_active_adapters() == ["shift", "lora"]
    both = family.call(pipe)
    assert not torch.allclose(both, shifted, atol=1e-4) and not torch.allclose(both, base, atol=1e-4)
    pipe.unload_lora_weights()
    assert pipe.get_active_adapters() == ["shift"]
    assert torch.allclose(family.call(pipe), shifted, atol=1e-5, rtol=0)


def test_hotswap_on_a_compiled_transformer_does_not_recompile(tmp_path):
    from torch._dynamo.utils import counters

    family = FAMILIES["flux"]
    pipe = family.pipeline(sa.FluxPipeline)
    files = {}
    for label, seed in (("dog", 1), ("cat", 2)):
        maker = copy.deepcopy(pipe)
        maker.load_spectral_shift(_make_deltas(pipe, seed), label)
        files[label] = (maker.save_spectral_shift(tmp_path / label, label), family.call(maker))
    torch._dynamo.reset()
    pipe.load_spectral_shift(files["dog"][0], "live")
    family.call(pipe)  # builds the inference weights before compiling
    pipe.transformer.compile(backend="eager")
    assert torch.allclose(family.call(pipe), files["dog"][1], atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    pipe.load_spectral_shift(files["cat"][0], "live", hotswap=True)
    assert torch.allclose(family.call(pipe), files["cat"][1], atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


# ------------------------------------------------------------------------------------ fused projections
def _fused_flux():
    pipe = FAMILIES["flux"].pipeline(sa.FluxPipeline)
    pipe.transformer.fuse_qkv_projections()
    assert pipe.transformer.transformer_blocks[0].attn.fused_projections
    return pipe


def test_a_shift_of_the_unfused_layout_is_refused_by_a_fused_model():
    family = FAMILIES["flux"]
    unfused = family.pipeline(sa.FluxPipeline)
    pipe = _fused_flux()
    before, output = state_snapshot(pipe.transformer), family.call(pipe)
    with pytest.raises(sa.SpectralShiftFormatError, match=r"unfuse_qkv_projections\(\)"):
        pipe.load_spectral_shift(_make_deltas(unfused, 1))
    assert_unchanged(pipe.transformer, before)
    assert torch.equal(family.call(pipe), output)


def test_fusing_or_unfusing_projections_that_carry_shifts_is_refused():
    family = FAMILIES["flux"]
    pipe = family.pipeline(sa.FluxPipeline)
    pipe.load_spectral_shift(_make_deltas(pipe, 1), "a")
    shifted = family.call(pipe)
    with pytest.raises(ValueError, match="carry spectral shifts"):
        pipe.transformer.fuse_qkv_projections()
    assert not any(getattr(m, "fused_projections", False) for m in pipe.transformer.modules())
    assert torch.equal(family.call(pipe), shifted)
    pipe.unload_spectral_shift()
    pipe.transformer.fuse_qkv_projections()  # allowed again once the shifts are gone
    assert pipe.transformer.transformer_blocks[0].attn.fused_projections


def test_a_shift_made_on_fused_projections_loads_only_into_a_fused_model(tmp_path):
    family = FAMILIES["flux"]
    maker = _fused_flux()
    deltas = _make_deltas(maker, 1)
    deltas["transformer"] = {n: d for n, d in deltas["transformer"].items()
                             if not n.endswith((".to_q", ".to_k", ".to_v", "_q_proj", "_k_proj", "_v_proj"))}
    assert any(n.endswith(".to_qkv") for n in deltas["transformer"])
    maker.load_spectral_shift(deltas, "fused", factor_dtype=torch.float32)
    path = maker.save_spectral_shift(tmp_path, "fused")
    unfused = family.pipeline(sa.FluxPipeline)
    before = state_snapshot(unfused.transformer)
    with pytest.raises(sa.SpectralShiftFormatError, match=r"call `fuse_qkv_projections\(\)`"):
        unfused.load_spectral_shift(path)
    assert_unchanged(unfused.transformer, before)
    pipe = _fused_flux()
    reference = _reference(pipe, [(1.0, deltas)])
    base = copy.deepcopy(pipe)
    pipe.load_spectral_shift(path, factor_dtype=torch.float32)
    assert _effect_error(family, pipe, reference, base) < 1e-4
    with pytest.raises(ValueError, match="carry spectral shifts"):
        pipe.transformer.unfuse_qkv_projections()
    assert pipe.transformer.transformer_blocks[0].attn.fused_projections


def test_a_load_into_one_expert_leaves_the_other_experts_adapters_active():
    family = FAMILIES["wan"]
    base = family.pipeline(sa.WanPipeline)
    deltas = _make_deltas(base, 1)
    both = _reference(base, [(1.0, deltas)])
    pipe = copy.deepcopy(base)
    pipe.load_spectral_shift({"transformer": deltas["transformer"]}, "high")
    pipe.load_spectral_shift({"transformer_2": deltas["transformer_2"]}, "low")
    assert set(pipe.get_active_adapters()) == {"high", "low"}
    layer = find_spectral_layer(pipe.transformer.get_submodule(_linear_names(base.transformer)[0]))
    assert layer.active_adapters == ["high"]
    assert _effect_error(family, pipe, both, base) < 2e-2


# -------------------------------------------------------------------------- where a fused original waits
@pytest.mark.parametrize("storage", ["cpu", "folder"])
def test_fused_originals_kept_off_the_weight_come_back_bit_exact(storage, tmp_path):
    from svdiff_adapter.tuner.merge_storage import StoredOriginal

    family = FAMILIES["flux"]
    prototype = family.pipeline(sa.FluxPipeline)
    pipe = copy.deepcopy(prototype)
    dog, cat = _make_deltas(prototype, 1), _make_deltas(prototype, 2, scale=0.3)
    pipe.load_spectral_shift(dog, "dog", factor_dtype=torch.float32)
    unfused = family.call(pipe)
    where = "cpu" if storage == "cpu" else tmp_path / "originals"
    pipe.fuse_spectral_shift(original_storage=where)
    layers = [find_spectral_layer(m) for m in pipe.transformer.modules() if find_spectral_layer(m) is m]
    assert layers and all(isinstance(layer._spectral_merge[0], StoredOriginal) for layer in layers)
    if storage == "folder":
        assert len(list(where.iterdir())) == len(layers)
    assert torch.allclose(family.call(pipe), unfused, atol=1e-5, rtol=0)
    # A shift loaded on top of the fused one builds from the kept original, inside the same ReLU.
    pipe.load_spectral_shift(cat, "cat", factor_dtype=torch.float32)
    pipe.set_adapters(["dog", "cat"], weights=[1.0, 1.0])
    reference = _reference(prototype, [(1.0, dog), (1.0, cat)])
    assert _effect_error(family, pipe, reference, prototype) < 1e-4
    pipe.unfuse_spectral_shift()
    for name in _linear_names(prototype.transformer):
        restored = find_spectral_layer(pipe.transformer.get_submodule(name)).base_layer.weight
        assert torch.equal(restored, prototype.transformer.get_submodule(name).weight), name
    if storage == "folder":
        assert not list(where.iterdir())  # the files go with the fuse


def test_a_bad_original_storage_fuses_nothing(tmp_path):
    pipe = FAMILIES["flux"].pipeline(sa.FluxPipeline)
    pipe.load_spectral_shift(_make_deltas(pipe, 1), "a")
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", 3, ""):
        with pytest.raises(ValueError, match="original_storage"):
            pipe.fuse_spectral_shift(original_storage=bad)
    assert not any(find_spectral_layer(m).merged for m in pipe.transformer.modules() if find_spectral_layer(m) is m)
