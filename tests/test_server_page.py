"""The web page as AUTOMATIC1111 users expect it, in a real browser (headless Chromium): a form that
stays in view whatever the gallery holds, live news of jobs from any client and after a reload, the
mask painter, the LoRA picker, PNG Info and dropped PNGs, "Send to img2img", the gallery's paging,
lightbox, deletion and zip, and the API's documentation offline."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import pytest
from browsing import MARKS, chrome, drop_file, fill_gallery
from serving import PROMPT, ServerProcess, models_folder, wait_for_job

from stable_cascade.engine import image_sha256

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = MARKS
_RECTS = """
const box = (id) => document.getElementById(id).getBoundingClientRect();
return {prompt: box("prompt").top, generate: box("generate").bottom, height: window.innerHeight};
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("page")
    with ServerProcess(root / "data", "--models", str(models_folder(root / "models"))) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    driver = chrome()
    yield driver
    driver.quit()


def _open(browser: webdriver.Chrome, url: str, timeout: float = 60) -> WebDriverWait:
    browser.get(url + "/")
    wait = WebDriverWait(browser, timeout)
    wait.until(lambda b: Select(b.find_element(By.ID, "model")).first_selected_option.text == "demo")
    return wait


def _cards(browser: webdriver.Chrome) -> list[str]:
    """The prompts of the gallery's cards (read at once: the gallery may be redrawn meanwhile)."""
    script = "return [...document.querySelectorAll('#gallery .card .prompt')].map((e) => e.textContent)"
    cards: list[str] = browser.execute_script(script)
    return cards


def test_the_form_stays_in_view_and_the_gallery_pages_shows_deletes_and_zips(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    with ServerProcess(tmp_path / "data") as fresh:
        places = {}
        for items in (0, 50):
            ids = fill_gallery(fresh.data, items) if items else []
            for size in ((1280, 800), (390, 844)):
                browser.set_window_size(*size)
                wait = _open(browser, fresh.url)
                wait.until(lambda b: len(_cards(b)) == min(items, 24))  # noqa: B023
                wait.until(lambda b: b.find_element(By.ID, "prompt-tokens").text == "0/30")
                rects = browser.execute_script(_RECTS)
                assert rects["prompt"] >= 0 and rects["generate"] <= rects["height"], (items, size, rects)
                places[items, size] = rects
        for size in ((1280, 800), (390, 844)):
            assert places[0, size] == places[50, size], size  # the gallery never moves the form
        browser.set_window_size(1280, 900)
        wait = _open(browser, fresh.url)
        wait.until(lambda b: _cards(b)[:1] == ["job 49"])
        browser.find_element(By.ID, "older").click()  # paging past 24
        wait.until(lambda b: _cards(b)[:1] == ["job 25"])
        browser.find_element(By.ID, "older").click()
        wait.until(lambda b: _cards(b) == ["job 1", "job 0"])
        assert not browser.find_element(By.ID, "older").is_enabled()
        browser.find_element(By.ID, "newer").click()
        wait.until(lambda b: _cards(b)[:1] == ["job 25"])
        browser.find_element(By.CSS_SELECTOR, "#gallery .card img").click()  # the lightbox
        wait.until(lambda b: b.find_element(By.ID, "lightbox").is_displayed())
        assert "Seed: 25" in browser.find_element(By.ID, "lightbox-caption").text
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
        wait.until(lambda b: "Seed: 24" in b.find_element(By.ID, "lightbox-caption").text)
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        wait.until(lambda b: not b.find_element(By.ID, "lightbox").is_displayed())
        browser.find_element(By.CSS_SELECTOR, "#gallery .card [data-action=delete]").click()
        wait.until(lambda b: _cards(b)[:1] == ["job 24"])
        assert httpx.get(f"{fresh.url}/v1/jobs/{ids[25]}", timeout=10).status_code == 404
        archive = httpx.get(f"{fresh.url}/v1/images.zip", params={"ids": ",".join(ids[:3])}, timeout=30)
        with zipfile.ZipFile(io.BytesIO(archive.content)) as zipped:
            assert len(zipped.namelist()) == 3 and zipped.namelist()[0].endswith(".png")
        browser.get(fresh.url + "/docs")  # Swagger UI from the package: nothing is fetched from elsewhere
        wait.until(lambda b: "stable-cascade" in b.find_element(By.CSS_SELECTOR, ".swagger-ui .title").text)
        assert browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path[data-path='/v1/jobs']")


def test_jobs_from_elsewhere_show_live_and_a_reload_follows_the_running_one(
    server: ServerProcess, browser: webdriver.Chrome
) -> None:
    wait = _open(browser, server.url)
    submitted = httpx.post(f"{server.url}/v1/jobs", json={"prompt": PROMPT, "count": 100}, timeout=30).json()
    wait.until(lambda b: "step" in b.find_element(By.ID, "progress-text").text)  # followed, unasked
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, f".card[data-id='{submitted['id']}']"))
    assert browser.find_element(By.ID, "status").text == "1 job(s) in the queue"
    assert browser.find_element(By.ID, "cancel").is_enabled()
    browser.refresh()  # a reload during the run
    wait.until(lambda b: "step" in b.find_element(By.ID, "progress-text").text)
    wait.until(lambda b: b.find_element(By.ID, "cancel").is_enabled())
    browser.find_element(By.ID, "cancel").click()
    wait.until(lambda b: b.find_element(By.ID, "progress-text").text == "cancelled")
    wait.until(lambda b: b.find_element(By.ID, "status").text == "0 job(s) in the queue")
    wait.until(
        lambda b: "cancelled" in b.find_element(By.CSS_SELECTOR, f".card[data-id='{submitted['id']}']").text
    )


