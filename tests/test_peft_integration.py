"""The tuner through PEFT's own generic functions, on tiny diffusers / transformers models."""

import json

import peft
import pytest
import torch
from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

import svdiff_adapter as sa
from svdiff_adapter import SpectralShiftConfig, SpectralShiftLayer, SpectralShiftModel
from svdiff_adapter.tuner import SpectralShiftPeftType

from .tiny_models import text_inputs, tiny_text_encoder, tiny_unet, unet_output


def test_registered_under_spectral_shift():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_TUNER_MAPPING["SPECTRAL_SHIFT"] is SpectralShiftModel
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SPECTRAL_SHIFT"] is SpectralShiftConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING["SPECTRAL_SHIFT"] == "spectral_"
    config = SpectralShiftConfig()
    assert config.peft_type.value.lower() == "spectral_shift"  # what transformers and PEFT's hotswap call
    assert config.peft_type == "SPECTRAL_SHIFT"
    sa.register_spectral_shift()  # idempotent


def test_config_round_trips_through_peft_json(tmp_path):
    config = SpectralShiftConfig(target_kinds=["linear", "norm"], norm_mode="scalar", target_modules=["to_q"])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SPECTRAL_SHIFT"
    restored = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(restored, SpectralShiftConfig)
    assert restored.norm_mode == "scalar" and restored.target_modules == {"to_q"}
    assert restored.peft_type is SpectralShiftPeftType.SPECTRAL_SHIFT


@pytest.mark.parametrize("bad", [{"target_kinds": ["linear", "lstm"]}, {"norm_mode": "vector"}, {"init_scale": -1}])
def test_config_validation_quotes_the_value(bad):
    with pytest.raises(ValueError, match=str(list(bad.values())[0]).replace("[", r"\[").replace("]", r"\]")):
        SpectralShiftConfig(**bad)


def test_unet_through_inject_get_and_set_state_dict():
    unet = tiny_unet()
    base = unet_output(unet)
    config = SpectralShiftConfig(init_scale=0.05)
    inject_adapter_in_model(config, unet, adapter_name="dog")
    layers = [m for m in unet.modules() if isinstance(m, SpectralShiftLayer)]
    assert layers and all(m.__class__.__name__ in ("Linear", "Conv2d") for m in layers)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".spectral_delta.dog" in n for n in trainable)
    shifted = unet_output(unet)
    assert not torch.equal(shifted, base)

    state = get_peft_model_state_dict(unet, adapter_name="dog")
    assert state and all(k.endswith(".spectral_delta") for k in state)

    fresh = tiny_unet()
    inject_adapter_in_model(SpectralShiftConfig(), fresh, adapter_name="dog")
    assert torch.equal(unet_output(fresh), base)  # δ = 0
    set_peft_model_state_dict(fresh, state, adapter_name="dog")
    assert torch.equal(unet_output(fresh), shifted)


def test_clip_text_encoder_with_embeddings_and_norms():
    text_encoder = tiny_text_encoder()
    ids = text_inputs()
    with torch.no_grad():
        base = text_encoder(ids).last_hidden_state
    config = SpectralShiftConfig(target_kinds=["linear", "embedding", "norm"])
    inject_adapter_in_model(config, text_encoder, adapter_name="te")
    kinds = {type(m).__name__ for m in text_encoder.modules() if isinstance(m, SpectralShiftLayer)}
    assert kinds == {"Linear", "Embedding", "LayerNorm"}
    token = text_encoder.get_submodule("text_model.embeddings.token_embedding") if hasattr(
        text_encoder, "text_model") else text_encoder.get_submodule("embeddings.token_embedding")
    assert token.shift_size == 32
    with torch.no_grad():
        assert torch.equal(text_encoder(ids).last_hidden_state, base)
        token.spectral_delta["te"].fill_(0.3)
        assert not torch.equal(text_encoder(ids).last_hidden_state, base)


def test_get_peft_model_wraps_a_plain_torch_model():
    from .tiny_models import Mixed, mixed_inputs

    model = peft.get_peft_model(Mixed(), SpectralShiftConfig(target_kinds=["linear", "conv2d"], init_scale=0.1))
    assert isinstance(model.base_model, SpectralShiftModel)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 12 + 10 + 6  # min(m, n) per matrix: proj 12 (24×12), conv3 10 (10×54), conv1 6 (6×10)
    model(mixed_inputs()).sum().backward()
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SpectralShiftLayer) for m in merged.modules())


