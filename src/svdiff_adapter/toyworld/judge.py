"""A small CNN that reads toy-world images: shape, colour, second colour, background and pattern.

The judge is trained on fresh generator images only (plain and patterned, including every subject recipe), with
blur / noise / contrast augmentation so that it is robust to the softness of VAE decodes and diffusion samples.
Weights are stored as safetensors (never pickle) with the head sizes in the metadata.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import world as W

__all__ = [
    "HEADS",
    "Judge",
    "augment",
    "train_judge",
    "evaluate_judge",
    "save_judge",
    "load_judge_file",
    "predict",
    "score_predictions",
]

#: Head name -> class names.
HEADS: dict[str, tuple[str, ...]] = {
    "shape": W.SHAPES,
    "color": W.COLORS,
    "color2": W.COLORS + ("none",),
    "background": W.BACKGROUNDS,
    "pattern": W.PATTERNS,
}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Judge(nn.Module):
    """~0.3M-parameter CNN (~44M multiply-adds per image); input float images in [-1, 1], shape ``(n, 3, 64, 64)``; output dict of logits."""

    def __init__(self, width: int = 32, heads: Optional[dict[str, int]] = None):
        super().__init__()
        heads = heads or {k: len(v) for k, v in HEADS.items()}
        self.width = width
        self.head_sizes = dict(heads)
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w // 2, 3, padding=1, bias=False),
            nn.BatchNorm2d(w // 2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 32x32
            _block(w // 2, w),
            nn.MaxPool2d(2),  # 16x16
            _block(w, 2 * w),
            nn.MaxPool2d(2),  # 8x8
            _block(2 * w, 4 * w),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(8 * w, n) for k, n in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return {k: head(h) for k, head in self.heads.items()}


# --------------------------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------------------------


def _gaussian_kernels(sigmas: torch.Tensor, radius: int = 3) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x[None] / sigmas.clamp_min(1e-3)[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)  # (n, 2r+1)


def augment(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random per-image blur (sigma 0-1.3 px), Gaussian noise (std 0-0.10), contrast/brightness and colour jitter."""
    n = x.shape[0]
    g = generator

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    # blur: separable Gaussian with per-image sigma (70% of images)
    sig = rand(n) * 1.3 * (rand(n) < 0.7)
    k = _gaussian_kernels(sig)  # (n, 7)
    r = k.shape[1] // 2
    xp = F.pad(x, (r, r, r, r), mode="replicate")
    c = x.shape[1]
    xp = xp.reshape(1, n * c, *xp.shape[2:])
    kh = k.repeat_interleave(c, 0)[:, None, None, :]
    kv = k.repeat_interleave(c, 0)[:, None, :, None]
    xb = F.conv2d(F.conv2d(xp, kh, groups=n * c), kv, groups=n * c).reshape_as(x)
    # contrast / brightness / per-channel shift
    contrast = 1.0 + (rand(n, 1, 1, 1) - 0.5) * 0.2
    bright = (rand(n, 1, 1, 1) - 0.5) * 0.12
    chan = (rand(n, 3, 1, 1) - 0.5) * 0.08
    xb = xb * contrast + bright + chan
    # noise (70% of images)
    std = rand(n, 1, 1, 1) * 0.10 * (rand(n, 1, 1, 1) < 0.7)
    xb = xb + std * torch.randn(x.shape, generator=g)
    return xb.clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------------------------


def _judge_batch(n: int, seed: int, pattern_fraction: float):
    # The judge sees every pattern on every shape, subjects included.
    b = W.make_batch(n, seed, pattern_fraction=pattern_fraction, exclude_subjects=False)
    return b.tensors()


def train_judge(
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    pattern_fraction: float = 0.35,
    width: int = 32,
    log: Optional[Callable[[str], None]] = None,
    progress: bool = True,
) -> Judge:
    """Train a judge from scratch on fresh generator batches (batch ``k`` uses seed ``seed * 1e6 + k``)."""
    torch.manual_seed(seed)
    model = Judge(width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, min(50, steps // 10))

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    g = torch.Generator().manual_seed(seed + 12345)
    model.train()
    it = range(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(it, desc="judge", dynamic_ncols=True)
        it = bar
    t0 = time.time()
    for step in it:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = _judge_batch(batch_size, seed * 1_000_000 + step, pattern_fraction)
        x = augment(x, g)
        out = model(x)
        loss = sum(F.cross_entropy(out[k], y[k]) for k in out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"judge step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    return model


@torch.no_grad()
def predict(model: Judge, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Class indices per head for float images in [-1, 1] ``(n, 3, 64, 64)`` (or uint8 ``(n, 64, 64, 3)``)."""
    if isinstance(images, np.ndarray):
        images = W.to_tensor(images)
    model.eval()
    outs: dict[str, list[torch.Tensor]] = {}
    for i in range(0, images.shape[0], batch_size):
        logits = model(images[i : i + batch_size].float())
        for k, v in logits.items():
            outs.setdefault(k, []).append(v.argmax(1))
    return {k: torch.cat(v) for k, v in outs.items()}


def score_predictions(
    pred: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], full: Sequence[str] = ("shape", "color", "background")
) -> dict[str, float]:
    """Accuracy per head plus ``all`` (every head in ``full`` right at once)."""
    res: dict[str, float] = {}
    ok_all = None
    for k, y in labels.items():
        if k not in pred:
            continue
        ok = pred[k].cpu() == torch.as_tensor(y).cpu()
        res[k] = ok.float().mean().item()
        if k in full:
            ok_all = ok if ok_all is None else ok_all & ok
    if ok_all is not None:
        res["all"] = ok_all.float().mean().item()
    return res


def evaluate_judge(
    model: Judge, n: int = 2000, seed: int = 987_654, pattern_fraction: float = 0.35, augmented: bool = False
) -> dict[str, float]:
    """Per-head accuracy on ``n`` fresh generator images (a seed range never used by training)."""
    x, y = _judge_batch(n, seed, pattern_fraction)
    if augmented:
        x = augment(x, torch.Generator().manual_seed(seed))
    return score_predictions(predict(model, x), y, full=tuple(HEADS))


# --------------------------------------------------------------------------------------------------------------------
# Save / load (safetensors only)
# --------------------------------------------------------------------------------------------------------------------


def save_judge(model: Judge, path: Union[str, os.PathLike], extra: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"width": str(model.width), "heads": json.dumps(model.head_sizes)}
    if extra:
        meta["info"] = json.dumps(extra)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def load_judge_file(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> Judge:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    model = Judge(width=int(meta.get("width", 32)), heads=json.loads(meta["heads"]) if "heads" in meta else None)
    model.load_state_dict(load_file(str(path), device="cpu"))
    return model.to(device).eval()