def test_a_painted_mask_makes_an_inpainting_job(
    server: ServerProcess, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    """Model "full" (its ControlNets include inpainting): the job only needs creating here."""
    photo = tmp_path / "photo.png"
    PIL.Image.new("RGB", (128, 128), (90, 120, 150)).save(photo)
    wait = _open(browser, server.url)
    Select(browser.find_element(By.ID, "model")).select_by_value("full")
    assert "not on this server" in browser.find_element(By.ID, "model-note").text  # offline here
    browser.find_element(By.CSS_SELECTOR, "#control-box summary").click()
    Select(browser.find_element(By.ID, "controlnet")).select_by_value("inpainting")
    browser.find_element(By.ID, "control_image").send_keys(str(photo))
    canvas = wait.until(
        lambda b: (
            b.find_element(By.ID, "paint-mask")
            if b.find_element(By.ID, "painter-area").is_displayed()
            else None
        )
    )
    ActionChains(browser).move_to_element_with_offset(canvas, -40, -40).click_and_hold().move_by_offset(
        0, 30
    ).release().perform()
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    before = httpx.get(f"{server.url}/v1/jobs?limit=1", timeout=10).json()["jobs"]
    browser.find_element(By.ID, "generate").click()
    latest = lambda: httpx.get(f"{server.url}/v1/jobs?limit=1", timeout=10).json()["jobs"]  # noqa: E731
    wait.until(lambda _: latest() and latest() != before and latest()[0]["id"] != before[0]["id"])
    job = latest()[0]["job"]
    assert (job["model"], job["controlnet"], job["control_type"]) == ("full", "inpainting", "inpainting")
    mask = np.asarray(PIL.Image.open(job["mask"]).convert("L"))
    assert mask.shape == (128, 128) and mask[24, 24] == 255 and mask[54, 24] == 255  # where it was painted
    assert mask[100, 100] == 0 and (mask == 255).mean() < 0.1


def test_lora_picker_png_drop_and_send_to_img2img(
    server: ServerProcess, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    wait = _open(browser, server.url, timeout=120)
    wait.until(lambda b: b.find_element(By.ID, "prompt-tokens").text == "0/30")  # the demo's 32-token encoder
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    wait.until(lambda b: b.find_element(By.ID, "prompt-tokens").text == "11/30")
    browser.find_element(By.ID, "seed").send_keys("42")
    browser.find_element(By.ID, "prior_steps").send_keys("6")
    Select(browser.find_element(By.ID, "emphasis")).select_by_value("ignore")
    browser.find_element(By.ID, "lora-weight").clear()
    browser.find_element(By.ID, "lora-weight").send_keys("0.7")
    browser.find_element(By.ID, "lora-add").click()
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: b.find_element(By.ID, "progress-text").text == "done")
    done = httpx.get(f"{server.url}/v1/jobs?limit=1", timeout=10).json()["jobs"][0]
    assert done["lora_names"] == ["ink"] and done["job"]["emphasis"] == "ignore"
    png = httpx.get(server.url + done["images"][0]["url"], timeout=10).content
    record = json.loads(PIL.Image.open(io.BytesIO(png)).info["stable_cascade"])  # the image's record
    assert [(Path(lora["path"]).name, lora["scale"]) for lora in record["job"]["loras"]] == [
        ("ink.safetensors", 0.7)
    ]
    (tmp_path / "made.png").write_bytes(png)

    wait = _open(browser, server.url)  # a fresh page: a dropped PNG fills it
    drop_file(browser, tmp_path / "made.png")
    wait.until(lambda b: b.find_element(By.ID, "prompt").get_attribute("value") == PROMPT)
    values = {
        name: browser.find_element(By.ID, name).get_attribute("value")
        for name in ("seed", "prior_steps", "emphasis")
    }
    assert values == {"seed": "42", "prior_steps": "6", "emphasis": "ignore"}
    assert [item.text.split("\n")[0] for item in browser.find_elements(By.CSS_SELECTOR, "#lora-list li")] == [
        "ink"
    ]
    assert browser.find_element(By.CSS_SELECTOR, "#lora-list li input").get_attribute("value") == "0.7"
    assert (
        "Seed: 42" in browser.find_element(By.ID, "png-text").text
        and "<lora:ink:0.7>" in browser.find_element(By.ID, "png-text").text
    )

    other = tmp_path / "automatic1111.png"  # AUTOMATIC1111's text alone
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a blue square\nSteps: 9, Sampler: DPM++ 2M Karras, CFG scale: 6, Seed: 5, Size: 128x128, "
        "Model: demo",
    )
    PIL.Image.new("RGB", (8, 8)).save(other, pnginfo=info)
    drop_file(browser, other)
    wait.until(lambda b: b.find_element(By.ID, "prompt").get_attribute("value") == "a blue square")
    assert browser.find_element(By.ID, "prior_sampler").get_attribute("value") == "dpmpp_2m"
    assert browser.find_element(By.ID, "prior_steps").get_attribute("value") == "9"

    card = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, f".card[data-id='{done['id']}']"))
    card.find_element(By.CSS_SELECTOR, "[data-action=img2img]").click()  # "Send to img2img"
    assert (
        Select(browser.find_element(By.ID, "task")).first_selected_option.get_attribute("value") == "img2img"
    )
    assert browser.execute_script("return document.getElementById('input_image').files.length") == 1
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == PROMPT
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: b.find_element(By.ID, "progress-text").text == "done")
    made = wait_for_job(
        server, httpx.get(f"{server.url}/v1/jobs?limit=1", timeout=10).json()["jobs"][0]["id"]
    )
    sent = image_sha256(PIL.Image.open(io.BytesIO(png)))
    assert (made["state"], made["job"]["task"], made["job"]["input_image_sha256"]) == (
        "done",
        "img2img",
        sent,
    )