def test_transformers_adapter_methods_accept_the_type():
    """transformers' PEFT integration reads `peft_type.value`; a plain str registration would break it."""
    text_encoder = tiny_text_encoder()
    ids = text_inputs()
    with torch.no_grad():
        base = text_encoder(ids).last_hidden_state
    text_encoder.add_adapter(SpectralShiftConfig(target_kinds=["linear", "embedding"], init_scale=0.1), adapter_name="x")
    assert text_encoder.active_adapters() == ["x"]
    with torch.no_grad():
        assert not torch.equal(text_encoder(ids).last_hidden_state, base)
        text_encoder.disable_adapters()
        assert torch.equal(text_encoder(ids).last_hidden_state, base)
        text_encoder.enable_adapters()
    state = text_encoder.get_adapter_state_dict("x")
    assert "embeddings.token_embedding.spectral_delta" in state
    text_encoder.delete_adapter("x")
    with torch.no_grad():
        assert torch.equal(text_encoder(ids).last_hidden_state, base)


def test_low_cpu_mem_usage_injection_then_state_dict():
    from .tiny_models import Mixed, mixed_inputs

    model = Mixed()
    sa.add_spectral_shift(model, SpectralShiftConfig(init_scale=0.1), "a", svd_cache=False)
    state = get_peft_model_state_dict(model, adapter_name="a")
    with torch.no_grad():
        expected = model(mixed_inputs())
    fresh = Mixed()
    inject_adapter_in_model(SpectralShiftConfig(), fresh, "a", low_cpu_mem_usage=True)
    assert all(p.device.type == "meta" for n, p in fresh.named_parameters() if "spectral_delta" in n)
    set_peft_model_state_dict(fresh, state, adapter_name="a", low_cpu_mem_usage=True)
    with torch.no_grad():
        assert torch.equal(fresh(mixed_inputs()), expected)


