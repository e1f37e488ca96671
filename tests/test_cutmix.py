"""Cut-Mix-Unmix: joined images, prompts, region masks; the unmix regularisation and its attention recorders."""

import pytest
import torch

import svdiff_adapter as sa
from svdiff_adapter.training import (
    CrossAttentionStore,
    DreamBoothData,
    ImageTransform,
    TrainingDataError,
    cut_mix,
    cut_mix_prompt,
    draw_pair,
    identifier_token_weights,
    install_attention_recorders,
    parse_subject,
    train,
    unmix_loss,
)
from tests.test_training import RESOLUTION, build_tiny_pipeline, tiny_model_dir, train_args, write_images  # noqa: F401


def test_left_right_and_top_bottom_halves_and_masks():
    first = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)
    second = -first - 1
    mixed = cut_mix(first, second, "left-right")
    assert torch.equal(mixed.image[:, :, :4], first[:, :, 2:6])     # central half-width strip of the first image
    assert torch.equal(mixed.image[:, :, 4:], second[:, :, 2:6])
    assert mixed.masks.shape == (2, 8, 8)
    assert mixed.masks[0, :, :4].all() and not mixed.masks[0, :, 4:].any()
    assert mixed.masks[1, :, 4:].all() and not mixed.masks[1, :, :4].any()
    stacked = cut_mix(first, second, "top-bottom")
    assert torch.equal(stacked.image[:, :4], first[:, 2:6]) and torch.equal(stacked.image[:, 4:], second[:, 2:6])
    assert stacked.masks[0, :4].all() and not stacked.masks[0, 4:].any() and stacked.masks[1, 4:].all()
    assert torch.equal(stacked.masks.sum(0), torch.ones(8, 8))
    with pytest.raises(ValueError, match="layout"):
        cut_mix(first, second, "diagonal")


def test_prompts_and_reversed_wording():
    assert cut_mix_prompt("[V1] dog", "[V2] sculpture") == \
        "photo of a [V1] dog on the left and a [V2] sculpture on the right"
    assert cut_mix_prompt("[V1] dog", "[V2] sculpture", reversed_wording=True) == \
        "photo of a [V2] sculpture on the right and a [V1] dog on the left"
    assert cut_mix_prompt("sks dog", "zwx owl", "top-bottom") == \
        "photo of a sks dog at the top and a zwx owl at the bottom"


def test_pairs_are_drawn_without_replacement():
    pairs = {draw_pair(3, torch.Generator().manual_seed(s)) for s in range(60)}
    assert all(a != b for a, b in pairs) and len(pairs) == 6
    with pytest.raises(ValueError):
        draw_pair(1)


def _two_subjects(tmp_path):
    dog = parse_subject(f"dir={write_images(tmp_path / 'dog', 2, seed=1)},prompt=a photo of [V1] dog,class=dog")
    owl = parse_subject(f"dir={write_images(tmp_path / 'owl', 2, seed=2)},prompt=a photo of [V2] sculpture,"
                        "class=sculpture")
    return dog, owl


def test_batches_mix_subjects_and_prior_samples_the_same_way(tmp_path):
    dog, owl = _two_subjects(tmp_path)
    assert (dog.token, owl.token, dog.class_prompt) == ("[V1]", "[V2]", "a photo of dog")
    class_images = [[torch_image(0)], [torch_image(255)]]
    data = DreamBoothData([dog, owl], ImageTransform(RESOLUTION, center_crop=True), cutmix_prob=1.0,
                          with_prior_preservation=True, class_images=class_images)
    batch = data.sample(4, torch.Generator().manual_seed(0))
    assert batch.pixel_values.shape == (8, 3, RESOLUTION, RESOLUTION) and batch.num_instance == 4
    for b in range(4):
        prompt, prior_prompt = batch.prompts[b], batch.prompts[4 + b]
        assert set(batch.pairs[b]) == {"[V1]", "[V2]"}
        assert "[V1] dog" in prompt and "[V2] sculpture" in prompt and " and " in prompt
        assert prior_prompt == prompt.replace("[V1] ", "").replace("[V2] ", "")
        first_is_dog = batch.pairs[b][0] == "[V1]"
        # Prior: class images are black (dog) and white (sculpture); the first subject's region holds its class.
        region = batch.masks[b, 0].bool()
        values = batch.pixel_values[4 + b][:, region]
        assert torch.all(values == (-1.0 if first_is_dog else 1.0))
    never = DreamBoothData([dog, owl], ImageTransform(RESOLUTION), cutmix_prob=0.0).sample(4, torch.Generator())
    assert not never.has_cutmix and set(never.prompts) <= {dog.instance_prompt, owl.instance_prompt}


def torch_image(value):
    from PIL import Image

    return Image.new("RGB", (RESOLUTION, RESOLUTION), (value,) * 3)


