"""scripts/demo.py end to end: the server (started as a user would, tiny random networks) serves the page, takes
uploads over its WebSocket, streams frames in order, stops and restarts, serves the mp4, and answers bad input
(unreadable upload, wrong size, a live pose stream that stops) with a message on the page and in the log while it
keeps serving; then the same in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium;
skipped with the reason where they cannot be had)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.video_io import read_video, write_image, write_video
from utils.world.synthetic_pose import generate_sample, load_world_config

websockets_client = pytest.importorskip("websockets.sync.client")

ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 32, 48
POSE_TIMEOUT = 2.0
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A demo server on a free loopback port; yields (base URL, log file)."""
    folder = tmp_path_factory.mktemp("demo")
    port, log = free_port(), folder / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "demo.py"), "--port", str(port), "--out-dir", str(folder / "out"),
             "--world-frames", "9", "--pose-timeout", str(POSE_TIMEOUT), "--max-frames", "81"],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "serving on" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the demo server did not start in 180 s"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", log
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def world():
    return generate_sample(load_world_config(height=HEIGHT, width=WIDTH, num_frames=13), seed=7)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return b64(buf.getvalue())


def mp4(tmp_path: Path, frames: np.ndarray) -> str:
    write_video(tmp_path / "pose.mp4", frames, fps=16, mode="lossless")
    return b64((tmp_path / "pose.mp4").read_bytes())


def messages(ws, until=("done", "stopped", "error"), timeout: float = 120) -> list[dict]:
    out = []
    while True:
        msg = json.loads(ws.recv(timeout=timeout))
        out.append(msg)
        if msg["type"] in until:
            return out
        assert msg["type"] != "error", msg


def run(url: str, start: dict, until=("done", "stopped", "error")) -> list[dict]:
    with websockets_client.connect(f"ws://{url}/ws", max_size=2**26) as ws:
        ws.send(json.dumps({"type": "start", **start}))
        return messages(ws, until)


def check_frames_in_order(msgs: list[dict]) -> int:
    frames = [m for m in msgs if m["type"] == "frames"]
    assert [m["block"] for m in frames] == list(range(len(frames)))
    start = 0
    for m in frames:
        assert m["frame_start"] == start and m["count"] == len(m["images"]) > 0
        start += m["count"]
    return start


def fetch(url: str, path: str) -> bytes:
    with urllib.request.urlopen(f"http://{url}{path}", timeout=30) as response:
        return response.read()


def video_frames(data: bytes, tmp_path: Path) -> np.ndarray:
    (tmp_path / "got.mp4").write_bytes(data)
    return read_video(tmp_path / "got.mp4")  # decord, else ffmpeg (decord misreads 48-pixel-wide videos)


def test_help_documents_every_flag():
    sys.path.insert(0, str(ROOT / "scripts"))
    import demo

    parser = demo.build_parser()
    text = parser.format_help()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    for action in flags:
        assert action.help and len(action.help) > 10, f"{action.option_strings} has no help"
        assert all(option in text for option in action.option_strings)
    for required in ("--port", "--host", "--pose-timeout", "--max-frames", "--weights", "--config", "/ws", "webcam"):
        assert required in text


def test_page_and_config_are_served(server):
    url, _ = server
    page = fetch(url, "/").decode()
    for element in ('id="ref"', 'id="source"', 'id="start"', 'id="stop"', 'id="fps"', 'id="latency"', 'id="download"'):
        assert element in page
    config = json.loads(fetch(url, "/config"))
    assert config["preset"] == "tiny" and config["lookahead_frames"] == 4 and config["local_attn_size"] > 0
    assert config["webcam"] is False and "onnx" in config["webcam_reason"]
    with pytest.raises(urllib.error.HTTPError, match="404"):
        fetch(url, "/video/../../etc/passwd")


def test_uploaded_reference_and_pose_video_stream_in_order_into_a_playable_mp4(server, world, tmp_path):
    url, _ = server
    msgs = run(url, {"source": "video", "ref": png(world.ref_image), "pose": mp4(tmp_path, world.pose), "seed": 1})
    assert msgs[0]["type"] == "started" and msgs[0]["lookahead_frames"] == 4 and msgs[-1]["type"] == "done", msgs[-1]
    assert check_frames_in_order(msgs) == 13 == msgs[-1]["frames"]
    assert msgs[-1]["fps"] > 0 and msgs[-1]["first_frame_s"] > 0
    video = video_frames(fetch(url, msgs[-1]["video"]), tmp_path)
    assert video.shape == (13, HEIGHT, WIDTH, 3)
    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(msgs[1]["images"][0]))))
    assert np.abs(first.astype(int) - video[0]).mean() < 8  # the page's frames are the mp4's (two lossy codecs)


