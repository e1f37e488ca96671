"""The training loop: `train(args)` with the options of `add_train_arguments` (the example script and
``svdiff train`` are thin wrappers around it)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..format import DEFAULT_WEIGHT_NAME
from ..loaders import add_spectral_shift, save_spectral_shift
from ..tuner import SpectralShiftConfig
from .attention import CrossAttentionStore, install_attention_recorders
from svdiff_cli.train_options import check_train_arguments
from .checkpoint import load_checkpoint, recover_checkpoints, resolve_checkpoint, save_checkpoint
from .data import DreamBoothData
from .images import ImageTransform, load_images
from .flow import flow_matching_loss
from .joint_attention import install_joint_attention_recorders
from .loss import training_loss
from .optim import ShiftAverage, make_optimizer, shift_parameters, trainable_parameters
from .publish import push_output, run_validation
from .sharding import (
    accelerate_without_fsdp,
    average_gradients,
    release_inference_weights,
    shard_models,
    sharding_plan,
    sharding_requested,
)
from .prepare import (
    FLOW_FAMILIES,
    base_family,
    build_subjects,
    load_components,
    prepare_class_images,
    svd_cache_option,
    target_kinds,
)


logger = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `train`: raised after the checkpoint of the last completed step was saved.

    Attributes:
        checkpoint (`Path`, *optional*): the checkpoint saved (None on processes other than the main one, and when
            a second Ctrl-C stopped the step midway, so nothing consistent could be saved).
        global_step (`int`): the last completed step.
    """

    def __init__(self, checkpoint: Optional[Path], global_step: int) -> None:
        super().__init__(f"Training interrupted at step {global_step}.")
        self.checkpoint = checkpoint
        self.global_step = global_step


class _StopNow(KeyboardInterrupt):
    """A second Ctrl-C, raised wherever the step was."""