def test_cutmix_needs_identifiers_and_classes(tmp_path):
    dog, owl = _two_subjects(tmp_path)
    owl.class_name = None
    with pytest.raises(TrainingDataError, match="identifier and class"):
        DreamBoothData([dog, owl], ImageTransform(RESOLUTION))


def test_unmix_loss_is_zero_for_ideal_maps_and_positive_for_mixed_ones():
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :, :2] = 1
    masks[0, 1, :, 2:] = 1
    tokens = torch.zeros(1, 2, 5)
    tokens[0, 0, 1] = 1.0  # [V1] at token 1
    tokens[0, 1, 3] = 1.0  # [V2] at token 3
    ideal = torch.full((1, 2, 16, 5), 0.1)
    region = masks[0].flatten(1)  # (2, 16)
    ideal[0, :, :, 1] = region[0] * 0.5
    ideal[0, :, :, 3] = region[1] * 0.5
    assert unmix_loss(ideal, tokens, masks).item() == 0.0
    mixed = ideal.clone()
    mixed[0, :, :, 1] = 0.25  # [V1] attends everywhere, [V2]'s half included
    loss = unmix_loss(mixed, tokens, masks)
    assert loss.item() == pytest.approx(0.25 ** 2 / 2)  # subject 1: 0.0625 over its other region; subject 2: 0
    # Masks at pixel resolution are averaged down to the map's resolution.
    big = torch.nn.functional.interpolate(masks, scale_factor=8)
    assert unmix_loss(mixed, tokens, big).item() == pytest.approx(loss.item())
    assert unmix_loss(mixed, torch.zeros_like(tokens), masks).item() == 0.0  # no Cut-Mix sample: no loss


def test_identifier_token_weights_find_multi_token_identifiers(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    prompt = cut_mix_prompt("sks dog", "zwx owl")
    ids = tokenizer([prompt, "a dog"], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    weights = identifier_token_weights(tokenizer, ids, [("sks", "zwx"), None])
    assert weights.shape == (2, 2, ids.shape[1]) and weights[1].sum() == 0
    sks = tokenizer("sks", add_special_tokens=False).input_ids
    positions = weights[0, 0].nonzero().flatten().tolist()
    assert len(positions) == len(sks) and ids[0, positions].tolist() == sks
    assert weights[0].sum(dim=1).tolist() == pytest.approx([1.0, 1.0])


def test_recorders_keep_outputs_and_give_gradients_to_shifts():
    pipe = build_tiny_pipeline()
    unet = pipe.unet
    sa.add_spectral_shift(unet, sa.SpectralShiftConfig(), "s", svd_cache=False)
    sample = torch.randn(2, 4, 16, 16)
    hidden = torch.randn(2, 7, 32)
    timestep = torch.tensor([10, 500])
    with torch.no_grad():
        reference = unet(sample, timestep, hidden).sample
    store = CrossAttentionStore()
    old = install_attention_recorders(unet, store)
    with torch.no_grad():
        assert torch.allclose(unet(sample, timestep, hidden).sample, reference, atol=1e-5)  # inactive: fallback
    tokens = torch.zeros(1, 2, 7)
    tokens[0, 0, 2] = tokens[0, 1, 4] = 1.0
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, :, :8] = masks[0, 1, :, 8:] = 1
    store.start(tokens, masks)
    output = unet(sample, timestep, hidden).sample
    assert torch.allclose(output, reference, atol=1e-4)  # recording does not change the computation
    assert len(store.losses) == sum(name.endswith("attn2.processor") for name in old) == 4  # down, mid, 2 up
    loss = store.loss()
    store.stop()
    assert loss.item() > 0
    loss.backward()
    grads = [p.grad for n, p in unet.named_parameters() if "attn2.to_q" in n and "spectral_delta" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    unet.set_attn_processor(old)


def test_multi_subject_training_with_unmix(tiny_model_dir, tmp_path):
    dog = write_images(tmp_path / "dog", 2, seed=1)
    owl = write_images(tmp_path / "owl", 2, seed=2)
    result = train(train_args(
        tiny_model_dir, tmp_path / "out", "--subject", f"dir={dog},prompt=a photo of sks dog,class=dog",
        "--subject", f"dir={owl},prompt=a photo of zwx sculpture,class=sculpture", "--cutmix_prob", "1.0",
        "--unmix_weight", "0.5", "--max_train_steps", 2, "--with_prior_preservation", "--num_class_images", 1,
        "--class_inference_steps", 1))
    assert all("unmix_loss" in logs and logs["unmix_loss"] > 0 and "prior_loss" in logs for logs in result["history"])
    assert len(list((tmp_path / "out" / "class_images" / "dog").iterdir())) == 1
    assert (tmp_path / "out" / sa.DEFAULT_WEIGHT_NAME).is_file()