def test_keypoints_and_world_sources(server, world, tmp_path):
    from utils.pose import save_keypoints

    url, _ = server
    save_keypoints(tmp_path / "k.json", world.keypoints.select(slice(0, 9)))
    keypoints = b64((tmp_path / "k.json").read_bytes())
    msgs = run(url, {"source": "keypoints", "ref": png(world.ref_image), "pose": keypoints})
    assert msgs[-1]["type"] == "done" and check_frames_in_order(msgs) == 9
    msgs = run(url, {"source": "world", "ref": None, "world_seed": 3, "num_frames": 5})  # the world's own reference
    assert msgs[-1]["type"] == "done" and check_frames_in_order(msgs) == 5
    assert (msgs[0]["height"], msgs[0]["width"]) == (64, 96)


def test_live_frames_stop_and_restart(server, world, tmp_path):
    url, _ = server
    with websockets_client.connect(f"ws://{url}/ws", max_size=2**26) as ws:
        ws.send(json.dumps({"type": "start", "source": "live", "ref": png(world.ref_image)}))
        assert messages(ws, until=("started",))[-1]["type"] == "started"
        for frame in world.pose:  # 13 frames: the first block (9 frames) needs 9 + lookahead 4
            ws.send(json.dumps({"type": "frame", "kind": "pose", "image": png(frame)}))
        first = messages(ws, until=("frames",))
        ws.send(json.dumps({"type": "stop"}))
        rest = messages(ws)
        assert rest[-1]["type"] == "stopped" and rest[-1]["frames"] in (9, 13)
        assert check_frames_in_order(first + rest) == rest[-1]["frames"]
        assert len(video_frames(fetch(url, rest[-1]["video"]), tmp_path)) == rest[-1]["frames"]
        # restart on the same page: a live stream that ends with {"type": "end"}
        ws.send(json.dumps({"type": "start", "source": "live", "ref": png(world.ref_image)}))
        assert messages(ws, until=("started",))[-1]["type"] == "started"
        for frame in world.pose[:11]:  # 11 frames: the video covers the first 9 (1 + 4k)
            ws.send(json.dumps({"type": "frame", "kind": "pose", "image": png(frame)}))
        ws.send(json.dumps({"type": "end"}))
        msgs = messages(ws)
        assert msgs[-1]["type"] == "done" and check_frames_in_order(msgs) == 9


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unreadable_ref", r"the reference image could not be read as an image .*: upload a png or jpg"),
        ("ref_size", r"the reference image is 40x48 \(HxW\); height and width must be multiples of 16"),
        ("unreadable_video", r"the pose video could not be read .*: upload a video ffmpeg can decode"),
        ("pose_size", r"the pose video is 16x24 \(HxW\) but the reference image is 32x48"),
        ("live_stops", rf"no pose frame for {POSE_TIMEOUT:g} s: the live pose stream stopped"),
    ],
)
def test_bad_input_gives_a_message_on_the_page_and_in_the_log_and_the_server_keeps_serving(
    server, world, tmp_path, case, expected
):
    import re

    url, log = server
    ref = png(world.ref_image)
    start = {
        "unreadable_ref": {"source": "world", "ref": b64(b"this is not an image")},
        "ref_size": {"source": "world", "ref": png(np.zeros((40, 48, 3), np.uint8))},
        "unreadable_video": {"source": "video", "ref": ref, "pose": b64(b"\x00\x01 not a video" * 50)},
        "pose_size": {"source": "video", "ref": ref, "pose": mp4(tmp_path, world.pose[:5, ::2, ::2])},
        "live_stops": {"source": "live", "ref": ref},
    }[case]
    with websockets_client.connect(f"ws://{url}/ws", max_size=2**26) as ws:
        ws.send(json.dumps({"type": "start", **start}))
        if case == "live_stops":
            assert messages(ws, until=("started",))[-1]["type"] == "started"
            for frame in world.pose[:2]:  # then nothing: the stream stops before a block is complete
                ws.send(json.dumps({"type": "frame", "kind": "pose", "image": png(frame)}))
        msgs = messages(ws, timeout=60)
    assert msgs[-1]["type"] == "error" and re.search(expected, msgs[-1]["message"]), msgs[-1]
    deadline = time.monotonic() + 10
    while not re.search(expected, log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert re.search(expected, log.read_text())
    again = run(url, {"source": "world", "ref": ref, "num_frames": 5})  # still serving
    assert again[-1]["type"] == "done" and check_frames_in_order(again) == 5


# ----------------------------------------------------------------------------------------------- a real browser


def chrome_driver(tmp_path: Path):
    """Headless Debian Chromium through Selenium, or a skip that says what is missing."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"no {CHROMIUM} / {CHROMEDRIVER}: apt-get install chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={tmp_path / 'chrome'}",
                 "--window-size=1100,800"):  # fmt: skip
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for downloads
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_for(driver, script: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {script}; page errors: {driver.execute_script('return demo.errors')}")


def test_in_a_real_browser(server, world, tmp_path):
    """Open the page, upload a reference and a pose video, start, see the frames arrive in order, stop, start
    again, let it finish, play the mp4; a screenshot goes to the test folder (and to $DEMO_SCREENSHOT)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, _ = server
    write_image(tmp_path / "ref.png", world.ref_image)
    write_video(tmp_path / "pose.mp4", world.pose, fps=16, mode="lossless")
    driver = chrome_driver(tmp_path)
    try:
        driver.get(f"http://{url}/")
        wait_for(driver, "return demo.config !== null && !document.getElementById('start').disabled", 30)
        driver.find_element(By.ID, "ref").send_keys(str(tmp_path / "ref.png"))
        Select(driver.find_element(By.ID, "source")).select_by_value("video")
        driver.find_element(By.ID, "start").click()  # no pose file yet: the server's message shows on the page
        wait_for(driver, "return document.getElementById('error').textContent.includes('pose video is missing')", 30)
        wait_for(driver, "return !document.getElementById('start').disabled", 10)
        driver.execute_script("demo.errors = []")
        driver.find_element(By.ID, "pose").send_keys(str(tmp_path / "pose.mp4"))
        driver.find_element(By.ID, "start").click()
        wait_for(driver, "return demo.state === 'done'", 120)
        received = driver.execute_script("return demo.received")
        assert [r["block"] for r in received] == list(range(len(received)))
        starts = [sum(x["count"] for x in received[:i]) for i in range(len(received))]
        assert [r["frame_start"] for r in received] == starts
        assert sum(r["count"] for r in received) == 13
        assert driver.find_element(By.ID, "latency").text.endswith(" s")
        assert float(driver.find_element(By.ID, "fps").text) > 0
        href = driver.find_element(By.ID, "download").get_attribute("href")
        assert href.endswith(".mp4") and len(fetch(url, href.split(url, 1)[1])) > 1000
        wait_for(driver, "return document.getElementById('result').readyState >= 2", 30)  # the browser decoded it
        driver.execute_script("document.getElementById('result').play()")
        wait_for(driver, "return document.getElementById('result').currentTime > 0", 30)  # and it plays
        wait_for(driver, "return demo.shown === 13", 30)  # every frame was shown in the page
        shot = tmp_path / "demo.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("DEMO_SCREENSHOT"):
            shutil.copy(shot, os.environ["DEMO_SCREENSHOT"])
        # stop and start again: a world clip, stopped after its first block, then one run to the end
        Select(driver.find_element(By.ID, "source")).select_by_value("world")
        driver.find_element(By.ID, "num-frames").send_keys("81")
        driver.find_element(By.ID, "start").click()
        wait_for(driver, "return demo.received.length >= 1", 120)
        driver.find_element(By.ID, "stop").click()
        wait_for(driver, "return demo.state === 'stopped'", 120)
        driver.find_element(By.ID, "start").click()
        wait_for(driver, "return demo.state === 'done'", 180)
        assert sum(r["count"] for r in driver.execute_script("return demo.received")) == 81
        assert driver.execute_script("return demo.errors") == []
    finally:
        driver.quit()