@pytest.mark.parametrize("kinds", [["linear", "embedding"], ["conv2d", "norm"]], ids=["text", "unet"])
def test_sequential_offload_streams_the_shifted_weight(kinds):
    """Under accelerate's `cpu_offload` (onto the CPU, the test machine's only device; the hook code is the same for
    a GPU) `offload_spectral_layers` gives the outputs of the model without offloading, the other modules stay
    offloaded (meta weights between calls), and removing the hooks leaves a working model."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    def build():
        if kinds[0] == "conv2d":
            return tiny_unet(), unet_output
        return tiny_text_encoder(), lambda m: m(text_inputs()).last_hidden_state.detach()

    reference, run = build()
    sa.add_spectral_shift(reference, SpectralShiftConfig(target_kinds=kinds, init_scale=0.1), "a", svd_cache=False)
    model, _ = build()
    sa.add_spectral_shift(model, SpectralShiftConfig(target_kinds=kinds), "a", svd_cache=False)
    set_peft_model_state_dict(model, get_peft_model_state_dict(reference, adapter_name="a"), adapter_name="a")
    expected = run(reference)
    layers = [m for m in model.modules() if isinstance(m, SpectralShiftLayer)]

    cpu_offload(model, torch.device("cpu"))
    assert sa.offload_spectral_layers(model, torch.device("cpu")) == len(layers)
    assert torch.equal(run(model), expected)
    offloaded = [n for n, p in model.named_parameters() if p.is_meta]
    assert offloaded and not any(".spectral_delta." in n or ".base_layer." in n for n in offloaded)
    assert all(not t.is_meta for layer in layers for t in (*layer.parameters(), *layer.buffers()))
    with torch.no_grad():  # a new δ is picked up (the CPU-side W_δ is rebuilt)
        layers[0].spectral_delta["a"].mul_(2)
        reference.get_submodule(next(n for n, m in model.named_modules() if m is layers[0])).spectral_delta["a"].mul_(2)
    assert torch.equal(run(model), run(reference))

    remove_hook_from_module(model, recurse=True)
    assert not any(p.is_meta for p in model.parameters()) and layers[0].spectral_execution_device is None
    assert torch.equal(run(model), run(reference))


def test_offload_spectral_layers_refuses_weights_it_cannot_restore():
    model = tiny_text_encoder()
    sa.add_spectral_shift(model, SpectralShiftConfig(target_kinds=["linear"]), "a", svd_cache=False)
    model.to("meta")
    with pytest.raises(ValueError, match="meta device"):
        sa.offload_spectral_layers(model, "cpu")


# ------------------------------------------------------------------------------------ PEFT's own conventions
class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.attention = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.lin1 = torch.nn.Linear(16, 16)
        self.lin2 = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.lin2(self.lin1(self.attention(x, x, x, need_weights=False)[0]))


def test_multihead_attention_out_proj_is_never_shifted_because_its_weight_is_read_directly():
    """nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward: a wrapper would be bypassed,
    so the catch-all leaves it alone and naming it explicitly is refused."""
    model = _Attention()
    sa.add_spectral_shift(model, SpectralShiftConfig(init_scale=0.1), "a", svd_cache=False)
    shifted = {name for name, module in model.named_modules() if isinstance(module, SpectralShiftLayer)}
    assert shifted == {"lin1", "lin2"}
    assert isinstance(model.attention.out_proj, torch.nn.Linear)
    with pytest.raises(ValueError, match="MultiheadAttention reads out_proj.weight directly"):
        sa.add_spectral_shift(_Attention(), SpectralShiftConfig(target_modules=["out_proj"]), "a", svd_cache=False)


def test_modules_to_save_train_and_save_the_classifier_head_as_in_lora():
    from peft import get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)

    def classifier_model():
        torch.manual_seed(0)
        return get_peft_model(BertForSequenceClassification(config),
                              SpectralShiftConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))

    model = classifier_model()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in name for name in trainable)
    assert any("spectral_delta" in name for name in trainable)
    assert not any(isinstance(m, SpectralShiftLayer) for n, m in model.named_modules() if "classifier" in n)
    head = model.base_model.model.classifier.modules_to_save["default"]
    with torch.no_grad():
        head.weight.add_(1.0)
    state = get_peft_model_state_dict(model)
    assert any(key.endswith("classifier.weight") for key in state)
    fresh = classifier_model()
    set_peft_model_state_dict(fresh, state)
    assert torch.equal(fresh.base_model.model.classifier.modules_to_save["default"].weight, head.weight)
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    fresh.eval(), model.eval()  # no dropout
    assert torch.equal(fresh(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_exclude_modules_that_exclude_something_do_not_warn():
    import warnings

    model = _Attention()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sa.add_spectral_shift(model, SpectralShiftConfig(exclude_modules=["lin1"]), "a", svd_cache=False)
    assert not [w for w in caught if "no modules were excluded" in str(w.message)]
    assert not isinstance(model.lin1, SpectralShiftLayer) and isinstance(model.lin2, SpectralShiftLayer)
    with pytest.warns(UserWarning, match="no modules were excluded"):
        sa.add_spectral_shift(_Attention(), SpectralShiftConfig(exclude_modules=["nothing_here"]), "a",
                              svd_cache=False)


@pytest.mark.parametrize("target_modules", [None, ["proj_in", "proj_out", "to_q", "to_k", "to_v", "conv1"]])
def test_layers_to_transform_selects_layers_as_lora_does(target_modules):
    """LoRA's matcher (PEFT's `check_target_module_exists`) is the reference for which modules a layer index
    selects; with `target_modules=None` spectral shifts apply the same rule to every module of the target kinds."""
    from peft import LoraConfig

    unet = tiny_unet()
    options = dict(layers_to_transform=[1], layers_pattern="down_blocks")
    config = SpectralShiftConfig(target_modules=target_modules, **options)
    sa.add_spectral_shift(unet, config, "a", svd_cache=False)
    shifted = {name for name, m in unet.named_modules() if isinstance(m, SpectralShiftLayer)}
    assert shifted and all(name.startswith("down_blocks.1.") for name in shifted)
    reference = LoraConfig(target_modules=target_modules or [name.rsplit(".", 1)[-1] for name in shifted], **options)
    everything = {name for name, m in tiny_unet().named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    lora_selected = {name for name in everything if peft.tuners.tuners_utils.check_target_module_exists(reference, name)}
    assert shifted == lora_selected
    with pytest.raises(ValueError, match="cannot be used when `target_modules` is a str"):
        SpectralShiftConfig(target_modules=r".*to_q", layers_to_transform=[0])
    with pytest.raises(ValueError, match="`layers_to_transform` must also be specified"):
        SpectralShiftConfig(layers_pattern="down_blocks")


def test_autocast_adapter_dtype_keeps_delta_in_float32_by_default_and_in_the_weights_dtype_when_off():
    from peft import get_peft_model

    model = _Attention().to(torch.bfloat16)
    default = get_peft_model(model, SpectralShiftConfig(target_modules=["lin1"]))
    assert default.base_model.model.lin1.spectral_delta["default"].dtype == torch.float32
    off = get_peft_model(_Attention().to(torch.bfloat16), SpectralShiftConfig(target_modules=["lin1"]),
                         autocast_adapter_dtype=False)
    delta = off.base_model.model.lin1.spectral_delta["default"]
    assert delta.dtype == torch.bfloat16 and delta.requires_grad
    x = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    off(x).float().square().mean().backward()
    assert delta.grad is not None and delta.grad.dtype == torch.bfloat16
