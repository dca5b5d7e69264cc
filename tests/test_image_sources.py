"""Untrusted images and where they come from (issue 17, rows 2, 6 and 7): pixel caps read from headers before any
decoding, decoding only in the model's turn, regular files only, and remote fetches with one deadline, a size cap,
same-origin redirects, public addresses only and one error message. Real files, FIFOs, sockets, loopback HTTP
servers, `edgevlm` subprocesses and the tiny random Qwen2-VL bundle."""

from __future__ import annotations

import base64
import http.server
import io
import ipaddress
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import edgevlm_serve, png_data_url, random_frame
from PIL import Image

from edgevlm.chat import ImagePolicy, _is_public, resolve_image, resolve_images
from edgevlm.errors import ImageError, ImageNotAllowedError, ImageTooLargeError
from edgevlm.images import ImageLimits, check_images, image_size, load_image

frame = partial(random_frame, size=(56, 84))
pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and /proc are POSIX/Linux")


def bomb_png(width: int, height: int | None = None) -> bytes:
    """An all-black 1-bit PNG, compressed row by row: 9400x9400 (88 megapixels) takes 11 KB, and never the whole
    image in memory here."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height = width if height is None else height
    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """call()'s result or exception, asserting it came within `seconds` (where it used to hang for ever)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001  (handed to the test)
            outcome["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still blocked after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def fifo(tmp_path) -> Iterator[Path]:
    path = tmp_path / "camera.png"
    os.mkfifo(path)
    yield path
    try:  # a reader the code under test left blocked in open() gets a writer and EOF, and its thread ends
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def ask(*images: Any) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": image}} for image in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]


# ------------------------------------------------------------------------------------------------ pixel caps (row 2)


def test_row_2_bomb_request_is_refused_from_the_headers():
    bomb = bomb_png(9400)
    assert len(bomb) < 16_000
    with pytest.raises(ImageTooLargeError) as refused:
        check_images([bomb] * 4)
    message = str(refused.value)
    assert "image 1 of 4 is 9400x9400 = 88,360,000 pixels, above the per-image cap of 50,000,000" in message
    assert "ImageLimits(max_image_pixels=...)" in message and "--max-image-pixels" in message
    truncated = bomb[: len(bomb) // 2]  # a decoder would fail on it: the header alone is read, and refused
    with pytest.raises(ImageTooLargeError, match="per-image cap"):
        load_image(truncated)
    assert check_images([truncated], ImageLimits(None, None)).sizes == ((9400, 9400),)  # header only: no decode error


def test_default_caps_let_two_48_megapixel_photos_through_and_count_the_request():
    photo = bomb_png(8000, 6000)
    assert check_images([photo, photo]).sizes == ((8000, 6000), (8000, 6000))
    with pytest.raises(ImageTooLargeError) as refused:
        check_images([photo] * 3)
    assert "3 images have 144,000,000 pixels together, above the per-request cap of 100,000,000" in str(refused.value)
    assert "--max-request-pixels" in str(refused.value)


def test_caps_are_settings_and_apply_to_every_kind_of_source(tmp_path):
    small = ImageLimits(max_image_pixels=1000, max_request_pixels=None)
    array = frame(0)  # 84x56 = 4704 pixels
    path = tmp_path / "frame.png"
    path.write_bytes(png_bytes(array))
    for source in (array, Image.fromarray(array), png_bytes(array), path, str(path)):
        with pytest.raises(ImageTooLargeError, match="84x56 = 4,704 pixels, above the per-image cap of 1,000"):
            check_images([source], small)
        with pytest.raises(ImageTooLargeError, match="per-image cap of 1,000"):
            load_image(source, small)
    assert load_image(path, ImageLimits(None, None)).size == (84, 56)
    with pytest.raises(ImageTooLargeError, match="per-request cap of 9,000"):
        check_images([array, array], ImageLimits(max_request_pixels=9000))
    for bad in (0, -5, 1.5, True, "50"):
        with pytest.raises(ValueError, match="expected a positive number of pixels or None"):
            ImageLimits(max_image_pixels=bad)


def test_decoding_refuses_a_file_that_changed_after_its_check(tmp_path):
    path = tmp_path / "frame.png"
    path.write_bytes(png_bytes(frame(1)))
    checked = check_images([path])
    path.write_bytes(png_bytes(random_frame(2, (40, 40))))
    with pytest.raises(ImageError, match="is 40x40 once decoded, but its header said 84x56"):
        checked.decode(0)


def test_generate_plan_and_chat_apply_the_caps(vlm):
    bomb = bomb_png(9400)
    with pytest.raises(ImageTooLargeError, match="per-image cap of 50,000,000"):
        vlm.plan("hi", [bomb])
    with pytest.raises(ImageTooLargeError, match="per-image cap of 50,000,000"):
        list(vlm.generate("hi", [bomb], max_tokens=1))
    with pytest.raises(ImageTooLargeError, match="per-image cap of 50,000,000"):
        vlm.chat(ask(data_url(bomb)), max_tokens=1)
    tiny = ImageLimits(max_image_pixels=1000)
    with pytest.raises(ImageTooLargeError, match="per-image cap of 1,000"):
        vlm.plan("hi", [frame(3)], image_limits=tiny)
    with pytest.raises(ImageTooLargeError, match="per-image cap of 1,000"):
        list(vlm.generate("hi", [frame(3)], max_tokens=1, image_limits=tiny))
    with pytest.raises(ImageTooLargeError, match="per-request cap of 9,000"):
        vlm.chat(ask(png_data_url(frame(3)), png_data_url(frame(4))), max_tokens=1,
                 image_policy=ImagePolicy(limits=ImageLimits(max_request_pixels=9000)))  # fmt: skip
    assert vlm.chat(ask(png_data_url(frame(3))), max_tokens=1).timings.n_image_tokens > 0


def _wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_waiting_requests_hold_no_decoded_images_and_bad_ones_fail_at_once(vlm, tmp_path):
    path = tmp_path / "frame.png"
    path.write_bytes(png_bytes(frame(5)))
    outcome: dict[str, Any] = {}

    def request() -> None:
        try:
            outcome["result"] = vlm.chat(
                [{"role": "user", "content": [{"type": "image", "image": path}]}], max_tokens=1
            )
        except ImageError as err:
            outcome["error"] = err

    assert vlm.turns.take()  # the model is busy
    try:
        waiting = threading.Thread(target=request)
        waiting.start()
        _wait_for(lambda: vlm.turns.n_waiting == 1)
        # the waiting request has read the header only: the image it decodes is the file as it is in its turn
        path.write_bytes(png_bytes(random_frame(6, (40, 40))))
        with pytest.raises(ImageTooLargeError):  # refused while the model is busy: no wait for a turn
            within(30, lambda: vlm.chat(ask(data_url(bomb_png(9400))), max_tokens=1))
    finally:
        vlm.turns.give_back()
    waiting.join(timeout=60)
    assert "is 40x40 once decoded, but its header said 84x56" in str(outcome.get("error"))


ROW_2_SCRIPT = """
import base64, json, sys, threading
import edgevlm
from edgevlm.errors import ImageTooLargeError

def status(key):
    return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith(key))

def peak_of(call):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    call()
    return status("VmHWM") - before

def ask(png, n):
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * n}]

def refused(messages):
    try:
        vlm.chat(messages, max_tokens=1)
    except ImageTooLargeError:
        return
    raise SystemExit("not refused")

bomb, photo = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
vlm = edgevlm.load(sys.argv[1], n_ctx=2048, n_threads=1)
vlm.chat([{"role": "user", "content": "warm up"}], max_tokens=1)
out = {"row_2_peak_mb": peak_of(lambda: refused(ask(bomb, 4)))}
out["header_check_peak_mb"] = peak_of(lambda: vlm.plan("hi", [photo, photo]))
baseline = status("VmRSS")
for _ in range(3):  # in threads, as the server runs requests: glibc keeps freed memory in per-thread arenas
    worker = threading.Thread(target=vlm.chat, args=(ask(photo, 2),), kwargs={"max_tokens": 1})
    worker.start()
    worker.join()
out["held_after_mb"] = status("VmRSS") - baseline
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and relies on glibc's malloc_trim")
def test_row_2_request_leaves_memory_flat_and_decoded_memory_goes_back(tiny_bundles, tmp_path):
    bomb, photo = tmp_path / "bomb.png", tmp_path / "photo.png"
    bomb.write_bytes(bomb_png(9400))
    photo.write_bytes(bomb_png(6000))  # 36 megapixels: allowed; two per request (72 MP) too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", ROW_2_SCRIPT, str(tiny_bundles["F32"]), str(bomb), str(photo)],
                            capture_output=True, text=True, timeout=300, env=env, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    # Before: the row-2 request peaked 1,440 MB above its start, `plan` decoded every PNG it sized (+36 MB per
    # 6000x6000 1-bit image), and three 72 MP requests in threads left 130-190 MB resident.
    assert measured["row_2_peak_mb"] < 30, measured
    assert measured["header_check_peak_mb"] < 20, measured
    assert measured["held_after_mb"] < 100, measured


# ------------------------------------------------------------------------------------------- regular files (row 6)


def test_fifos_sockets_and_devices_are_refused_without_opening(fifo, tmp_path):
    link = tmp_path / "link.png"
    link.symlink_to(fifo)
    listener = socket.socket(socket.AF_UNIX)
    sock_path = tmp_path / "s.png"
    listener.bind(str(sock_path))
    try:
        cases = [(fifo, "a FIFO"), (link, "a FIFO"), (sock_path, "a socket")]
        if Path("/dev/zero").exists():
            cases.append((Path("/dev/zero"), "a character device"))
        for path, kind in cases:
            for reader in (load_image, image_size, lambda p: check_images([p])):
                with pytest.raises(ImageError, match=f"is {kind}[ (a-z)]*, not an image file: edgevlm reads images from regular files only"):  # fmt: skip
                    within(10, partial(reader, path))
    finally:
        listener.close()


def test_unreadable_paths_are_image_errors(tmp_path):
    for path in ("bad\0name.png", "x" * 6000 + ".png"):
        with pytest.raises(ImageError, match="Cannot read image file"):
            check_images([path])


def test_a_file_swapped_for_a_fifo_after_its_stat_cannot_block(fifo, tmp_path, monkeypatch):
    regular = tmp_path / "regular.png"
    regular.write_bytes(png_bytes(frame(7)))
    real_stat = os.stat

    def stat_as_before_the_swap(path, *args, **kwargs):  # what os.stat said just before the file became a FIFO
        return real_stat(regular if Path(path) == fifo else path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_as_before_the_swap)
    assert stat.S_ISREG(os.stat(fifo).st_mode)
    with pytest.raises(ImageError, match="is a FIFO"):
        within(10, lambda: load_image(fifo))  # the non-blocking open returns, and fstat sees the FIFO


def test_python_api_refuses_a_fifo_quickly(vlm, fifo):
    with pytest.raises(ImageError, match="is a FIFO"):
        within(30, lambda: list(vlm.generate("hi", [fifo], max_tokens=1)))
    with pytest.raises(ImageError, match="is a FIFO"):
        within(30, lambda: vlm.chat([{"role": "user", "content": [{"type": "image", "image": str(fifo)}]}], max_tokens=1))  # fmt: skip
    assert vlm.chat(ask(png_data_url(frame(8))), max_tokens=1).finish_reason in ("stop", "length")


def _edgevlm(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "edgevlm.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)  # fmt: skip


def test_cli_run_with_a_fifo_image_exits_2_quickly(tiny_bundles, fifo):
    result = _edgevlm("run", str(tiny_bundles["F32"]), "--image", str(fifo), "-p", "hi", timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"edgevlm run: error: {fifo} is a FIFO (named pipe), not an image file"), result.stderr
    result = _edgevlm("run", str(tiny_bundles["F32"]), "--image", str(fifo), "-p", "hi", "--max-image-pixels", "0", timeout=60)  # fmt: skip
    assert result.returncode == 2 and "must be at least 1" in result.stderr


def test_cli_pixel_flags_raise_the_caps_and_pillows_ceiling(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(bomb_png(9500))  # 90,250,000 pixels: above the default cap and Pillow's 89,478,485
    missing = str(tmp_path / "no-bundle")
    refused = _edgevlm("run", missing, "--image", str(big), "-p", "hi", timeout=60)
    assert refused.returncode == 2 and "above the per-image cap of 50,000,000" in refused.stderr
    raised = _edgevlm("run", missing, "--image", str(big), "-p", "hi", "--max-image-pixels", "100000000", timeout=60)
    assert raised.returncode == 2 and "pixels" not in raised.stderr, raised.stderr  # the images passed; no bundle
    assert "no-bundle" in raised.stderr


@contextmanager
def serving(bundle: Path, *flags: str) -> Iterator[str]:
    """`edgevlm serve` in a subprocess on a free loopback port; yields its base URL."""
    with edgevlm_serve(bundle, *flags) as (base, _):
        yield base


def _post(base: str, messages: list[dict]) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=30)


def test_server_refuses_fifos_and_caps_and_keeps_serving(tiny_bundles, tmp_path, fifo):
    allowed = fifo.parent
    Image.fromarray(frame(9)).save(allowed / "frame.png")
    Image.fromarray(random_frame(10, (200, 200))).save(allowed / "big.png")
    flags = ("--allow-local-images", str(allowed), "--queue", "5", "--max-image-pixels", "20000", "--max-request-pixels", "15000")  # fmt: skip
    with serving(tiny_bundles["F32"], *flags) as base:
        with ThreadPoolExecutor(5) as pool:  # five at once: hung requests used to keep their queue slots for good
            answers = list(pool.map(lambda _: _post(base, ask(fifo.name)), range(5)))
        for answer in answers:
            assert answer.status_code == 422, answer.text
            assert "is a FIFO" in answer.json()["error"]["message"]
        assert _post(base, ask("frame.png")).status_code == 200
        too_big = _post(base, ask("big.png"))
        assert too_big.status_code == 422 and "above the per-image cap of 20,000" in too_big.json()["error"]["message"]
        too_many = _post(base, ask("frame.png", "frame.png", "frame.png", "frame.png"))
        assert too_many.status_code == 422 and "per-request cap of 15,000" in too_many.json()["error"]["message"]
        assert _post(base, ask("frame.png")).status_code == 200


# ------------------------------------------------------------------------------------------- remote fetch (row 7)

PNG = png_bytes(random_frame(11, (28, 28)))


@contextmanager
def loopback_server(respond: Callable[[http.server.BaseHTTPRequestHandler], None]) -> Iterator[str]:
    """An HTTP server on a free loopback port whose GET handler is `respond`; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            try:
                respond(self)
            except OSError:
                pass  # the client hung up (a deadline)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def send(handler: http.server.BaseHTTPRequestHandler, body: bytes, status: int = 200, **headers: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", headers.pop("length", str(len(body))))
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()
    handler.wfile.write(body)


def trickle_body(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(PNG)))
    handler.end_headers()
    for byte in PNG:
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(0.5)


def trickle_headers(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
    for _ in range(1000):
        handler.wfile.write(b"X")
        handler.wfile.flush()
        time.sleep(0.5)


LOOPBACK = ImagePolicy(allow_remote=True, allow_private_hosts=True, fetch_timeout_s=2.0)


def test_loopback_hosts_are_refused_unless_allowed():
    with loopback_server(lambda h: send(h, PNG)) as base:
        port = base.rsplit(":", 1)[1]
        for url in (f"{base}/a.png", f"http://localhost:{port}/a.png", f"http://[::ffff:127.0.0.1]:{port}/a.png"):
            with pytest.raises(ImageNotAllowedError, match="is not at a public address, and only public ones are fetched from") as refused:  # fmt: skip
                resolve_image(url, ImagePolicy(allow_remote=True))
            assert "localhost" not in url or "127.0.0.1" not in str(refused.value)  # what a name resolves to stays in
        assert resolve_image(f"{base}/a.png", LOOPBACK) == PNG


@pytest.mark.parametrize("respond", [trickle_body, trickle_headers], ids=["body", "headers"])
def test_a_trickling_server_fails_within_the_total_deadline(respond):
    with loopback_server(respond) as base:
        t0 = time.monotonic()
        with pytest.raises(ImageError, match="no image of at most 20971520 bytes arrived within 2 s"):
            resolve_image(f"{base}/a.png", LOOPBACK)
        assert time.monotonic() - t0 < 2.0 + 3.0  # the deadline plus a margin for a busy machine
        t0 = time.monotonic()
        with pytest.raises(ImageError, match="arrived within 2 s"):  # one deadline for the request's images together
            resolve_images([f"{base}/{i}.png" for i in range(3)], LOOPBACK)
        assert time.monotonic() - t0 < 2.0 + 3.0


def test_redirects_stay_on_the_same_scheme_host_and_port():
    with loopback_server(lambda h: send(h, PNG)) as other:

        def respond(handler):
            target = {"/same": "/final.png", "/loop": "/loop", "/other": f"{other}/final.png"}.get(handler.path)
            if target:
                send(handler, b"", 302, Location=target)
            else:
                send(handler, PNG)

        with loopback_server(respond) as base:
            assert resolve_image(f"{base}/same", LOOPBACK) == PNG
            for path in ("/other", "/loop"):
                with pytest.raises(ImageError, match="could not fetch an image"):
                    resolve_image(f"{base}{path}", LOOPBACK)


def test_every_remote_failure_gives_the_same_message():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    failures = {"refused": closed}
    responders = {
        "404": lambda h: send(h, b"not found", 404),
        "500": lambda h: send(h, b"oops", 500),
        "not an image": lambda h: send(h, b"<html>hello</html>"),
        "declared too large": lambda h: send(h, b"", length=str(LOOPBACK.max_bytes + 1)),
        "too large": _endless,
        "timeout": trickle_body,
        "redirect elsewhere": lambda h: send(h, b"", 302, Location=f"{closed}/a.png"),
    }
    messages = {}
    with ExitStack() as stack:
        for name, respond in responders.items():
            failures[name] = stack.enter_context(loopback_server(respond))
        for name, base in failures.items():
            with pytest.raises(ImageError) as failed:
                resolve_image(f"{base}/a.png", LOOPBACK)
            messages[name] = str(failed.value).replace(base, "URL")
    assert len(set(messages.values())) == 1, messages


def _endless(handler: http.server.BaseHTTPRequestHandler) -> None:
    """A body with no Content-Length that goes on past any size cap."""
    handler.send_response(200)
    handler.send_header("Connection", "close")
    handler.end_headers()
    for _ in range(LOOPBACK.max_bytes // 2**16 + 2):
        handler.wfile.write(b"\0" * 2**16)


@pytest.mark.parametrize(
    ("address", "public"),
    [("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
     ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
     ("239.255.255.250", False), ("240.0.0.1", False), ("255.255.255.255", False), ("::1", False), ("::", False),
     ("fe80::1", False), ("fc00::1", False), ("ff02::1", False), ("::ffff:127.0.0.1", False),
     ("::ffff:10.0.0.1", False), ("64:ff9b::a00:1", False), ("2002:7f00:1::", False), ("fec0::1", False),
     ("8.8.8.8", True), ("1.1.1.1", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True)],
)  # fmt: skip
def test_address_classification(address, public):
    assert _is_public(ipaddress.ip_address(address)) is public


def test_serve_flag_allows_private_image_hosts(tiny_bundles):
    with loopback_server(lambda h: send(h, PNG)) as images:
        url = f"{images}/a.png"
        with serving(tiny_bundles["F32"], "--allow-remote-images") as base:
            refused = _post(base, ask(url))
            assert refused.status_code == 403 and "--allow-private-image-hosts" in refused.json()["error"]["message"]
        with serving(tiny_bundles["F32"], "--allow-remote-images", "--allow-private-image-hosts") as base:
            assert _post(base, ask(url)).status_code == 200
