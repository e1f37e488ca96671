"""CoSINE step 1: fine-tune spectral shifts of the denoiser (the UNet, or the SD3 / Flux transformer) on one
image–prompt pair, without prior preservation (λ = 0).

Reuses the trainer's loss (`training_loss`, or `flow_matching_loss` for flow models: the same noise, timesteps and
prediction targets) and optimizer
(`make_optimizer`: AdamW, 1e-3 for 2-D/4-D shifts and 1e-6 for 1-D norm shifts, the paper's rates) on a one-image
batch at the image's own size; the accelerate/checkpoint machinery of `train()` is not needed for a few hundred
steps in memory.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from PIL import Image

from ..loaders import add_spectral_shift
from ..training.data import Batch
from ..training.flow import flow_frozen, flow_matching_loss
from ..training.loss import Frozen, training_loss
from ..training.optim import make_optimizer, trainable_parameters
from ..tuner import SpectralShiftConfig
from .flow import flow_family
from .images import image_to_tensor


def finetune_on_image(
    pipe,
    image: Image.Image,
    prompt: str,
    *,
    max_train_steps: int = 300,
    learning_rate: float = 1e-3,
    learning_rate_1d: float = 1e-6,
    adapter_name: str = "cosine",
    target_kinds: Sequence[str] = ("linear", "conv2d", "norm"),
    max_grad_norm: Optional[float] = 1.0,
    seed: Optional[int] = None,
    svd_cache=None,
    progress: bool = True,
) -> list[float]:
    """Add the spectral adapter `adapter_name` to the pipeline's denoiser (`denoiser_of(pipe)`) and train it on
    (`image`, `prompt`).

    The adapter stays loaded and active (the pipeline now reconstructs the image from `prompt`); save it with
    `save_spectral_shift(path, {"unet": pipe.unet}, adapter_name)` (`"transformer"` for SD3 / Flux), remove it
    with `unload_spectral_shift`.

    Args:
        pipe: a Stable Diffusion 1.x/2.x, SDXL, SD3 / SD3.5 or Flux.1 pipeline with a float32 denoiser.
        image (`PIL.Image.Image`): RGB, sides multiples of the VAE factor (see `prepare_image`).
        prompt (`str`): the source prompt describing the image.
        max_train_steps (`int`, defaults to 300): optimizer steps, batch 1.
        learning_rate (`float`, defaults to 1e-3): learning rate of 2-D/4-D shifts.
        learning_rate_1d (`float`, defaults to 1e-6): learning rate of 1-D (norm) shifts.
        adapter_name (`str`, defaults to "cosine"): must not be in use.
        target_kinds (`list[str]`, defaults to linear, conv2d, norm): module kinds of the denoiser to shift.
        max_grad_norm (`float`, *optional*, defaults to 1.0): gradient clipping (None: off).
        seed (`int`, *optional*): seeds the noise, timesteps and VAE samples of every step.
        svd_cache: folder, `False` or `None` (the default cache), as in `add_spectral_shift`.
        progress (`bool`, defaults to `True`): show a progress bar.

    Returns:
        `list[float]`: the loss of each step.
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    name, denoiser = denoiser_of(pipe)
    if denoiser.dtype != torch.float32:
        raise ValueError(f"Fine-tuning needs a float32 {name} (δ trains against the float32 base weights, as in the "
                         f"trainer); this one is {denoiser.dtype}. Load the pipeline in float32.")
    if max_train_steps < 1:
        raise ValueError(f"`max_train_steps` should be a positive integer but the value passed is {max_train_steps}.")
    add_spectral_shift(denoiser, SpectralShiftConfig(target_kinds=list(target_kinds)), adapter_name,
                       svd_cache=svd_cache)
    optimizer = make_optimizer({name: denoiser}, adapter_name, learning_rate, learning_rate_1d)
    family = flow_family(pipe)
    if family is not None:
        frozen = flow_frozen(family, pipe)

        def step_loss(batch, generator):
            return flow_matching_loss(denoiser, frozen, batch, generator)
    else:
        frozen = Frozen(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
                        text_encoder_2=getattr(pipe, "text_encoder_2", None),
                        tokenizer_2=getattr(pipe, "tokenizer_2", None))

        def step_loss(batch, generator):
            return training_loss(denoiser, frozen, batch, generator)
    # λ = 0: the batch holds only the instance sample, so the loss adds no prior term.
    batch = Batch(pixel_values=image_to_tensor(image), prompts=[prompt], num_instance=1, pairs=[None])
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    losses = []
    was_training = denoiser.training
    denoiser.train()
    try:
        with tqdm(range(max_train_steps), desc="Fine-tuning shifts", disable=not progress) as bar:
            for _ in bar:
                loss, parts = step_loss(batch, generator)
                loss.backward()
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(list(trainable_parameters(optimizer)), max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(parts["loss"])
                bar.set_postfix(loss=f"{parts['loss']:.4f}")
    finally:
        denoiser.train(was_training)
    return losses


def denoiser_of(pipe) -> tuple[str, torch.nn.Module]:
    """("transformer", pipe.transformer) for SD3 / Flux pipelines, else ("unet", pipe.unet)."""
    if flow_family(pipe) is not None:
        return "transformer", pipe.transformer
    return "unet", pipe.unet
