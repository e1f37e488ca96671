"""The Gradio page of `svdiff app` (docs/app.md): generate with weight sliders, an interpolation strip, per-block
weights, loading and unloading shifts, training and CoSINE editing. The work itself is `ShiftStudio`'s; this module
only lays out the page and turns `AppInputError`s into messages on it.
"""

from __future__ import annotations

import json
import uuid
from typing import Optional

import gradio as gr
from PIL import Image

from .jobs import TrainingJob
from .studio import BLOCKS, AppInputError, ShiftStudio

MAX_SLOTS = 6  # weight sliders on the page; more shifts can be loaded and driven through the API
WEIGHT_RANGE = (-2.0, 2.0)

INTRO = """# svdiff app — spectral shifts, to look at
Each loaded shift has a weight **inside the ReLU**: a layer's weight becomes U·diag(ReLU(σ + Σᵢ wᵢδᵢ))·Vᵀ, so two
shifts at 0.5 each are not the average of two images but one model whose singular values moved half-way to each.
Weights 0 give the base model exactly."""


DISPLAY_SIZE = 256  # smaller images (the toy world's 64 px) are shown enlarged, pixel for pixel


def _message(text: str, error: bool = False) -> str:
    return f"**Error:** {text}" if error else text


def _shown(image):
    """An image as the page shows it: enlarged by whole pixels (no blur) when smaller than `DISPLAY_SIZE`."""
    factor = DISPLAY_SIZE // max(image.size)
    if factor < 2:
        return image
    return image.resize((image.width * factor, image.height * factor), resample=0)  # 0: nearest neighbour


