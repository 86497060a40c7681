"""The web page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
selenium types a prompt, generates with the demo model, and checks the image that appears."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest
from browsing import MARKS, chrome, image_of
from serving import PROMPT, ServerProcess

from stable_cascade.engine import image_sha256
from stable_cascade.shapes import score

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = MARKS
RIGHT = "a red circle on the right, on a white background"
#: Where to save a screenshot of the page (the README's is made this way).
SCREENSHOT = os.environ.get("STABLE_CASCADE_SCREENSHOT")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("browser") / "data") as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    driver = chrome()
    yield driver
    driver.quit()


def test_type_a_prompt_generate_and_see_the_image(server: ServerProcess, browser: webdriver.Chrome) -> None:
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda b: Select(b.find_element(By.ID, "model")).first_selected_option.text == "demo")
    assert browser.find_element(By.ID, "width").get_attribute("placeholder") == "128"
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    browser.find_element(By.ID, "seed").send_keys("3")
    assert not browser.find_element(By.ID, "random-seed").is_selected()
    browser.find_element(By.ID, "generate").click()
    image = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#result img.output"))[0]
    wait.until(lambda b: b.execute_script("return arguments[0].naturalWidth", image) > 0)
    wait.until(lambda b: b.find_element(By.ID, "progress-text").text == "done")
    assert float(browser.find_element(By.ID, "progress").get_attribute("value")) == 1.0
    pixels = image_of(browser, image)
    assert pixels.size == (128, 128)
    summary = score([pixels], [PROMPT]).summary()
    assert (summary["colour"], summary["position"], summary["background"]) == (1.0, 1.0, 1.0), summary
    card = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gallery .card img"))[0]
    assert "Seed: 3" in card.get_attribute("title")
    if SCREENSHOT:
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(SCREENSHOT)


def test_reuse_parameters_fills_the_form(server: ServerProcess, browser: webdriver.Chrome) -> None:
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    reuse = wait.until(lambda b: b.find_elements(By.XPATH, "//button[text()='Reuse parameters']"))[0]
    browser.find_element(By.ID, "prompt").clear()
    reuse.click()
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == PROMPT
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "3"
    assert browser.find_element(By.ID, "prior_steps").get_attribute("value") == "20"


def test_an_upload_for_img2img(server: ServerProcess, browser: webdriver.Chrome, tmp_path: Path) -> None:
    picture = tmp_path / "input.png"
    PIL.Image.new("RGB", (128, 128), "white").save(picture)
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda b: Select(b.find_element(By.ID, "model")).first_selected_option.text == "demo")
    Select(browser.find_element(By.ID, "task")).select_by_value("img2img")
    browser.find_element(By.ID, "input_image").send_keys(str(picture))
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: b.find_element(By.ID, "progress-text").text == "done")
    assert browser.find_elements(By.CSS_SELECTOR, "#result img.output")


def test_canny_controlnet_moves_the_object_where_the_control_image_has_it(
    server: ServerProcess, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    """The prompt says right, the control image's circle is on the left: the demo ControlNet wins."""
    control = tmp_path / "control.png"
    pixels = np.zeros((128, 128, 3), np.uint8)
    ys, xs = np.mgrid[:128, :128]
    pixels[(xs - 32) ** 2 + (ys - 64) ** 2 < 18**2] = 255
    PIL.Image.fromarray(pixels).save(control)
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda b: Select(b.find_element(By.ID, "model")).first_selected_option.text == "demo")
    controlnets = Select(browser.find_element(By.ID, "controlnet"))
    assert [o.get_attribute("value") for o in controlnets.options] == ["", "canny"]
    browser.find_element(By.CSS_SELECTOR, "#control-box summary").click()
    models = Select(browser.find_element(By.ID, "model"))
    models.select_by_value("full")
    controlnets.select_by_value("inpainting")
    assert browser.find_element(By.ID, "mask").is_displayed()
    models.select_by_value("lite")  # no ControlNet: back to none
    assert controlnets.first_selected_option.text == "none"
    assert not browser.find_element(By.ID, "controlnet").is_enabled()
    assert not browser.find_element(By.ID, "control_image").is_displayed()
    assert browser.find_element(By.ID, "control-none").is_displayed()
    models.select_by_value("demo")
    controlnets.select_by_value("canny")
    assert not browser.find_element(By.ID, "mask").is_displayed()  # inpainting only
    browser.find_element(By.ID, "control_image").send_keys(str(control))
    wait.until(lambda b: b.find_element(By.ID, "control-thumb").is_displayed())
    browser.find_element(By.ID, "prompt").send_keys(RIGHT)
    browser.find_element(By.ID, "seed").send_keys("3")
    Select(browser.find_element(By.ID, "decoder_sampler")).select_by_value("euler_ancestral")
    browser.find_element(By.ID, "generate").click()
    image = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#result img.output"))[0]
    wait.until(lambda b: b.find_element(By.ID, "progress-text").text == "done")
    summary = score([image_of(browser, image)], [RIGHT.replace("right", "left")]).summary()
    assert (summary["colour"], summary["position"], summary["background"]) == (1.0, 1.0, 1.0), summary
    job = httpx.get(server.url + "/v1/jobs?limit=1", timeout=10).json()["jobs"][0]["job"]
    assert job["decoder_sampler"] == "euler_ancestral" != job["prior_sampler"]
    assert (job["controlnet"], job["control_scale"]) == ("canny", 1.0)

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    browser.find_element(By.ID, "control_image").send_keys(str(broken))
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: "control_image is not an image" in b.find_element(By.ID, "error").text)

    browser.get(server.url + "/")
    reuse = wait.until(lambda b: b.find_elements(By.XPATH, "//button[text()='Reuse parameters']"))[0]
    reuse.click()
    assert Select(browser.find_element(By.ID, "controlnet")).first_selected_option.text == "canny"
    assert browser.find_element(By.ID, "control_scale").get_attribute("value") == "1"
    assert "re-upload" in browser.find_element(By.ID, "control-hint").text
    assert Select(browser.find_element(By.ID, "decoder_sampler")).first_selected_option.text == "Euler a"