class _DeferredInterrupt:
    """While active, a first Ctrl-C only sets `requested`: the loop stops at the end of the step, so the checkpoint
    holds a finished step (an optimizer step cut in half could not be resumed exactly). A second Ctrl-C raises
    `KeyboardInterrupt` at once."""

    def __init__(self) -> None:
        self.requested = False

    def handle(self, signum, frame) -> None:
        if self.requested:
            raise _StopNow
        self.requested = True
        logger.warning("Ctrl-C: finishing this step, then saving a checkpoint (press Ctrl-C again to stop now, "
                       "without saving).")

    @contextlib.contextmanager
    def installed(self) -> Iterator["_DeferredInterrupt"]:
        # Only Python's own handler is replaced, and only from the main thread (where signal handlers run).
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield self
            return
        signal.signal(signal.SIGINT, self.handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _step_generator(seed: Optional[int], process_index: int, micro_step: int) -> torch.Generator:
    # One generator per micro-step and process: the data, noise and timesteps of step k do not depend on how the
    # run got there, so an interrupted and resumed run draws exactly what an uninterrupted one draws.
    base = 0 if seed is None else seed
    return torch.Generator().manual_seed((base * 1_000_003 + process_index * 7_919 + micro_step) % (2**63))


# ------------------------------------------------------------------------------------------------ train
def train(args: argparse.Namespace, step_callback: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train spectral shifts; returns a summary (paths, steps, last losses). See docs/training.md.

    Raises `ValueError` for options out of range before anything is loaded, and `TrainingInterrupted` (a
    `KeyboardInterrupt`) after Ctrl-C, once the checkpoint of the last completed step is saved. `step_callback(step,
    logs)` is called after every completed step (and its validation) with the step's losses and learning rate (a
    progress display); a `KeyboardInterrupt` raised from it stops the run as Ctrl-C does, with a checkpoint of that
    step.
    """
    check_train_arguments(args)
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    if args.seed is None:
        args.seed = int(torch.randint(0, 2**31 - 1, (1,)))
    _forget_previous_run()
    report_to = _available_tracker(args.report_to)
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir,
                                                                                         args.logging_dir))
    # An FSDP launch: the trainer shards the base weights itself (`sharding.py`); accelerate runs plain processes.
    plan = sharding_plan() if sharding_requested() else None
    with accelerate_without_fsdp() if plan else contextlib.nullcontext():
        accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                                  mixed_precision=args.mixed_precision, log_with=report_to, project_config=project)
    sharded = plan is not None and accelerator.num_processes > 1
    set_seed(args.seed)
    subjects = build_subjects(args)
    # Read (and check) the instance images before anything is written or loaded.
    instance_images = [load_images(s.instance_data_dir, what="instance image") for s in subjects]
    family = base_family(args)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        for restored in recover_checkpoints(args.output_dir):
            logger.warning("Restored %s, which a crashed run had left half-replaced.", restored)
    accelerator.wait_for_everyone()
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if args.resume_from_checkpoint and checkpoint is None:
        logger.warning("No checkpoint found in %s; starting a new run.", args.output_dir)

    transform = ImageTransform(args.resolution, center_crop=args.center_crop, random_flip=args.random_flip)
    class_images = prepare_class_images(args, subjects, accelerator)
    data = DreamBoothData(subjects, transform, cutmix_prob=args.cutmix_prob,
                          with_prior_preservation=args.with_prior_preservation, class_images=class_images,
                          instance_images=instance_images)

    denoiser_name, denoiser, frozen = load_components(args, family)
    name = args.adapter_name
    cache = svd_cache_option(args)
    spectral_rank = getattr(args, "spectral_rank", None)  # None: the full spectrum
    add_spectral_shift(denoiser, SpectralShiftConfig(target_kinds=target_kinds(args.unet_target_kinds),
                                                     norm_mode=args.norm_mode, spectral_rank=spectral_rank),
                       name, svd_cache=cache)
    trained = {denoiser_name: denoiser}
    if args.train_text_encoder:
        text_config = SpectralShiftConfig(target_kinds=target_kinds(args.text_encoder_target_kinds),
                                          norm_mode=args.norm_mode, spectral_rank=spectral_rank)
        for component in frozen.trainable_text_encoders:
            model = frozen.text_encoders[component]
            add_spectral_shift(model, text_config, name, svd_cache=cache)
            trained[component] = model
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for component in trained:
            if component != denoiser_name:
                trained[component].gradient_checkpointing_enable()
    store = None
    if args.unmix_weight > 0 and len(subjects) > 1:
        store = CrossAttentionStore()
        if family in FLOW_FAMILIES:
            install_joint_attention_recorders(denoiser, store, family)
        else:
            install_attention_recorders(denoiser, store)

    scale = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes if args.scale_lr \
        else 1
    optimizer = make_optimizer(trained, name, args.learning_rate * scale, args.learning_rate_1d * scale,
                               betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                               eps=args.adam_epsilon, use_8bit_adam=args.use_8bit_adam,
                               step_scale=args.shift_step_scale)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)

    # Frozen models in the autocast precision; the trained models keep fp32 base weights (fingerprints, exact δ=0).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    frozen.vae.to(accelerator.device, dtype=weight_dtype)
    for component, model in frozen.text_encoders.items():
        if component not in trained:
            model.to(accelerator.device, dtype=weight_dtype)
    if sharded:
        blocks = shard_models(trained, accelerator.device, accelerator.num_processes, plan)
        logger.info("FSDP: sharded %s", {component: len(names) for component, names in blocks.items()})
        wrapped = dict(trained)
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    else:
        components = list(trained)
        prepared = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
        wrapped = dict(zip(components, prepared[: len(components)]))
        optimizer, lr_scheduler = prepared[len(components):]
    denoiser = wrapped[denoiser_name]
    models = {component: accelerator.unwrap_model(model) for component, model in wrapped.items()}
    # The loss calls the (DDP-wrapped) trained text encoders.
    for component in trained:
        if component != denoiser_name:
            setattr(frozen, component, wrapped[component])

    def step_loss(batch, generator):
        if family in FLOW_FAMILIES:
            return flow_matching_loss(denoiser, frozen, batch, generator, prior_loss_weight=args.prior_loss_weight,
                                      unmix_weight=args.unmix_weight, store=store,
                                      train_text_encoder=args.train_text_encoder)
        return training_loss(denoiser, frozen, batch, generator, prior_loss_weight=args.prior_loss_weight,
                             unmix_weight=args.unmix_weight, store=store, train_text_encoder=args.train_text_encoder)

    average = None
    if args.ema_decay > 0:
        named = [pair for group in shift_parameters(models, name).values() for pair in group]
        average = ShiftAverage(named, args.ema_decay)
    global_step = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, models, name, optimizer, lr_scheduler, average=average)
        global_step = int(state["global_step"])
        accelerator.print(f"Resumed from {checkpoint} at step {global_step}.")

    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("svdiff-dreambooth", config=config)

    def checkpoint_now(step: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            path = save_checkpoint(args.output_dir, step, models, name, optimizer, lr_scheduler,
                                   extra={"seed": args.seed}, total_limit=args.checkpoints_total_limit,
                                   average=average)
            logger.info("Saved %s", path)

    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    history: list[dict] = []
    accumulation = args.gradient_accumulation_steps
    for model in trained.values():
        model.train()
    interrupt = _DeferredInterrupt()
    try:
        with interrupt.installed():
            while global_step < args.max_train_steps:
                if interrupt.requested:
                    raise KeyboardInterrupt
                parts_sum: dict[str, float] = {}
                for micro in range(accumulation):
                    generator = _step_generator(args.seed, accelerator.process_index,
                                                global_step * accumulation + micro)
                    batch = data.sample(args.train_batch_size, generator)
                    with accelerator.accumulate(*wrapped.values()):
                        with accelerator.autocast():
                            loss, parts = step_loss(batch, generator)
                        accelerator.backward(loss)
                        if sharded and accelerator.sync_gradients:
                            average_gradients(trainable_parameters(optimizer), accelerator.num_processes)
                        if accelerator.sync_gradients and args.max_grad_norm:
                            accelerator.clip_grad_norm_(list(trainable_parameters(optimizer)), args.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        if average is not None and accelerator.sync_gradients:
                            average.update()
                    for key, value in parts.items():
                        parts_sum[key] = parts_sum.get(key, 0.0) + value / accumulation
                global_step += 1
                progress.update(1)
                logs = {**parts_sum, "lr": lr_scheduler.get_last_lr()[0]}
                progress.set_postfix(loss=f"{parts_sum['loss']:.4f}")
                accelerator.log(logs, step=global_step)
                history.append(logs)
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    checkpoint_now(global_step)
                if args.validation_prompt and args.validation_steps and global_step % args.validation_steps == 0:
                    if accelerator.is_main_process or sharded:  # sharded: every process runs the models
                        with average.applied() if average is not None else contextlib.nullcontext():
                            run_validation(args, accelerator, models, frozen, global_step,
                                           save=accelerator.is_main_process)
                    if sharded:
                        release_inference_weights(models)
                if step_callback is not None:
                    step_callback(global_step, logs)
    except KeyboardInterrupt as error:
        progress.close()  # ends the bar's line, so what follows is not printed onto it
        saved = None
        if not isinstance(error, _StopNow):  # else a second Ctrl-C cut a step short: nothing consistent to save
            accelerator.print(f"Interrupted: saving a checkpoint at step {global_step} before exiting.")
            if accelerator.is_main_process:
                saved = save_checkpoint(args.output_dir, global_step, models, name, optimizer, lr_scheduler,
                                        extra={"seed": args.seed, "interrupted": True},
                                        total_limit=args.checkpoints_total_limit, average=average)
        accelerator.end_training()
        raise TrainingInterrupted(saved, global_step) from error
    progress.close()

    accelerator.wait_for_everyone()
    if average is not None:
        average.copy_to_parameters()  # the run's result is the average (the models returned hold it too)
    weights_path = Path(args.output_dir) / DEFAULT_WEIGHT_NAME
    if accelerator.is_main_process:
        save_spectral_shift(weights_path, models, name,
                            base_model=args.base_model_id or args.pretrained_model_name_or_path,
                            base_revision=args.revision)
        if args.push_to_hub:
            push_output(args, subjects)
    accelerator.end_training()
    return {"weights": str(weights_path), "global_step": global_step, "history": history, "models": models}


def _forget_previous_run() -> None:
    # accelerate keeps its state (mixed precision, ...) in a process-wide singleton: a second `train()` in the same
    # process (tests, `svdiff train` called from Python) with other options would be refused. The distributed part
    # (PartialState, the process group) is kept.
    from accelerate.state import AcceleratorState

    if getattr(AcceleratorState, "_shared_state", None) and hasattr(AcceleratorState, "_reset_state"):
        AcceleratorState._reset_state()


def _available_tracker(report_to: Optional[str]):
    if not report_to or report_to == "none":
        return None
    import importlib.util

    wanted = ["tensorboard", "wandb"] if report_to == "all" else [report_to]
    found = [t for t in wanted if importlib.util.find_spec(t if t != "tensorboard" else "tensorboard") is not None]
    for missing in set(wanted) - set(found):
        logger.warning("--report_to %s: %s is not installed; not logging to it.", report_to, missing)
    return found or None


def main(args: Optional[argparse.Namespace] = None) -> dict:
    """Entry point for ``svdiff train`` and the example script: parse (if needed) and train."""
    from svdiff_cli.train_options import parse_args

    if args is None:
        args = parse_args()
    return train(args)