class AppPage:
    """Builds the page for a `ShiftStudio`; `blocks` is the `gr.Blocks` to launch."""

    def __init__(self, studio: ShiftStudio, default_prompt: str = ""):
        self.studio = studio
        self.default_prompt = default_prompt
        self.jobs: dict[str, TrainingJob] = {}
        self.blocks = self._build()

    # ------------------------------------------------------------------------------------------- handlers
    def _weights(self, names: list[str], values: tuple) -> tuple[dict, dict]:
        weights = {name: values[index] for index, name in enumerate(names[:MAX_SLOTS])}
        blocks = {}
        for index, name in enumerate(names[:MAX_SLOTS]):
            start = MAX_SLOTS + index * len(BLOCKS)
            blocks[name] = dict(zip(BLOCKS, values[start:start + len(BLOCKS)]))
        return weights, (blocks if self.studio.has_blocks else {})

    def generate(self, prompt, seed, steps, guidance, num_images, size, names, *values):
        weights, blocks = self._weights(names, values)
        try:
            images = self.studio.generate(prompt, weights=weights, block_weights=blocks, seed=seed, steps=steps,
                                          guidance=guidance, num_images=num_images, size=size)
        except AppInputError as error:
            return gr.skip(), _message(str(error), error=True)
        described = ", ".join(f"{name} {weight:g}" for name, weight in weights.items()) or "no shift"
        return [_shown(image) for image in images], f"{len(images)} image(s), seed {int(seed)}, weights: {described}."

    def strip(self, prompt, seed, steps, guidance, size, first, second, count):
        try:
            strip = self.studio.interpolation_strip(prompt, first, second, count=count, seed=seed, steps=steps,
                                                    guidance=guidance, size=size)
        except AppInputError as error:
            return gr.skip(), _message(str(error), error=True)
        return [(_shown(image), f"α = {alpha:.2f}") for alpha, image in strip], \
            f"{first} → {second}: weights (1 − α, α), {len(strip)} images, seed {int(seed)}."

    def api_generate(self, prompt: str, seed: float, weights: str, steps: float, guidance: float):
        """The `generate` endpoint: `weights` is JSON, e.g. `{"dog": 0.7, "cat": 0.3}` (unlisted shifts get 0)."""
        try:
            parsed = json.loads(weights) if weights and weights.strip() else {}
            if not isinstance(parsed, dict):
                raise AppInputError('weights should be a JSON object such as {"dog": 0.7}.')
            return self.studio.generate(prompt, weights=parsed, seed=seed, steps=steps or None,
                                        guidance=guidance if guidance not in (None, "") else None)[0]
        except json.JSONDecodeError as error:
            raise gr.Error(f"weights is not valid JSON: {error}") from None
        except AppInputError as error:
            raise gr.Error(str(error)) from None

    def refresh(self):
        """Every control that depends on the loaded shifts, from the studio's current list."""
        names = self.studio.shifts
        shown = names[:MAX_SLOTS]
        sliders = [gr.Slider(visible=index < len(shown), label=f"weight of {shown[index]}" if index < len(shown)
                             else "weight", value=1.0 if index < len(shown) else 0.0) for index in range(MAX_SLOTS)]
        rows = [gr.Row(visible=index < len(shown)) for index in range(MAX_SLOTS)]
        labels = [gr.Markdown(f"`{shown[index]}`" if index < len(shown) else "") for index in range(MAX_SLOTS)]
        listing = ("Loaded: " + ", ".join(f"`{n}`" for n in names)) if names else "No shift is loaded."
        if len(names) > MAX_SLOTS:
            listing += f" (sliders for the first {MAX_SLOTS}; the API takes any.)"
        first = gr.Dropdown(choices=names, value=names[0] if names else None)
        second = gr.Dropdown(choices=names, value=names[1] if len(names) > 1 else None)
        unload = gr.Dropdown(choices=names, value=names[-1] if names else None)
        return [shown, *sliders, *rows, *labels, first, second, unload, listing]

    def load(self, source, upload, name):
        try:
            path = upload if upload else source
            loaded = self.studio.load(path, name or None)
            message = f"Loaded `{loaded}`."
        except AppInputError as error:
            message = _message(str(error), error=True)
        return [*self.refresh(), message]

    def unload(self, name):
        try:
            self.studio.unload(name)
            message = f"Unloaded `{name}`."
        except AppInputError as error:
            message = _message(str(error), error=True)
        return [*self.refresh(), message]

    def start_training(self, files, prompt, name, steps, learning_rate, prior, class_prompt, job_id):
        if job_id in self.jobs and not self.jobs[job_id].status.finished:
            return job_id, _message("A run of this page is still going; cancel it first.", error=True)
        paths = [getattr(f, "name", f) for f in files or []]
        try:
            job = TrainingJob(self.studio, paths, prompt, name=(name or "").strip() or "trained", steps=steps,
                              learning_rate=learning_rate, prior_preservation=prior, class_prompt=class_prompt)
        except AppInputError as error:
            return job_id, _message(str(error), error=True)
        job_id = uuid.uuid4().hex
        self.jobs[job_id] = job.start()
        return job_id, f"Started training `{job.name}` ({job.steps} steps)."

    def cancel_training(self, job_id):
        job = self.jobs.get(job_id)
        if job is None:
            return "No run to cancel."
        job.cancel()
        return job.status.message

    def training_progress(self, job_id):
        """Polled by the page's timer: progress, the newest validation image, the file when done; once a run has
        finished and loaded its shift, the weight sliders are refreshed (one time)."""
        job = self.jobs.get(job_id)
        controls = [gr.skip()] * self._control_count
        if job is None:
            return [gr.skip(), gr.skip(), gr.skip(), *controls]
        status = job.status
        loss = f", loss {status.loss:.4f}" if status.loss is not None else ""
        text = f"**{status.state}** — step {status.step} / {status.total}{loss}. {status.message}"
        image = _shown(Image.open(status.validation_image).convert("RGB")) if status.validation_image else gr.skip()
        download = str(status.weights) if status.weights else gr.skip()
        if status.finished:
            del self.jobs[job_id]  # reported: stop polling it
            if status.state == "done":
                controls = self.refresh()
        return [text, image, download, *controls]

    def edit(self, upload, source_prompt, targets, train_steps, invert, slerp_alpha, seed):
        path = getattr(upload, "name", upload)
        try:
            result = self.studio.edit(path, source_prompt, (targets or "").splitlines(), train_steps=train_steps,
                                      invert=invert, slerp_alpha=slerp_alpha or None, seed=seed)
        except AppInputError as error:
            return gr.skip(), _message(str(error), error=True)
        images = [(_shown(result.source), "input")] + [(_shown(image), prompt) for image, prompt in
                                                        zip(result.images, result.prompts)]
        return images, f"{len(result.images)} edit(s); fine-tuned {len(result.losses)} steps."

    # ---------------------------------------------------------------------------------------------- layout
    def _build(self) -> gr.Blocks:
        studio = self.studio
        with gr.Blocks(title="svdiff app") as blocks:
            gr.Markdown(INTRO)
            names = gr.State([])
            with gr.Tab("Generate"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="Prompt", value=self.default_prompt, elem_id="prompt")
                        with gr.Row():
                            seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                            size = gr.Number(label="Size (px)", value=studio.native_size, precision=0,
                                             elem_id="size")
                            num_images = gr.Slider(1, studio.limits.max_images, value=1, step=1, label="Images")
                        with gr.Row():
                            steps = gr.Slider(1, studio.limits.max_steps, value=studio.default_steps, step=1,
                                              label="Steps")
                            guidance = gr.Slider(0, 15, value=studio.default_guidance, step=0.5, label="Guidance")
                        sliders = [gr.Slider(*WEIGHT_RANGE, value=0.0, step=0.05, label="weight", visible=False,
                                             elem_id=f"weight-{index}") for index in range(MAX_SLOTS)]
                        block_rows, block_labels, block_sliders = [], [], []
                        with gr.Accordion("Per-block weights (style mixing: × the weight above)", open=False,
                                          visible=studio.has_blocks):
                            for index in range(MAX_SLOTS):
                                with gr.Row(visible=False) as row:
                                    block_labels.append(gr.Markdown(""))
                                    block_sliders += [gr.Slider(0, 2, value=1.0, step=0.05, label=block,
                                                                elem_id=f"block-{index}-{block}") for block in BLOCKS]
                                block_rows.append(row)
                        generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Column():
                        gallery = gr.Gallery(label="Images", columns=2, elem_id="images", format="png", height=440)
                        message = gr.Markdown(elem_id="message")
                gr.Markdown("### Interpolation strip\nOne seed, weights (1 − α) and α for two shifts.")
                with gr.Row():
                    first = gr.Dropdown(label="From (α = 0)", choices=[], elem_id="strip-first")
                    second = gr.Dropdown(label="To (α = 1)", choices=[], elem_id="strip-second")
                    count = gr.Slider(2, studio.limits.max_strip, value=5, step=1, label="Images in the strip")
                    strip_button = gr.Button("Interpolate", elem_id="interpolate")
                strip_gallery = gr.Gallery(label="Strip", columns=studio.limits.max_strip, elem_id="strip",
                                           format="png")
                strip_message = gr.Markdown(elem_id="strip-message")
            with gr.Tab("Shifts"):
                with gr.Row():
                    source = gr.Textbox(label="Folder, .safetensors file or Hub repo id", elem_id="shift-source")
                    upload = gr.File(label="…or upload a .safetensors file", file_types=[".safetensors"],
                                     elem_id="shift-upload")
                    name = gr.Textbox(label="Name (optional)", elem_id="shift-name")
                load_button = gr.Button("Load", variant="primary", elem_id="load")
                with gr.Row():
                    unload_choice = gr.Dropdown(label="Loaded shift", choices=[], elem_id="unload-choice")
                    unload_button = gr.Button("Unload", elem_id="unload")
                listing = gr.Markdown(elem_id="listing")
                shift_message = gr.Markdown(elem_id="shift-message")
            with gr.Tab("Train"):
                job_id = gr.State("")
                with gr.Row():
                    with gr.Column():
                        train_files = gr.File(label="Images of the subject", file_count="multiple",
                                              elem_id="train-files")
                        train_prompt = gr.Textbox(label="Instance prompt (e.g. 'a sks circle on a white background')",
                                                  elem_id="train-prompt")
                        train_name = gr.Textbox(label="Name of the new shift", value="trained", elem_id="train-name")
                        with gr.Row():
                            train_steps = gr.Number(label="Steps", value=200, precision=0, elem_id="train-steps")
                            train_lr = gr.Number(label="Learning rate", value=studio.learning_rate)
                        prior = gr.Checkbox(label="Prior preservation (class images from the base model)")
                        class_prompt = gr.Textbox(label="Class prompt (with prior preservation)")
                        with gr.Row():
                            train_button = gr.Button("Train", variant="primary", elem_id="train")
                            cancel_button = gr.Button("Cancel", elem_id="cancel")
                    with gr.Column():
                        progress = gr.Markdown(elem_id="train-progress")
                        validation = gr.Image(label="Latest validation image", type="pil", elem_id="validation",
                                              height=280)
                        download = gr.File(label="The trained shift", elem_id="download")
                timer = gr.Timer(1.0)
            with gr.Tab("Edit (CoSINE)"):
                with gr.Row():
                    with gr.Column():
                        edit_upload = gr.File(label="Image to edit", elem_id="edit-upload")
                        edit_source = gr.Textbox(label="Source prompt (describes the image)", elem_id="edit-source")
                        edit_targets = gr.Textbox(label="Target prompts (one per line)", lines=3,
                                                  elem_id="edit-targets")
                        with gr.Row():
                            edit_steps = gr.Number(label="Fine-tuning steps", value=100, precision=0,
                                                   elem_id="edit-steps")
                            edit_seed = gr.Number(label="Seed", value=0, precision=0)
                        invert = gr.Checkbox(label="Start from the DDIM inversion", value=True)
                        slerp_alpha = gr.Slider(0, 1, value=0, step=0.05, label="Slerp α (0: off)")
                        edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
                    with gr.Column():
                        edits = gr.Gallery(label="Input and edits", columns=3, elem_id="edits", format="png")
                        edit_message = gr.Markdown(elem_id="edit-message")
            with gr.Column(visible=False):  # the `generate` endpoint for scripts and gradio_client
                api_prompt, api_seed = gr.Textbox(), gr.Number(value=0, precision=0)
                api_weights, api_steps, api_guidance = gr.Textbox(), gr.Number(), gr.Number()
                api_image, api_button = gr.Image(type="pil", format="png"), gr.Button()

            controls = [names, *sliders, *block_rows, *block_labels, first, second, unload_choice, listing]
            blocks.load(self.refresh, outputs=controls, api_visibility="private")
            sampling = [prompt, seed, steps, guidance]
            generate.click(self.generate, [*sampling, num_images, size, names, *sliders, *block_sliders],
                           [gallery, message], api_name="generate_page", api_visibility="private")
            strip_button.click(self.strip, [*sampling, size, first, second, count], [strip_gallery, strip_message],
                               api_name="strip", api_visibility="private")
            load_button.click(self.load, [source, upload, name], [*controls, shift_message], api_name="load",
                              api_visibility="private")
            unload_button.click(self.unload, [unload_choice], [*controls, shift_message], api_name="unload",
                                api_visibility="private")
            train_button.click(self.start_training, [train_files, train_prompt, train_name, train_steps, train_lr,
                                                     prior, class_prompt, job_id], [job_id, progress],
                               api_visibility="private")
            cancel_button.click(self.cancel_training, [job_id], [progress], api_visibility="private")
            self._control_count = len(controls)
            timer.tick(self.training_progress, [job_id], [progress, validation, download, *controls],
                       api_visibility="private", show_progress="hidden")
            edit_button.click(self.edit, [edit_upload, edit_source, edit_targets, edit_steps, invert, slerp_alpha,
                                          edit_seed], [edits, edit_message], api_visibility="private")
            api_button.click(self.api_generate, [api_prompt, api_seed, api_weights, api_steps, api_guidance],
                             api_image, api_name="generate")
        return blocks


def build_app(studio: ShiftStudio, default_prompt: str = "") -> gr.Blocks:
    """The app's `gr.Blocks` for a studio (queue it and launch it, or mount it in a FastAPI app)."""
    return AppPage(studio, default_prompt).blocks


def launch(studio: ShiftStudio, *, host: str = "127.0.0.1", port: Optional[int] = None, share: bool = False,
           default_prompt: str = "", block: bool = True):
    """Serve the app; returns the `gr.Blocks` (with `block=False`, at once, the server running in a thread)."""
    blocks = build_app(studio, default_prompt)
    blocks.queue(default_concurrency_limit=2)
    blocks.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block,
                  allowed_paths=[str(studio.work_dir)], footer_links=["api", "gradio"])
    return blocks
