"""`svdiff app` end to end in a real headless Chromium (Debian's `chromium`, driven by Playwright; no browser
download), against the app served on loopback with the bundled toy world: the page loads, generates, a weight
slider changes the image, an interpolation strip runs, a bad shift file and an empty prompt get messages, and the
`generate` endpoint serves scripts through `gradio_client`.

`SVDIFF_APP_SCREENSHOTS=docs/images` writes the screenshots that docs/app.md shows.
"""

import io
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import svdiff_adapter as sa
from svdiff_adapter import toyworld as tw
from svdiff_adapter.app import TOY_PROMPT, open_studio

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the browser tests: install Debian's chromium (make browser).")
    pytest.skip("Debian's chromium is not installed (make browser installs it)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")

TIMEOUT_MS = 120_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("SVDIFF_APP_SCREENSHOTS")
    return Path(folder) if folder else tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, studio, a second shift's folder): the app on a free loopback port."""
    from svdiff_adapter.app.ui import launch

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    studio = open_studio(work_dir=tmp_path_factory.mktemp("app"), svd_cache=tmp_path_factory.mktemp("svd"))
    shipped = sa.load_shift_file(tw.ASSETS_DIR / "shifts" / "dotted_square" / sa.DEFAULT_WEIGHT_NAME)
    for component, deltas in shipped.deltas.items():
        shipped.deltas[component] = {name: -0.5 * delta for name, delta in deltas.items()}
    second = tmp_path_factory.mktemp("second") / "reversed"
    sa.save_shift_file(shipped, second / sa.DEFAULT_WEIGHT_NAME)
    port = free_port()
    blocks = launch(studio, host="127.0.0.1", port=port, default_prompt=TOY_PROMPT, block=False)
    yield f"http://127.0.0.1:{port}/", studio, second
    blocks.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served):
    page = browser.new_page(viewport={"width": 1300, "height": 1100})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(served[0])
    page.wait_for_selector("#weight-0", state="visible")
    yield page
    page.close()


def image_bytes(page, url: str, selector: str, index: int = 0) -> bytes:
    source = page.locator(f"{selector} img").nth(index).get_attribute("src")
    return page.request.get(source if source.startswith("http") else url.rstrip("/") + "/" + source.lstrip("/")).body()


