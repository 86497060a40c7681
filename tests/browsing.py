"""Driving the web page in a real browser: headless Chromium (Debian's chromium + chromium-driver) through
selenium, and a gallery filled without running jobs."""

from __future__ import annotations

import base64
import io
import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import PIL.Image
import pytest

from stable_cascade.engine import Job
from stable_cascade.server.store import DATABASE, Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
#: The marks of a module of browser tests: slow, and skipped (saying why) without a browser.
MARKS = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or DRIVER is None,
        reason="no browser found: apt-get install chromium chromium-driver (Debian)",
    ),
]
_PIXELS = """
const [img, done] = arguments;
const canvas = document.createElement("canvas");
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
canvas.getContext("2d").drawImage(img, 0, 0);
done(canvas.toDataURL("image/png"));
"""


def chrome(width: int = 1280, height: int = 900) -> Any:
    """A headless Chromium window of this size."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)


def image_of(browser: Any, element: object) -> PIL.Image.Image:
    """The pixels an ``<img>`` of the page shows."""
    data = browser.execute_async_script(_PIXELS, element)
    return PIL.Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB")


def fill_gallery(data: Path, count: int) -> list[str]:
    """``count`` finished jobs of one white image each, added to a (running) server's store as its
    worker records them; their ids, oldest first."""
    store = Store(data, max_queue=1000)
    job = Job.create(prompt="a job", model="demo", seed=1).to_dict()
    picture = io.BytesIO()
    PIL.Image.new("RGB", (128, 128), "white").save(picture, format="PNG")
    ids = []
    try:
        for i in range(count):
            job_id, now = f"{time.time_ns():x}{i:08x}", time.time()
            with sqlite3.connect(data / DATABASE) as db:
                db.execute(
                    "INSERT INTO jobs (id, state, job, created, started, finished, attempts) "
                    "VALUES (?, 'done', ?, ?, ?, ?, 1)",
                    (job_id, json.dumps({**job, "prompt": f"job {i}"}), now, now, now),
                )
            store.write_image(job_id, 0, 1, f"job {i}\nSteps: 20, Seed: {i}", picture.getvalue())
            ids.append(job_id)
    finally:
        store.close()
    return ids


def drop_file(browser: Any, path: Path) -> None:
    """Drop ``path`` on the page, as a user dragging it from their files does."""
    from selenium.webdriver.common.by import By

    browser.execute_script(
        "const i = document.createElement('input'); i.type = 'file'; i.id = 'test-drop'; i.hidden = true;"
        "document.body.append(i);"
    )
    browser.find_element(By.ID, "test-drop").send_keys(str(path))
    browser.execute_script(
        "const input = document.getElementById('test-drop'); const transfer = new DataTransfer();"
        "transfer.items.add(input.files[0]); input.remove();"
        "document.getElementById('gallery').dispatchEvent(new DragEvent('drop', "
        "{dataTransfer: transfer, bubbles: true, cancelable: true}));"
    )
