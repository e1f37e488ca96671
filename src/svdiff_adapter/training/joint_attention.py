"""The unmix regularisation on the joint attention of SD3 and Flux (MMDiT) transformers.

These transformers have no cross-attention: text and image tokens attend over one joint sequence. The map that plays
the part of the UNet's cross-attention map is the block of the joint softmax whose queries are image tokens and
whose keys are text tokens — for each image position, how much it attends to each text token, normalised over the
whole joint sequence. `unmix_loss` (attention.py) is applied to that block, as to the UNet's maps.

The joint blocks' processors (diffusers' `JointAttnProcessor2_0` for SD3: image tokens first, then text;
`FluxAttnProcessor` in Flux's dual-stream blocks: text first, then image; diffusers 0.42) run unchanged. While a
`CrossAttentionStore` is active, `torch.nn.functional.scaled_dot_product_attention` is wrapped for the calling thread
only: the attention output is the original function's, and the image→text block of the probabilities is computed
beside it (under activation checkpointing, so the (image × joint) score matrix is not kept for the backward pass)
and given to the store. Other threads (an app generating images while training runs) see the original function.
Flux's single-stream blocks are not recorded (their text and image streams are already merged).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import CrossAttentionStore, identifier_token_weights

_ORIGINAL_SDPA = F.scaled_dot_product_attention
_THREAD = threading.local()
_INSTALL_LOCK = threading.Lock()
_USERS = 0


def _image_to_text_probabilities(image_queries: torch.Tensor, keys: torch.Tensor, text: slice,
                                 attn_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    scores = image_queries @ keys.transpose(-2, -1) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(dim=-1)[..., text]


def _recording_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    output = _ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
    layout = getattr(_THREAD, "layout", None)
    if layout is not None:
        store, image, text = layout
        _THREAD.layout = None  # one record per attention call (the processor calls SDPA once)
        mask = None
        if attn_mask is not None:
            mask = attn_mask[..., image, :] if attn_mask.shape[-2] == query.shape[-2] else attn_mask
        probabilities = checkpoint(_image_to_text_probabilities, query[..., image, :], key, text, mask,
                                   scale if scale is not None else query.shape[-1] ** -0.5, use_reentrant=False)
        store.add(probabilities)
    return output


@contextlib.contextmanager
def _recording(store: CrossAttentionStore, image: slice, text: slice):
    global _USERS
    with _INSTALL_LOCK:
        if _USERS == 0:
            F.scaled_dot_product_attention = _recording_sdpa
        _USERS += 1
    _THREAD.layout = (store, image, text)
    try:
        yield
    finally:
        _THREAD.layout = None
        with _INSTALL_LOCK:
            _USERS -= 1
            if _USERS == 0:
                F.scaled_dot_product_attention = _ORIGINAL_SDPA


class JointAttentionRecorder:
    """Processor wrapper for a joint-attention block: calls the processor it replaces, and while the store is active
    records the image→text block of that call's attention probabilities."""

    def __init__(self, store: CrossAttentionStore, processor, text_first: bool) -> None:
        self.store, self.processor, self.text_first = store, processor, text_first

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None or not self.store.active:
            return self.processor(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        images, texts = hidden_states.shape[1], encoder_hidden_states.shape[1]
        if self.text_first:
            image, text = slice(texts, texts + images), slice(0, texts)
        else:
            image, text = slice(0, images), slice(images, images + texts)
        with _recording(self.store, image, text):
            return self.processor(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def install_joint_attention_recorders(transformer, store: CrossAttentionStore, family: str) -> dict:
    """Set recorders on the joint-attention blocks of an SD3 ("sd3") or Flux ("flux") transformer (the processors
    of `transformer_blocks.<i>.attn`); returns the old processors for `transformer.set_attn_processor(old)`."""
    old = dict(transformer.attn_processors)
    new = {name: JointAttentionRecorder(store, processor, text_first=family == "flux")
           if name.startswith("transformer_blocks.") and name.endswith(".attn.processor") else processor
           for name, processor in old.items()}
    if not any(isinstance(p, JointAttentionRecorder) for p in new.values()):
        raise ValueError("The transformer has no joint-attention blocks (transformer_blocks.<i>.attn) to record for "
                         "the unmix regularisation.")
    transformer.set_attn_processor(new)
    return old


def joint_identifier_weights(frozen, prompts: list[str], pairs, t5_length: int) -> torch.Tensor:
    """(B, 2, T) token weights over the joint text sequence of `encode_flow_prompts`: every position that carries
    an identifier, averaged (SD3: its CLIP positions, then its T5 positions; Flux: its T5 positions)."""
    def token_ids(tokenizer, length):
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids

    if frozen.family == "flux":
        return identifier_token_weights(frozen.tokenizer_2, token_ids(frozen.tokenizer_2, t5_length), pairs)
    clip = identifier_token_weights(frozen.tokenizer, token_ids(frozen.tokenizer, frozen.tokenizer.model_max_length),
                                    pairs)
    if frozen.text_encoder_3 is None:  # T5's part of the sequence is zeros: no identifier there
        t5 = torch.zeros(clip.shape[0], 2, t5_length)
    else:
        t5 = identifier_token_weights(frozen.tokenizer_3, token_ids(frozen.tokenizer_3, t5_length), pairs)
    weights = torch.cat([clip, t5], dim=-1)
    totals = weights.sum(dim=-1, keepdim=True)
    return torch.where(totals > 0, weights / totals.clamp_min(1e-12), weights)