def set_slider(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def generate(page, expect: str) -> None:
    page.click("#generate")
    page.wait_for_function(f"document.querySelector('#message').innerText.includes({expect!r})")


def shown_pixels(data: bytes) -> np.ndarray:
    """The page's enlarged image back at the model's 64 px (every 4th pixel of a nearest-neighbour enlargement)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    factor = image.width // 64
    return np.asarray(image)[::factor, ::factor]


def test_the_page_generates_and_a_weight_slider_changes_the_image(page, served, screenshots):
    url, studio, _ = served
    assert "dotted_square" in page.locator("#weight-0").inner_text()
    set_slider(page, "weight-0", 1)
    generate(page, "dotted_square 1")
    with_shift = image_bytes(page, url, "#images")
    expected = studio.generate(TOY_PROMPT, weights={"dotted_square": 1.0})[0]
    assert np.array_equal(shown_pixels(with_shift), np.asarray(expected))  # what the page shows is the model's image
    page.wait_for_timeout(500)  # let the images fade in before the picture is taken
    page.screenshot(path=str(screenshots / "app-generate.png"), full_page=True)
    set_slider(page, "weight-0", 0)
    generate(page, "dotted_square 0")
    without = image_bytes(page, url, "#images")
    assert not np.array_equal(shown_pixels(without), shown_pixels(with_shift))
    assert np.array_equal(shown_pixels(without), np.asarray(studio.generate(TOY_PROMPT, weights={})[0]))


def test_an_interpolation_strip_between_two_loaded_shifts(page, served, screenshots):
    url, studio, second = served
    page.get_by_role("tab", name="Shifts").click()
    page.locator("#shift-source textarea").fill(str(second))
    page.locator("#shift-name textarea").fill("reversed")
    page.click("#load")
    page.wait_for_function("document.querySelector('#shift-message').innerText.includes('Loaded')")
    assert studio.shifts == ["dotted_square", "reversed"]
    page.get_by_role("tab", name="Generate").click()
    assert "reversed" in page.locator("#weight-1").inner_text()
    page.click("#interpolate")
    page.wait_for_function("document.querySelector('#strip-message').innerText.includes('5 images')")
    assert page.locator("#strip img").count() >= 5
    strip = studio.interpolation_strip(TOY_PROMPT, "dotted_square", "reversed", count=5)
    for index in (0, 4):
        shown = shown_pixels(image_bytes(page, url, "#strip", index))
        assert np.abs(shown.astype(int) - np.asarray(strip[index][1]).astype(int)).max() <= 1
    page.locator("#strip").scroll_into_view_if_needed()
    page.wait_for_timeout(500)  # let the images fade in before the picture is taken
    page.screenshot(path=str(screenshots / "app-strip.png"), full_page=True)


def test_a_bad_shift_file_and_an_empty_prompt_get_messages(page, served, screenshots, tmp_path):
    _, studio, _ = served
    loaded = studio.shifts
    bad = tmp_path / "notes.safetensors"
    bad.write_text("this is not a shift")
    page.get_by_role("tab", name="Shifts").click()
    page.locator("#shift-source textarea").fill(str(bad))
    page.click("#load")
    page.wait_for_function("document.querySelector('#shift-message').innerText.includes('Error')")
    assert "Could not load" in page.locator("#shift-message").inner_text()
    assert studio.shifts == loaded
    page.wait_for_timeout(500)  # let the images fade in before the picture is taken
    page.screenshot(path=str(screenshots / "app-bad-file.png"), full_page=True)
    page.get_by_role("tab", name="Generate").click()
    page.locator("#prompt textarea").fill("")
    generate(page, "Error")
    assert "prompt is empty" in page.locator("#message").inner_text()


def test_the_generate_endpoint_serves_scripts(served):
    from gradio_client import Client

    url, studio, _ = served
    client = Client(url, verbose=False)
    path = client.predict(TOY_PROMPT, 3, '{"dotted_square": 1.0}', 4, 2.0, api_name="/generate")
    image = Image.open(path).convert("RGB")
    expected = studio.generate(TOY_PROMPT, weights={"dotted_square": 1.0}, seed=3, steps=4, guidance=2.0)[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    with pytest.raises(Exception, match="finite"):
        client.predict(TOY_PROMPT, 3, '{"dotted_square": NaN}', 4, 2.0, api_name="/generate")


def test_training_shows_progress_and_loads_the_new_shift(page, served, screenshots, tmp_path):
    _, studio, _ = served
    paths = []
    for index, pixels in enumerate(tw.get_subject("striped_star").images(3, seed=0, backgrounds=["white"]).images):
        paths.append(tmp_path / f"star-{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-files input[type=file]").set_input_files([str(p) for p in paths])
    page.wait_for_function("document.querySelectorAll('#train-files tr, #train-files li').length >= 3")
    page.locator("#train-prompt textarea").fill("a sks star on a white background")
    page.locator("#train-name textarea").fill("star")
    page.locator("#train-steps input").fill("6")
    page.click("#train")
    page.wait_for_function("document.querySelector('#train-progress').innerText.includes('done')")
    assert "step 6 / 6" in page.locator("#train-progress").inner_text()
    assert page.locator("#validation img").count() == 1  # drawn every step of a 6-step run; the newest shown
    assert "star" in studio.shifts
    page.get_by_role("tab", name="Generate").click()
    page.wait_for_function("[...document.querySelectorAll('[id^=weight-]')].some(e => e.innerText.includes('star'))")
    page.get_by_role("tab", name="Train").click()
    page.wait_for_timeout(500)  # let the images fade in before the picture is taken
    page.screenshot(path=str(screenshots / "app-train.png"), full_page=True)
    studio.unload("star")


def test_editing_shows_the_input_and_the_edits(page, served, screenshots, tmp_path):
    path = tmp_path / "circle.png"
    Image.fromarray(tw.render_specs([tw.Spec("circle", "red", "white")], seed=0).images[0]).save(path)
    page.get_by_role("tab", name="Edit (CoSINE)").click()
    page.locator("#edit-upload input[type=file]").set_input_files(str(path))
    page.locator("#edit-source textarea").fill("a red circle on a white background")
    page.locator("#edit-targets textarea").fill("a blue circle on a white background\na red star on a white background")
    page.locator("#edit-steps input").fill("20")
    page.click("#edit")
    page.wait_for_function("document.querySelector('#edit-message').innerText.includes('2 edit(s)')")
    assert page.locator("#edits img").count() >= 3
    page.wait_for_timeout(500)  # let the images fade in before the picture is taken
    page.screenshot(path=str(screenshots / "app-edit.png"), full_page=True)


def test_the_svdiff_app_command_serves_the_page(tmp_path):
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    command = str(Path(sys.executable).parent / "svdiff")  # the console script of this environment
    server = subprocess.Popen([command, "app", "--port", str(port), "--work-dir", str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
                    config = response.read().decode()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(server.stdout.read() if server.poll() is not None else "no answer")
                time.sleep(0.5)
        assert "svdiff app" in config and "generate" in config
    finally:
        server.terminate()
        server.wait(timeout=30)
