"""Uploaded images: checked from their header before any pixel is decoded (a small file declaring a
huge image costs nothing), decoded a bounded number at a time, kept only when the request is accepted,
and written so that concurrent uploads of one image never collide."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import random
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import PIL.Image
import pytest
from serving import PROMPT, ServerProcess

from stable_cascade.server.store import Store
from stable_cascade.server.uploads import DECODE_SLOTS, decode_image, peek_image, staged

BOMB_MEMORY_LIMIT = 100 * 1024 * 1024  # bytes the server's peak may grow by for six refused bombs


def declared_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width``×``height`` black pixels: a few KiB that decode to ``width·height``
    bytes, and to three times that in RGB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def noise_png(seed: int, side: int = 256) -> str:
    """A new image each seed, base64 PNG (noise: slow to compress, so writes take a while)."""
    picture = PIL.Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _peak_memory(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _inputs(server: ServerProcess) -> list[str]:
    return sorted(path.name for path in (server.data / "inputs").iterdir())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("uploads") / "data") as running:
        yield running


def test_a_small_file_declaring_a_huge_image_is_refused_from_its_header(server: ServerProcess) -> None:
    assert server.process is not None
    bomb = declared_png(8192, 8192)
    assert len(bomb) < 16 * 1024
    before = _peak_memory(server.process.pid)
    body = {"task": "img2img", "prompt": PROMPT, "image": base64.b64encode(bomb).decode()}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(lambda _: httpx.post(f"{server.url}/v1/jobs", json=body, timeout=120), range(6))
        )
    for answer in answers:
        assert answer.status_code == 422, answer.text
        assert "8192×8192" in answer.json()["detail"] and "downscale" in answer.json()["detail"]
    growth = _peak_memory(server.process.pid) - before
    assert growth < BOMB_MEMORY_LIMIT, (
        f"six refused uploads raised the server's peak by {growth / 2**20:.0f} MiB"
    )
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buffer, format="TIFF")
    refused = httpx.post(
        f"{server.url}/v1/jobs", json={**body, "image": base64.b64encode(buffer.getvalue()).decode()}
    )
    assert refused.status_code == 422 and "is a TIFF image; send PNG" in refused.json()["detail"]


def test_a_refused_request_stores_nothing(server: ServerProcess) -> None:
    before = _inputs(server)
    cases = [
        ("/v1/jobs", {"task": "img2img", "image": noise_png(1), "prior_steps": "many"}),
        ("/v1/jobs", {"task": "img2img", "image": noise_png(2), "colour": "red"}),
        ("/v1/jobs", {"task": "img2img", "image": noise_png(3), "count": 1000}),  # over the images cap
        ("/sdapi/v1/img2img", {"init_images": [noise_png(4)], "steps": "many"}),
        ("/sdapi/v1/img2img", {"init_images": [noise_png(5)], "mask": noise_png(6)}),  # demo: no inpainting
    ]
    for path, body in cases:
        answer = httpx.post(server.url + path, json={"prompt": PROMPT, **body}, timeout=60)
        assert answer.status_code == 422, answer.text
        assert _inputs(server) == before, f"{path} {sorted(body)} left files in inputs/"
    same = {"task": "img2img", "image": noise_png(7), "prior_steps": "many"}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(
            pool.map(lambda _: httpx.post(f"{server.url}/v1/jobs", json=same, timeout=60), range(16))
        )
    assert [answer.status_code for answer in answers] == [422] * 16
    assert _inputs(server) == before


def test_concurrent_uploads_of_one_new_image_all_succeed(server: ServerProcess) -> None:
    statuses: list[int] = []
    ids: list[str] = []
    for round_ in range(5):
        body = {"task": "img2img", "prompt": PROMPT, "image": noise_png(100 + round_), "prior_steps": 2}
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(
                pool.map(lambda b: httpx.post(f"{server.url}/v1/jobs", json=b, timeout=60), [body] * 16)
            )
        statuses += [answer.status_code for answer in answers]
        ids += [answer.json()["id"] for answer in answers if answer.status_code == 201]
    for job_id in ids:  # they need not run
        httpx.delete(f"{server.url}/v1/jobs/{job_id}", timeout=30)
    assert statuses == [201] * 80, {code: statuses.count(code) for code in set(statuses)}
    assert not [name for name in _inputs(server) if name.startswith(".")], "no temporary file is left"


def test_decoding_holds_at_most_the_slots_at_once(tmp_path: Path) -> None:
    store = Store(tmp_path, max_queue=10)
    active, peak, lock = [0], [0], threading.Lock()

    def request(seed: int) -> None:
        with staged() as scope:  # a request holds its slot from its first decode to its end
            scope.run(decode_image, noise_png(seed, 16), store)
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            scope.run(decode_image, noise_png(seed + 100, 16), store)  # a second upload: the same slot
            time.sleep(0.05)
            with lock:
                active[0] -= 1

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(request, range(8)))
    assert 1 <= peak[0] <= DECODE_SLOTS
    assert len(list(store.inputs_dir.iterdir())) == 16  # each request accepted: its uploads kept


def test_peek_reads_the_declared_size_and_refuses_as_decoding_would() -> None:
    assert peek_image(base64.b64encode(declared_png(64, 48)).decode()) == (64, 48)
    with pytest.raises(ValueError, match=r"mask is too large to open safely \(it is 8192×8192"):
        peek_image(base64.b64encode(declared_png(8192, 8192)).decode(), "mask")
    with pytest.raises(ValueError, match="mask must be a base64-encoded image, got list"):
        peek_image([], "mask")
