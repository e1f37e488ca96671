"""Pipeline ↔ Hub through the real huggingface_hub code against the local Hub server (tests/hub_server.py)."""

import copy
import textwrap

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

import svdiff_adapter as sa
from svdiff_adapter.loaders.hub import SpectralShiftNotFoundError

from .hub_fixtures import run_python
from .test_pipeline import _make_deltas, outputs
from .tiny_models import tiny_pipeline


@pytest.fixture(scope="module")
def prototype():
    return tiny_pipeline(sa.StableDiffusionPipeline)


@pytest.fixture(scope="module")
def loaded(prototype):
    """Pipelines holding shift A and shift B (adapter names "A", "B")."""
    result = {}
    for label, seed in (("A", 1), ("B", 2)):
        pipe = copy.deepcopy(prototype)
        pipe.load_spectral_shift(_make_deltas(prototype, seed), label)
        result[label] = pipe
    return result


def assert_same(first, second):
    for got, want in zip(outputs(first), outputs(second)):
        assert torch.equal(got, want)


def test_push_then_pull_round_trip_with_model_card(prototype, loaded, local_hub, hub_api, hub_token, unique_repo_id,
                                                   tmp_path):
    image = Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8))
    loaded["A"].push_spectral_shift_to_hub(
        unique_repo_id, token=hub_token, instance_prompt="a sks dog", base_model="tiny/base", images=[image],
    )
    files = set(hub_api.list_repo_files(unique_repo_id))
    assert files >= {"README.md", sa.DEFAULT_WEIGHT_NAME, "images/image_0.png"}

    card = ModelCard.load(unique_repo_id, token=hub_token)
    data = card.data.to_dict()
    assert data["base_model"] == "tiny/base" and data["library_name"]
    assert {"svdiff", "spectral-shift", "diffusers", "text-to-image"} <= set(data["tags"])
    assert data["instance_prompt"] == "a sks dog"
    assert data["widget"] == [{"text": "a sks dog", "output": {"url": "images/image_0.png"}}]
    assert "inference" not in data
    assert f'load_spectral_shift("{unique_repo_id}"' in card.text

    pulled = copy.deepcopy(prototype)
    assert pulled.load_spectral_shift(unique_repo_id, "A", token=hub_token, cache_dir=tmp_path) == "A"
    assert_same(pulled, loaded["A"])


def test_revision_selects_the_pushed_version(prototype, loaded, local_hub, hub_token, unique_repo_id, tmp_path):
    first = loaded["A"].push_spectral_shift_to_hub(unique_repo_id, token=hub_token)
    loaded["B"].push_spectral_shift_to_hub(unique_repo_id, token=hub_token, commit_message="B")
    old, new = copy.deepcopy(prototype), copy.deepcopy(prototype)
    old.load_spectral_shift(unique_repo_id, "A", revision=first.oid, token=hub_token, cache_dir=tmp_path)
    new.load_spectral_shift(unique_repo_id, "B", token=hub_token, cache_dir=tmp_path)
    assert_same(old, loaded["A"])
    assert_same(new, loaded["B"])
    with pytest.raises(SpectralShiftNotFoundError, match="Revision"):
        new.load_spectral_shift(unique_repo_id, "C", revision="no-such-branch", token=hub_token, cache_dir=tmp_path)


def test_private_repo_needs_the_token(prototype, loaded, local_hub, hub_token, unique_repo_id, tmp_path):
    loaded["A"].push_spectral_shift_to_hub(unique_repo_id, private=True, token=hub_token)
    pipe = copy.deepcopy(prototype)
    with pytest.raises(SpectralShiftNotFoundError, match="private"):
        pipe.load_spectral_shift(unique_repo_id, cache_dir=tmp_path)
    assert pipe.get_list_adapters() == {}
    pipe.load_spectral_shift(unique_repo_id, "A", token=hub_token, cache_dir=tmp_path)
    assert_same(pipe, loaded["A"])


def test_repo_without_a_shift_file_and_missing_repo(prototype, local_hub, hub_api, unique_repo_id, tmp_path):
    hub_api.create_repo(unique_repo_id)
    hub_api.upload_file(path_or_fileobj=b"not used", path_in_repo="pytorch_lora_weights.safetensors",
                        repo_id=unique_repo_id)
    pipe = copy.deepcopy(prototype)
    with pytest.raises(SpectralShiftNotFoundError, match="no spectral-shift file.*load_lora_weights"):
        pipe.load_spectral_shift(unique_repo_id, cache_dir=tmp_path, token=hub_api.token)
    with pytest.raises(SpectralShiftNotFoundError, match="does not exist"):
        pipe.load_spectral_shift("user/does-not-exist-at-all", cache_dir=tmp_path)
    assert pipe.get_list_adapters() == {}


def test_offline_load_from_the_cache_a_real_download_filled(prototype, loaded, local_hub, hub_token, unique_repo_id,
                                                            tmp_path):
    loaded["A"].push_spectral_shift_to_hub(unique_repo_id, token=hub_token)
    cache = tmp_path / "hub-cache"
    online = copy.deepcopy(prototype)
    online.load_spectral_shift(unique_repo_id, "A", token=hub_token, cache_dir=cache)  # fills the cache
    expected = tmp_path / "expected.pt"
    torch.save(outputs(online), expected)
    code = textwrap.dedent(f"""
        import torch
        import svdiff_adapter as sa
        from svdiff_adapter.loaders.hub import SpectralShiftNotFoundError
        from tests.test_pipeline import outputs

        torch.set_num_threads(1)  # as in the test process (conftest): same reduction order, bit-equal outputs
        from tests.tiny_models import tiny_pipeline

        pipe = tiny_pipeline(sa.StableDiffusionPipeline)
        pipe.load_spectral_shift({unique_repo_id!r}, "A")  # no weight_name, no token: cache only
        for got, want in zip(outputs(pipe), torch.load({str(expected)!r})):
            assert torch.equal(got, want)
        try:
            pipe.load_spectral_shift("user/never-downloaded", "B")
        except SpectralShiftNotFoundError as error:
            assert "offline" in str(error), error
        else:
            raise AssertionError("loading an uncached repo offline should fail")
        print("OFFLINE-OK")
    """)
    result = run_python(code, extra_env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}, timeout=300)
    assert "OFFLINE-OK" in result.stdout
