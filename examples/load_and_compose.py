"""Load two spectral shifts from a (local) Hub and compose them inside the ReLU, on a tiny random pipeline.

No network: the Hub is the local Hub-compatible server of tests/hub_server.py on 127.0.0.1, reached through the real
huggingface_hub code (push with `push_spectral_shift_to_hub`, pull into the Hub cache with `load_spectral_shift`).
Writes outputs/load_and_compose.png (columns: base, a = 0, .25, .5, .75, 1) and outputs/load_and_compose.json
(`--out DIR` for another folder); exits with an error if a check fails.

    python examples/load_and_compose.py       # from the repository root, ~10 seconds on 2 CPU cores

The images are noise (random weights); what matters are the checks it prints:
a = 1 gives exactly the image of "dog" alone, a = 0 that of "cat" alone, and weights (1, 1) give the model of the
single shift δ_dog + δ_cat (the sum inside the ReLU).
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# The Hub endpoint must be set before huggingface_hub is imported.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.hub_server import LocalHubServer  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="svdiff-compose-"))
TOKEN = "hf_demo_token"
SERVER = LocalHubServer(root=str(WORK / "hub"), tokens={TOKEN: "demo"}).start()
os.environ.update({"HF_ENDPOINT": SERVER.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                   "HF_HOME": str(WORK / "hf_home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"})

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import svdiff_adapter as sa  # noqa: E402
from tests.tiny_models import tiny_pipeline  # noqa: E402


def make_shift(pipe, seed: int) -> dict:
    """A stand-in for a trained shift: δ = -0.6·σ·u (u uniform in [0, 1.5)) on the UNet's attention projections."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attn" in name:
            sigma = torch.linalg.svdvals(module.weight.detach().double()).float()
            deltas[name] = -0.6 * sigma * 1.5 * torch.rand(sigma.shape, generator=generator)
    return {"unet": deltas}


def generate(pipe) -> np.ndarray:
    image = pipe("a sks dog", num_inference_steps=2, guidance_scale=3.0, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(42)).images[0]
    return (image * 255).round().astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the PNG grid and the JSON")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    shifts = {"dog": make_shift(tiny_pipeline(), 1), "cat": make_shift(tiny_pipeline(), 2)}
    for name, deltas in shifts.items():  # publish both shifts on the local Hub
        author = tiny_pipeline(sa.StableDiffusionPipeline)
        author.load_spectral_shift(deltas, name)
        author.push_spectral_shift_to_hub(f"demo/{name}", token=TOKEN, instance_prompt=f"a sks {name}",
                                          base_model="tiny-random")

    pipe = tiny_pipeline(sa.StableDiffusionPipeline)
    base = generate(pipe)
    for name in shifts:  # downloaded through hf_hub_download into the Hub cache
        pipe.load_spectral_shift(f"demo/{name}", adapter_name=name)
    columns = [("base", base)]
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        pipe.set_adapters(["dog", "cat"], weights=[a, 1 - a])  # ReLU(σ + a·δ_dog + (1−a)·δ_cat)
        columns.append((f"a={a}", generate(pipe)))

    checks = {}
    for name, column in (("dog", "a=1.0"), ("cat", "a=0.0")):
        single = tiny_pipeline(sa.StableDiffusionPipeline)
        single.load_spectral_shift(f"demo/{name}", adapter_name=name)
        checks[f"{column} equals {name} alone"] = bool(np.array_equal(generate(single), dict(columns)[column]))
    pipe.set_adapters(["dog", "cat"], weights=[1.0, 1.0])
    summed = tiny_pipeline(sa.StableDiffusionPipeline)  # one shift δ_dog + δ_cat, summed here by hand
    summed.load_spectral_shift({"unet": {k: v + shifts["cat"]["unet"][k] for k, v in shifts["dog"]["unet"].items()}})
    difference = np.abs(generate(pipe).astype(int) - generate(summed).astype(int)).max()
    checks["weights (1, 1) equal the summed shift (max pixel difference ≤ 1)"] = bool(difference <= 1)

    grid = Image.new("RGB", (64 * len(columns), 64))
    for index, (_, image) in enumerate(columns):
        grid.paste(Image.fromarray(image), (64 * index, 0))
    grid.save(out / "load_and_compose.png")
    summary = {"columns": [label for label, _ in columns], "checks": checks}
    (out / "load_and_compose.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    SERVER.stop()
    if not all(checks.values()):
        raise SystemExit("a check failed")


if __name__ == "__main__":
    main()
