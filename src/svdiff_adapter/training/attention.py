"""The unmix regularisation: cross-attention maps of each subject's identifier, kept out of the other's region.

Maps are collected by an attention processor set on the UNet's cross-attention layers (`unet.set_attn_processor`):
diffusers' modules are not changed. While a `CrossAttentionStore` is active, the processor runs diffusers' own
`AttnProcessor` (explicit softmax) through a thin proxy of the `Attention` module whose `get_attention_scores` hands
the probabilities to the store; otherwise it calls the processor it replaced.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor


logger = logging.getLogger(__name__)


def unmix_loss(probs: torch.Tensor, token_weights: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """MSE (target 0) of each subject's attention map over the *other* subject's region.

    Args:
        probs (`torch.Tensor`): softmax attention probabilities, (B, heads, H·W, T) or (B, H·W, T).
        token_weights (`torch.Tensor`): (B, 2, T); row j averages the maps of subject j's identifier tokens
            (e.g. 1/n at its n token positions). All-zero rows mark samples/subjects without a Cut-Mix.
        masks (`torch.Tensor`): (B, 2, h, w) region of subject j (any resolution with the latents' aspect; resized
            to the map's resolution by area averaging).

    Returns:
        A scalar: mean over (sample, subject) pairs with weights of mean_{heads, region of the other subject} map².
        Zero when each identifier attends only inside its own region.
    """
    if probs.ndim == 3:
        probs = probs[:, None]
    batch, _, positions, _ = probs.shape
    height, width = masks.shape[-2:]
    factor = math.sqrt(height * width / positions)
    size = (max(1, round(height / factor)), max(1, round(width / factor)))
    if size[0] * size[1] != positions:
        raise ValueError(f"Cannot match attention over {positions} positions to masks of size {(height, width)}.")
    masks = F.interpolate(masks.to(probs.dtype), size=size, mode="area").flatten(2)       # (B, 2, P)
    other = masks.flip(1)                                                                 # region of the other one
    maps = torch.einsum("bhpt,bjt->bjhp", probs, token_weights.to(probs.dtype))           # (B, 2, heads, P)
    penalty = (maps.square() * other[:, :, None, :]).sum(dim=(2, 3))                      # (B, 2)
    count = other.sum(dim=2) * probs.shape[1]
    active = (token_weights.sum(dim=2) > 0) & (count > 0)
    if not active.any():
        return probs.new_zeros(())
    return (penalty[active] / count[active]).mean()


def identifier_token_weights(tokenizer, input_ids: torch.Tensor,
                             pairs: Sequence[Optional[tuple[str, str]]]) -> torch.Tensor:
    """(B, 2, T) token weights for `unmix_loss`: for sample b with identifiers (first, second), row j is 1/n at
    the n token positions of identifier j in `input_ids[b]` (every occurrence of its token sequence)."""
    weights = torch.zeros(input_ids.shape[0], 2, input_ids.shape[1])
    for b, pair in enumerate(pairs):
        if pair is None:
            continue
        ids = input_ids[b].tolist()
        for j, identifier in enumerate(pair):
            pattern = tokenizer(identifier, add_special_tokens=False).input_ids
            hits = [p for s in range(len(ids) - len(pattern) + 1) if ids[s:s + len(pattern)] == pattern
                    for p in range(s, s + len(pattern))]
            if not hits:  # cut off by truncation: no unmix term for this subject
                logger.warning("Identifier %r is not in the (truncated) tokenized prompt of sample %d.", identifier, b)
                continue
            weights[b, j, sorted(set(hits))] = 1.0 / len(set(hits))
    return weights


class CrossAttentionStore:
    """Accumulates `unmix_loss` over the cross-attention layers of one forward pass."""

    def __init__(self) -> None:
        self.token_weights: Optional[torch.Tensor] = None
        self.masks: Optional[torch.Tensor] = None
        self.losses: list[torch.Tensor] = []

    @property
    def active(self) -> bool:
        return self.token_weights is not None

    def start(self, token_weights: torch.Tensor, masks: torch.Tensor) -> None:
        self.token_weights, self.masks, self.losses = token_weights, masks, []

    def stop(self) -> None:
        self.token_weights, self.masks, self.losses = None, None, []

    def add(self, probs: torch.Tensor) -> None:
        batch = self.token_weights.shape[0]
        # `probs` is (B', heads, P, T); prior samples follow the instance samples (B' > B): they are skipped.
        probs = probs[:batch]
        self.losses.append(unmix_loss(probs, self.token_weights.to(probs.device), self.masks.to(probs.device)))

    def loss(self) -> torch.Tensor:
        if not self.losses:
            raise RuntimeError("No cross-attention maps were recorded: were the processors installed and active?")
        return torch.stack(self.losses).mean()


class _RecordingAttention:
    """Proxy of a diffusers `Attention` module: everything delegates, except that attention probabilities are also
    given to the store."""

    def __init__(self, attn, store: CrossAttentionStore) -> None:
        self._attn, self._store = attn, store

    def __getattr__(self, name):
        return getattr(self._attn, name)

    def get_attention_scores(self, query, key, attention_mask=None):
        probs = self._attn.get_attention_scores(query, key, attention_mask)
        heads = self._attn.heads
        self._store.add(probs.reshape(probs.shape[0] // heads, heads, *probs.shape[1:]))
        return probs


class AttentionProbsRecorder(AttnProcessor):
    """Cross-attention processor that records softmax probabilities while its store is active.

    Wraps the processor it replaces, which runs whenever the store is inactive (e.g. at inference).
    """

    def __init__(self, store: CrossAttentionStore, fallback=None) -> None:
        super().__init__()
        self.store = store
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is None or not self.store.active:
            processor = self.fallback if self.fallback is not None else super().__call__
            return processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return super().__call__(_RecordingAttention(attn, self.store), hidden_states, encoder_hidden_states,
                                attention_mask, temb, *args, **kwargs)


def install_attention_recorders(unet, store: CrossAttentionStore) -> dict:
    """Set recorders on every cross-attention layer (names ending in ``attn2.processor``); returns the old
    processors for `unet.set_attn_processor(old)`."""
    old = dict(unet.attn_processors)
    new = {name: AttentionProbsRecorder(store, processor) if name.endswith("attn2.processor") else processor
           for name, processor in old.items()}
    if not any(isinstance(p, AttentionProbsRecorder) for p in new.values()):
        raise ValueError("The UNet has no cross-attention layers (attn2) to record for the unmix regularisation.")
    unet.set_attn_processor(new)
    return old