def test_the_page_asks_for_the_api_key(tmp_path: Path, browser: webdriver.Chrome) -> None:
    with ServerProcess(tmp_path / "data", api_key="page-key") as guarded:
        browser.get(guarded.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.ID, "key-box").is_displayed())
        assert "API key" in browser.find_element(By.ID, "error").text
        browser.find_element(By.ID, "api-key").send_keys("page-key")
        browser.find_element(By.ID, "save-key").click()
        wait.until(lambda b: Select(b.find_element(By.ID, "model")).first_selected_option.text == "demo")
        browser.find_element(By.ID, "prompt").send_keys(PROMPT)
        browser.find_element(By.ID, "prior_steps").send_keys("5")
        browser.find_element(By.ID, "generate").click()
        image = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#result img.output"))[0]
        wait.until(lambda b: b.execute_script("return arguments[0].naturalWidth", image) == 128)
        browser.execute_script("localStorage.clear()")


def test_the_form_carries_every_field_and_reuse_brings_them_back(
    server: ServerProcess, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    """Every field of the form (built from GET /v1/fields) set to a value that is not its default reaches
    the job; "Reuse parameters" puts them back (the LoRA picker: tests/test_server_page.py). (Model
    "full": its ControlNets include inpainting; the job only needs creating here: offline, its models
    cannot load.)"""
    from test_fields import SAMPLE

    pictures = {}
    for name, colour in (("input_image", "red"), ("control_image", "black"), ("mask", "white")):
        pictures[name] = tmp_path / f"{name}.png"
        PIL.Image.new("RGB", (64, 72), colour).save(pictures[name])
    fields = [
        f for f in httpx.get(server.url + "/v1/fields", timeout=10).json()["fields"] if f["widget"] != "loras"
    ]
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: Select(b.find_element(By.ID, "model")).first_selected_option.text == "demo")
    Select(browser.find_element(By.ID, "model")).select_by_value("full")
    Select(browser.find_element(By.ID, "task")).select_by_value("img2img")
    browser.find_element(By.CSS_SELECTOR, "#control-box summary").click()
    Select(browser.find_element(By.ID, "controlnet")).select_by_value(SAMPLE["controlnet"])

    def fill() -> None:
        for field in fields:
            control = browser.find_element(By.ID, field["name"])
            if field["widget"] == "image":
                control.send_keys(str(pictures[field["name"]]))
            elif field["name"] in SAMPLE and field["name"] not in ("model", "task", "controlnet"):
                if field["widget"] == "select":
                    Select(control).select_by_value(str(SAMPLE[field["name"]]))
                else:
                    control.clear()
                    control.send_keys(str(SAMPLE[field["name"]]))

    def submitted() -> dict[str, object]:
        before = httpx.get(server.url + "/v1/jobs?limit=1", timeout=10).json()["jobs"]
        browser.find_element(By.ID, "generate").click()
        latest = lambda: httpx.get(server.url + "/v1/jobs?limit=1", timeout=10).json()["jobs"]  # noqa: E731
        first = before[0]["id"] if before else None
        error = lambda: browser.find_element(By.ID, "error").text  # noqa: E731
        wait.until(lambda _: error() or (latest() and latest()[0]["id"] != first))
        assert not error()
        job: dict[str, object] = latest()[0]["job"]
        return job

    fill()
    job = submitted()
    for field in fields:
        name = field["name"]
        if field["widget"] == "image":
            digest = job[f"{name}_sha256"]
            assert digest == image_sha256(PIL.Image.open(pictures[name])), name
        else:
            assert job[name] == SAMPLE.get(name, "img2img" if name == "task" else None), (name, job[name])
    assert job["input_image"] == "input_image.png"
    browser.get(server.url + "/")
    reuse = wait.until(lambda b: b.find_elements(By.XPATH, "//button[text()='Reuse parameters']"))[0]
    reuse.click()
    for field in fields:
        if field["widget"] != "image" and field["name"] not in ("seed",):
            value = browser.find_element(By.ID, field["name"]).get_attribute("value")
            expected = job[field["name"]]
            assert value in (str(expected), f"{expected:g}" if isinstance(expected, float) else ""), field[
                "name"
            ]
    assert browser.find_element(By.ID, "seed").get_attribute("value") == str(SAMPLE["seed"])
    for name, picture in pictures.items():  # uploads cannot be restored: the same files again
        browser.find_element(By.ID, name).send_keys(str(picture))
    again = submitted()
    assert again == job
