"""The unmix regularisation on the joint attention of SD3 and Flux: the recorded image→text block against the full
softmax taken from diffusers' own attention call, outputs unchanged, gradients, identifier positions, and the term
falling in a multi-subject run."""

from unittest import mock

import pytest
import torch

import svdiff_adapter as sa
from svdiff_adapter.training import CrossAttentionStore, train
from svdiff_adapter.training.joint_attention import install_joint_attention_recorders, joint_identifier_weights

from .test_training import write_images
from .test_training_flow import BUILDERS, T5_TOKENS, frozen_of, model_dirs, train_args  # noqa: F401 (fixture)


def transformer_inputs(pipe, family, batch=2, text_tokens=5):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, text_tokens, 32, generator=generator)
    if family == "sd3":
        return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=generator), timestep=torch.tensor([300., 700.]),
                    encoder_hidden_states=hidden, pooled_projections=torch.randn(batch, 64, generator=generator))
    return dict(hidden_states=torch.randn(batch, 16, 4, generator=generator), timestep=torch.tensor([0.3, 0.7]),
                encoder_hidden_states=hidden, pooled_projections=torch.randn(batch, 32, generator=generator),
                txt_ids=torch.zeros(text_tokens, 3), guidance=torch.full((batch,), 3.5),
                img_ids=pipe._prepare_latent_image_ids(batch, 4, 4, "cpu", torch.float32))


def full_softmax_of_first_joint_call(transformer, inputs):
    """The (B, heads, S, S) probabilities of the first scaled_dot_product_attention call, from its query and key."""
    original = torch.nn.functional.scaled_dot_product_attention
    captured = []

    def capture(query, key, value, *args, **kwargs):
        if not captured:
            captured.append((query @ key.transpose(-2, -1) * query.shape[-1] ** -0.5).softmax(-1))
        return original(query, key, value, *args, **kwargs)

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", capture), torch.no_grad():
        output = transformer(**inputs).sample
    return captured[0], output


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_recorded_block_is_image_queries_on_text_keys_and_outputs_are_unchanged(family):
    pipe = BUILDERS[family]()
    transformer = pipe.transformer
    sa.add_spectral_shift(transformer, sa.SpectralShiftConfig(), "s", svd_cache=False)
    inputs = transformer_inputs(pipe, family)
    full, reference = full_softmax_of_first_joint_call(transformer, inputs)
    images, texts = (64, 5) if family == "sd3" else (16, 5)
    # diffusers 0.42: SD3 joins [image, text], Flux's dual-stream blocks [text, image].
    rows, cols = (slice(0, images), slice(images, None)) if family == "sd3" else (slice(texts, None), slice(0, texts))
    expected = full[:, :, rows, cols]

    store = CrossAttentionStore()
    old = install_joint_attention_recorders(transformer, store, family)
    recorded = []
    store.add = recorded.append  # keep the raw maps of this forward pass
    tokens = torch.zeros(2, 2, texts)
    tokens[:, 0, 1] = tokens[:, 1, 3] = 1.0
    store.start(tokens, torch.ones(2, 2, 8, 8))
    output = transformer(**inputs).sample
    store.stop()
    assert torch.equal(output, reference)  # recording does not touch the computation
    assert len(recorded) == len(transformer.transformer_blocks)  # one per joint block, none for single blocks
    assert torch.allclose(recorded[0], expected, atol=1e-6)
    transformer.set_attn_processor(old)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_unmix_term_gives_gradients_to_shifts_and_wrapper_is_removed(family):
    pipe = BUILDERS[family]()
    transformer = pipe.transformer
    original = torch.nn.functional.scaled_dot_product_attention
    sa.add_spectral_shift(transformer, sa.SpectralShiftConfig(), "s", svd_cache=False)
    store = CrossAttentionStore()
    install_joint_attention_recorders(transformer, store, family)
    tokens = torch.zeros(2, 2, 5)
    tokens[:, 0, 1] = tokens[:, 1, 3] = 1.0
    masks = torch.zeros(2, 2, 8, 8)
    masks[:, 0, :, :4] = masks[:, 1, :, 4:] = 1
    store.start(tokens, masks)
    transformer(**transformer_inputs(pipe, family))
    loss = store.loss()
    store.stop()
    assert torch.nn.functional.scaled_dot_product_attention is original
    assert loss.item() > 0
    loss.backward()
    grads = [p.grad for n, p in transformer.named_parameters()  # the joint blocks' (not Flux's single blocks')
             if n.startswith("transformer_blocks.") and "spectral_delta" in n and ".attn.to_q" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_identifier_positions_in_the_joint_text_sequence(family):
    frozen = frozen_of(BUILDERS[family](), family)
    weights = joint_identifier_weights(frozen, ["a sks dog and a zwx cat", "a zwx cat"], [("sks", "zwx"), None],
                                       T5_TOKENS)
    clip_length = 77 if family == "sd3" else 0
    assert weights.shape == (2, 2, clip_length + T5_TOKENS)
    assert torch.allclose(weights[0].sum(-1), torch.ones(2)) and not weights[1].any()
    # The char-level tokenizer spells "sks" as s, k, s after the start token and "a": positions 2–4, in the CLIP
    # part (SD3) and in the T5 part (SD3: after CLIP's 77 positions; Flux: its whole text sequence).
    ids = frozen.tokenizer("a sks dog and a zwx cat").input_ids
    assert frozen.tokenizer.decode(ids[2:5]).replace(" ", "") == "sks"
    expected = [2, 3, 4, 79, 80, 81] if family == "sd3" else [2, 3, 4]
    assert torch.nonzero(weights[0, 0]).flatten().tolist() == expected
    assert torch.allclose(weights[0, 0, expected], torch.full((len(expected),), 1 / len(expected)))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_multi_subject_run_with_unmix_on_joint_attention(family, model_dirs, tmp_path):  # noqa: F811
    dog = write_images(tmp_path / "dog", 2, seed=1)
    owl = write_images(tmp_path / "owl", 2, seed=2)
    result = train(train_args(
        model_dirs[family], tmp_path / "out", "--subject", f"dir={dog},prompt=a photo of sks dog,class=dog",
        "--subject", f"dir={owl},prompt=a photo of zwx owl,class=owl", "--cutmix_prob", "1.0", "--unmix_weight", "1.0",
        "--max_train_steps", 30, "--learning_rate", "3e-2", "--seed", "0"))
    unmix = [logs["unmix_loss"] for logs in result["history"]]
    assert all(value > 0 for value in unmix)
    assert sum(unmix[-5:]) / 5 < 0.8 * sum(unmix[:5]) / 5, unmix
