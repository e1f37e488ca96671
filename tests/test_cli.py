"""The `svdiff` command on bad input, faults and interruptions: one `svdiff <cmd>: error: ...` line and exit 1 (130
for Ctrl-C), never a traceback, with the files on disk left as they were; its help and the docs' example."""

import _thread
import json
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import svdiff_adapter as sa
from svdiff_adapter.cli import SUBCOMMANDS, build_parser, main
from svdiff_adapter.training import list_checkpoints, parse_args, train

from .hub_fixtures import run_python
from .tiny_models import tiny_pipeline, tiny_unet


ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 32


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd-cli")
    tiny_pipeline().save_pretrained(folder)
    return str(folder)


def write_images(folder, count=2, size=(40, 48)):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return str(folder)


def png_header(path, width, height):
    """A PNG whose header declares `width`×`height` pixels and that holds none: what a decompression bomb looks like
    to a reader that checks the size before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                           + chunk(b"IEND", b""))
    return str(path)


def train_argv(model_dir, output_dir, instance_dir, *extra):
    return ["train", "--pretrained_model_name_or_path", model_dir, "--output_dir", str(output_dir),
            "--instance_data_dir", instance_dir, "--instance_prompt", "a photo of sks dog",
            "--resolution", str(RESOLUTION), "--seed", "7", "--report_to", "none", *map(str, extra)]


def error_line(capsys, command):
    """The one line `svdiff <command>` printed on stderr (asserting it is the CLI's error line, not a traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith(f"svdiff {command}: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ help
@pytest.mark.slow
def test_help_imports_neither_torch_nor_diffusers():
    """`svdiff --help`, `svdiff inspect --help`, `svdiff train --help` and `svdiff edit --help` run the console
    script's entry point (`svdiff_cli.main`) without importing torch, diffusers, transformers, PEFT — or
    `svdiff_adapter`, whose import registers the tuner with PEFT."""
    code = """
import contextlib, io, sys
from svdiff_cli import main
for argv in (["--help"], ["inspect", "--help"], ["train", "--help"], ["edit", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)
print("HEAVY", sorted(m for m in sys.modules
                      if m.split(".")[0] in ("torch", "diffusers", "transformers", "peft", "svdiff_adapter")))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout


def test_train_and_edit_help_show_defaults(capsys):
    for command, expected in (("train", ["--max_train_steps", "(default: 500)", "(default: 0.001)"]),
                              ("edit", ["--num_inference_steps", "(default: 50)", "(default: 300)"])):
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert all(item in text for item in expected), (command, text)
        assert "(default: None)" not in text and "(default: False)" not in text


def test_the_python_examples_of_docs_tools_md_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "tools.md").read_text(), re.S)
    assert blocks
    before = dict(SUBCOMMANDS)
    try:
        for block in blocks:
            exec(compile(block, "docs/tools.md", "exec"), {"__name__": "docs_tools_example"})
        added = set(SUBCOMMANDS) - set(before)
        assert added and all(name in build_parser().format_help() for name in added)
    finally:
        for name in set(SUBCOMMANDS) - set(before):
            del SUBCOMMANDS[name]
    assert "hello, spectral shifts" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ train
@pytest.mark.parametrize("option, value, message", [
    ("--train_batch_size", "0", "--train_batch_size should be >= 1, got 0"),
    ("--max_train_steps", "-1", "--max_train_steps should be >= 1, got -1"),
    ("--checkpointing_steps", "-1", "--checkpointing_steps should be >= 0, got -1"),
    ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps should be >= 1, got 0"),
    ("--learning_rate", "nan", "--learning_rate should be > 0, got nan"),
    ("--cutmix_prob", "1.5", "--cutmix_prob should be in [0, 1], got 1.5"),
])
def test_train_refuses_numbers_out_of_range_naming_the_option(tmp_path, capsys, option, value, message):
    # The model is never loaded: the options are checked first (a path that does not exist proves it).
    argv = train_argv(str(tmp_path / "no-model"), tmp_path / "out", write_images(tmp_path / "dog"), option, value)
    assert main(argv) == 1
    assert error_line(capsys, "train") == f"svdiff train: error: {message}."
    assert not (tmp_path / "out").exists()


def test_train_refuses_huge_and_extreme_images_naming_file_and_size(tmp_path, capsys):
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    png_header(bomb / "huge.png", 20000, 20000)
    assert main(train_argv(str(tmp_path / "no-model"), tmp_path / "out", str(bomb))) == 1
    line = error_line(capsys, "train")
    assert "huge.png" in line and "400,000,000 pixels" in line and "downscale" in line
    # Between PIL's limit and twice it PIL only warns, and would decode 100 million pixels.
    png_header(bomb / "huge.png", 10000, 10000)
    assert main(train_argv(str(tmp_path / "no-model"), tmp_path / "out", str(bomb))) == 1
    assert "huge.png' is too large (100,000,000 pixels" in error_line(capsys, "train")

    strip = tmp_path / "strip"
    write_images(strip, count=1, size=(4000, 2))
    assert main(train_argv(str(tmp_path / "no-model"), tmp_path / "out", str(strip))) == 1
    line = error_line(capsys, "train")
    assert "0.png" in line and "4000×2" in line and "factor of at most 4" in line
    assert not (tmp_path / "out").exists()


def test_ctrl_c_in_train_saves_says_how_to_resume_and_resumes_exactly(tiny_model_dir, tmp_path, capsys):
    instance = write_images(tmp_path / "dog")
    out = tmp_path / "out"
    stop = threading.Event()

    def press_ctrl_c_after_first_checkpoint():
        while not stop.is_set():
            if (out / "checkpoint-1").is_dir():
                _thread.interrupt_main()
                return
            time.sleep(0.05)

    # A shell may start background jobs with SIGINT ignored; Ctrl-C needs Python's handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher = threading.Thread(target=press_ctrl_c_after_first_checkpoint, daemon=True)
    watcher.start()
    try:
        code = main(train_argv(tiny_model_dir, out, instance, "--max_train_steps", 50, "--checkpointing_steps", 1))
    finally:
        stop.set()
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    latest = list_checkpoints(out)[-1]
    line = error_line(capsys, "train")
    assert str(latest) in line and "--resume_from_checkpoint latest" in line
    state = json.loads((latest / "state.json").read_text())
    assert state.get("interrupted") is True and state["global_step"] >= 1
    assert not (out / sa.DEFAULT_WEIGHT_NAME).exists()

    steps = state["global_step"] + 1
    assert main(train_argv(tiny_model_dir, out, instance, "--max_train_steps", steps, "--checkpointing_steps", 1,
                           "--resume_from_checkpoint", "latest")) == 0
    # The interrupted step was finished before saving: the resumed run ends with the δ of an uninterrupted one.
    reference = train(parse_args(train_argv(tiny_model_dir, tmp_path / "reference", instance, "--max_train_steps",
                                            steps, "--checkpointing_steps", 0)[1:]))
    resumed = sa.load_shift_file(out / sa.DEFAULT_WEIGHT_NAME).deltas["unet"]
    uninterrupted = sa.load_shift_file(reference["weights"]).deltas["unet"]
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)


def test_resuming_from_a_damaged_or_pickled_checkpoint_is_an_error_line(tiny_model_dir, tmp_path, capsys):
    import pickle
    import shutil

    instance = write_images(tmp_path / "dog")
    out = tmp_path / "out"
    assert main(train_argv(tiny_model_dir, out, instance, "--max_train_steps", 1, "--checkpointing_steps", 1)) == 0
    checkpoint = out / "checkpoint-1"
    pickled = shutil.copytree(checkpoint, tmp_path / "pickled")
    (pickled / "optimizer.safetensors").unlink()
    (pickled / "optimizer.pt").write_bytes(pickle.dumps({"state": {}, "param_groups": []}))
    truncated = shutil.copytree(checkpoint, tmp_path / "truncated")
    data = (truncated / "shifts.safetensors").read_bytes()
    (truncated / "shifts.safetensors").write_bytes(data[:100])
    capsys.readouterr()
    for damaged, names in ((pickled, ["no optimizer.safetensors", "optimizer.pt"]),
                           (truncated, ["shifts.safetensors is damaged or truncated"])):
        assert main(train_argv(tiny_model_dir, out, instance, "--max_train_steps", 2,
                               "--resume_from_checkpoint", str(damaged))) == 1
        line = error_line(capsys, "train")
        assert str(damaged) in line and all(name in line for name in names), line
    assert sorted(p.name for p in out.iterdir() if p.name != "logs") == ["checkpoint-1", sa.DEFAULT_WEIGHT_NAME]


@pytest.mark.slow
def test_an_uncached_hub_id_while_offline_says_so(tmp_path):
    """HF_HUB_OFFLINE must be set before diffusers is imported: a subprocess, with an empty Hub cache."""
    image = tmp_path / "dog" / "0.png"
    write_images(image.parent, count=1)
    code = f"""
import sys
from svdiff_adapter.cli import main
codes = [main({train_argv("nobody/made-up-model", tmp_path / "out", str(image.parent))!r}),
         main(["edit", "--pretrained_model_name_or_path", "nobody/made-up-model", "--image", {str(image)!r},
               "--target_prompt", "a cat", "--output_dir", {str(tmp_path / "edit")!r}, "--device", "cpu"])]
print("CODES", codes)
"""
    result = run_python(code, extra_env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")},
                        timeout=300, check=False)
    assert "CODES [1, 1]" in result.stdout, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for command in ("train", "edit"):
        line = next(line for line in result.stderr.splitlines() if line.startswith(f"svdiff {command}: error:"))
        assert "'nobody/made-up-model' is not a local folder and is not in the local Hub cache" in line
        assert "offline (HF_HUB_OFFLINE=1)" in line


# ------------------------------------------------------------------------------------------------ edit
def test_edit_refuses_bad_options_devices_and_images_before_loading(tmp_path, capsys):
    image = Path(write_images(tmp_path / "photo", count=1, size=(32, 32))) / "0.png"
    # A model that does not exist: every refusal below must come before it is loaded.
    common = ["edit", "--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--source_prompt", "a cat",
              "--target_prompt", "a dog", "--output_dir", str(tmp_path / "out")]
    missing_device = f"cuda:{torch.cuda.device_count()}"  # no CUDA at all, or one index past the last GPU
    cases = [
        (["--image", str(image), "--num_inference_steps", "0"], "`num_inference_steps` should be >= 1"),
        (["--image", str(image), "--eta", "-1"], "`eta` should be >= 0"),
        (["--image", str(image), "--device", missing_device], f"Device '{missing_device}': this machine has"),
        (["--image", str(image), "--device", "gpu"], "Device 'gpu' is not a torch device name"),
        (["--image", png_header(tmp_path / "huge.png", 20000, 20000)], "huge.png' is too large (400,000,000 pixels"),
    ]
    Image.new("RGB", (4000, 2)).save(tmp_path / "strip.png")
    cases.append((["--image", str(tmp_path / "strip.png")], "strip.png' is 4000×2"))
    for extra, message in cases:
        assert main(common + extra) == 1, extra
        assert message in error_line(capsys, "edit"), extra
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ writing files
def shift_file(tmp_path, name="shift.safetensors"):
    unet = sa.add_spectral_shift(tiny_unet(), sa.SpectralShiftConfig(init_scale=0.1), "a", svd_cache=False)
    path = tmp_path / name
    sa.save_spectral_shift(path, {"unet": unet}, "a")
    return path


@pytest.mark.slow
def test_merge_onto_a_full_disk_is_an_error_line_and_keeps_the_old_file(tmp_path):
    """The write fails as on a full disk (RLIMIT_FSIZE makes it fail with EFBIG): one error line, exit 1, the file
    that was there before is intact and no temporary file is left."""
    source = shift_file(tmp_path)
    target = tmp_path / "out" / "merged.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"the previous file")
    limit = (
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "  # EFBIG instead of a kill
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY)); "
    )
    code = limit + f"from svdiff_adapter.cli import main; print('CODE', main(['merge', {str(source)!r}, " \
                   f"{str(source)!r}, '-o', {str(target)!r}, '--overwrite']))"
    result = run_python(code, timeout=300, check=False)
    assert "CODE 1" in result.stdout and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = next(line for line in result.stderr.splitlines() if line.startswith("svdiff merge: error: "))
    assert str(target.parent) in line and "File too large" in line
    assert target.read_bytes() == b"the previous file"
    assert [p.name for p in target.parent.iterdir()] == ["merged.safetensors"]


def test_outputs_below_a_file_or_onto_a_file_are_clear(tmp_path, capsys):
    source = shift_file(tmp_path)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    for command in (["merge", str(source), str(source)], ["convert", str(source), "--drop-norms"]):
        assert main(command + ["-o", str(blocker / "out.safetensors")]) == 1
        assert error_line(capsys, command[0]).endswith(f"Cannot write {blocker / 'out.safetensors'}: {blocker} is a "
                                                       "file, not a folder.")
    # v1 → svdiff-pytorch writes a folder: onto an existing file it refuses, even with --overwrite.
    assert main(["convert", str(source), "--drop-norms", "-o", str(blocker), "--overwrite"]) == 1
    assert "is a file, but svdiff-pytorch's shifts are a folder" in error_line(capsys, "convert")
    assert blocker.read_text() == "not a folder"
    # svdiff-pytorch → v1 onto an existing file without a suffix: that file is the output.
    legacy = ROOT / "tests" / "fixtures" / "svdiff_pytorch"
    existing = tmp_path / "converted"
    existing.write_text("old")
    argv = ["convert", str(legacy), "--base", str(legacy / "base"), "-o", str(existing)]
    assert main(argv) == 1 and "exists; pass overwrite=True" in error_line(capsys, "convert")
    assert main(argv + ["--overwrite"]) == 0
    assert sa.load_shift_file(existing).source == "v1"
