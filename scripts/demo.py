"""Live pose-driven streaming in the browser: a local page where you pick a reference image and a pose source (a
pose video, a keypoints JSON, a clip of the synthetic world, or live frames sent by the page: a local pose video
played in the page, or the webcam through DWPose when its onnx files are there), press start and watch the frames
arrive block by block, with the generation FPS and the first-frame latency; stop, restart, download the mp4.

    python scripts/demo.py                      # the embedded default: tiny networks with RANDOM weights (noise)
    python scripts/demo.py --config configs/inference/student_1.3b.yaml --weights student.safetensors --port 8765

then open http://127.0.0.1:8765. The networks load once; one clip streams at a time. Protocol (one WebSocket, /ws;
JSON messages): the page sends {"type": "start", "ref": base64 image or null, "source": "world" | "video" |
"keypoints" | "live", "pose": base64 file, "world_seed", "num_frames", "seed", "prompt"}, then for "live" sources
{"type": "frame", "image": base64 png/jpg, "kind": "pose" | "rgb"} frames and {"type": "end"}; {"type": "stop"}
stops. The server answers {"type": "started", ...}, one {"type": "frames", "block", "frame_start", "images": [base64
jpg], "fps", "first_frame_s"} per block, {"type": "done" | "stopped", "video": "/video/<id>.mp4", ...} and
{"type": "error", "message"} for bad input (the server keeps serving). GET / is the page, GET /config what the
server can do, GET /video/<id>.mp4 a finished clip. The model needs a local attention window for unbounded clips:
global-attention presets stream through long_clip_window + long_clip_sink (inference.py's config keys).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import queue
import re
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

if __package__ in (None, ""):  # run as `python scripts/demo.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import inference  # noqa: E402
from pipeline.causal_diffusion_inference import StreamingPosePipeline  # noqa: E402
from pipeline.streaming import PoseStreamError  # noqa: E402
from utils.config import DTYPES  # noqa: E402
from utils.pose import DWPoseDetector, DWPoseUnavailable, draw_pose_frames, iter_pose_frames, load_keypoints  # noqa: E402
from utils.video_io import FrameStream, VideoReadError, VideoWriter  # noqa: E402

log = logging.getLogger("demo")
PAGE = Path(__file__).with_name("demo_page.html")
SOURCES = ("world", "video", "keypoints", "live")


class DemoInputError(ValueError):
    """Bad input from the page: shown there and logged; the server keeps serving."""


class PoseStreamStopped(RuntimeError):
    """A live pose stream sent no frame for --pose-timeout seconds."""


class StoppedEarly(RuntimeError):
    """The page stopped the clip before its first frame."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    server.add_argument("--port", type=int, default=8765, help="port to serve on (0: any free port, logged)")
    server.add_argument("--out-dir", type=Path, default=Path("outputs/demo"),
                        help="folder for the finished mp4s and uploaded files (default outputs/demo)")  # fmt: skip
    server.add_argument("--keep-videos", type=int, default=8, help="finished mp4s kept on disk (older are removed)")
    server.add_argument("--max-upload-mb", type=float, default=64.0,
                        help="largest WebSocket message (an uploaded image or pose video) in MB")  # fmt: skip
    server.add_argument("--pose-timeout", type=float, default=10.0,
                        help="seconds without a live pose frame after which the stream counts as stopped")  # fmt: skip
    server.add_argument("--max-frames", type=int, default=2001,
                        help="most video frames of one clip (1 + 4k); a clip also ends with its pose")  # fmt: skip
    server.add_argument("--world-frames", type=int, default=81,
                        help="frames of a world-clip pose source (1 + 4k) when the page asks for no count")  # fmt: skip
    server.add_argument("--precompute-y", action="store_true",
                        help="encode the i2v input y up front (~29 latent frames: steadier first blocks, a later "
                             "first frame) instead of as the blocks need it")  # fmt: skip
    server.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the frames sent to the page")
    server.add_argument("--fps", type=float, help="frame rate of the mp4 and of the page's playback (default: the "
                        "config's, 16)")  # fmt: skip
    inference.add_model_arguments(p, default_config=inference.TINY_CONFIG)  # a causal student streams, not the teacher
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="inference config values, e.g. sink_size=3")
    return p


# ----------------------------------------------------------------------------------------------------------
# Inputs from the page
# ----------------------------------------------------------------------------------------------------------


def decode_base64(data: object, what: str) -> bytes:
    """A base64 string (optionally a data: URL) -> bytes, or a DemoInputError naming `what`."""
    if not isinstance(data, str) or not data:
        raise DemoInputError(f"{what} is missing: choose a file")
    try:
        return base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
    except (binascii.Error, ValueError):
        raise DemoInputError(f"{what} is not base64 data: upload the file again") from None


def decode_image(data: bytes, what: str) -> np.ndarray:
    """Image file bytes -> uint8 RGB [H, W, 3]."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.array(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DemoInputError(f"{what} could not be read as an image ({e}): upload a png or jpg") from None


def encode_jpeg(frame: np.ndarray, quality: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode()


def check_size(ref: np.ndarray, what: str) -> None:
    h, w = ref.shape[:2]
    if h % 16 or w % 16:
        raise DemoInputError(f"{what} is {h}x{w} (HxW); height and width must be multiples of 16: crop or resize it, "
                             f"e.g. to {max(16, h // 16 * 16)}x{max(16, w // 16 * 16)}")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# One clip
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One streamed clip: its id, the live frames the page sends, the stop flag, the mp4 it writes."""

    id: str
    video: Path
    live: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=256))
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


_END = object()  # the page's {"type": "end"}


class Demo:
    """The loaded networks and what one server does with them."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        args.prompt = args.num_frames = None  # inference.load_config reads these flags
        self.cfg = inference.load_config(args)
        self.fps = args.fps or self.cfg.fps
        self.device = inference.resolve_device(self.cfg.device)
        auto = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = DTYPES[self.cfg.dtype] if self.cfg.dtype != "auto" else auto
        paths = inference.resolve_paths(self.cfg, args)
        self._scratch = tempfile.TemporaryDirectory(prefix=f"{inference.SCRATCH_PREFIX}demo-")
        if self.cfg.random_weights:
            log.warning("random_weights: the %s networks have RANDOM weights; the frames are noise", self.cfg.preset)
            networks = inference.random_networks(self.cfg, Path(self._scratch.name), self.device, self.dtype)
        else:
            files = inference.required_files(self.cfg, paths, args.models_dir)
            text_cache = paths.get("text_cache", Path(self._scratch.name) / "text_cache")
            networks = inference.load_networks(self.cfg, files, text_cache, self.device, self.dtype)
        self.pipeline = inference.make_pipeline(self.cfg, *networks)
        if not isinstance(self.pipeline, StreamingPosePipeline) or self.pipeline.model.pose_dim is None:
            raise inference.InputError(f"preset {self.cfg.preset} is not a causal pose model: the demo streams the "
                                       "student (e.g. --preset tiny or wan_1.3b_causal_pose)")  # fmt: skip
        self.dwpose, self.dwpose_reason = None, ""
        if all(key in paths and paths[key].is_file() for key in ("det_onnx", "pose_onnx")):
            try:
                self.dwpose = DWPoseDetector(paths["det_onnx"], paths["pose_onnx"], device="cpu")
            except DWPoseUnavailable as e:
                self.dwpose_reason = str(e)
        else:
            self.dwpose_reason = "no DWPose onnx files (--det-onnx, --pose-onnx; python download_models.py student)"
        self.out_dir = args.out_dir
        (self.out_dir / "uploads").mkdir(parents=True, exist_ok=True)
        self.busy = threading.Lock()
        self.jobs: dict[str, Job] = {}

    def capabilities(self) -> dict:
        model = self.pipeline.model
        return {
            "preset": self.cfg.preset, "random_weights": self.cfg.random_weights, "fps": self.fps,
            "sources": list(SOURCES), "webcam": self.dwpose is not None, "webcam_reason": self.dwpose_reason,
            "block_frames": 4 * model.num_frame_per_block, "lookahead_frames": 4, "max_frames": self.args.max_frames,
            "local_attn_size": model.local_attn_size, "sink_size": model.sink_size, "device": str(self.device),
        }  # fmt: skip

    # -------------------------------------------------------------------------------------------- inputs

    def world_clip(self, seed: int, size: tuple[int, int] | None, frames: int):
        from utils.world.synthetic_pose import generate_sample, load_world_config

        h, w = size or (64, 96)
        return generate_sample(load_world_config(height=h, width=w, num_frames=frames), seed)

    def inputs(self, msg: dict, job: Job) -> tuple[np.ndarray, Iterator[np.ndarray], np.ndarray | None, int | None]:
        """(reference [H, W, 3], pose frames, reference pose or None, max frames) from a start message."""
        source = msg.get("source")
        if source not in SOURCES:
            raise DemoInputError(f"pose source {source!r} is unknown: pick one of {', '.join(SOURCES)}")
        ref = None
        if msg.get("ref"):
            ref = decode_image(decode_base64(msg["ref"], "the reference image"), "the reference image")
            check_size(ref, "the reference image")
        elif source != "world":
            raise DemoInputError("the reference image is missing: choose one (only a world clip brings its own)")
        max_frames = msg.get("num_frames") or None
        if max_frames is not None:
            if not isinstance(max_frames, int) or max_frames < 1 or (max_frames - 1) % 4:
                raise DemoInputError(f"frames {max_frames!r} is not 1 + 4k (1, 5, 9, ..., 81): pick another count")
        limit = self.args.max_frames
        max_frames = limit if max_frames is None else min(max_frames, limit)
        ref_pose = None
        if source == "world":
            seed = msg.get("world_seed", 0)
            if not isinstance(seed, int) or seed < 0:
                raise DemoInputError(f"world seed {seed!r} must be a whole number >= 0")
            length = min(msg.get("num_frames") or self.args.world_frames, limit)
            sample = self.world_clip(seed, None if ref is None else ref.shape[:2], length)
            if ref is None:
                ref, ref_pose = sample.ref_image, sample.ref_pose
            frames: Iterator[np.ndarray] = iter(sample.pose)
        elif source == "video":
            path = self.upload(msg.get("pose"), job, "the pose video", ".mp4")
            try:
                stream = FrameStream(path)
            except (VideoReadError, OSError) as e:
                raise DemoInputError(f"the pose video could not be read ({str(e).splitlines()[0]}): upload a video "
                                     "ffmpeg can decode (e.g. H.264 mp4) of drawn pose frames") from None  # fmt: skip
            self.same_size(stream.first, ref, "the pose video")
            frames = iter(stream)
        elif source == "keypoints":
            path = self.upload(msg.get("pose"), job, "the keypoints JSON", ".json")
            try:
                keypoints = load_keypoints(path)
            except (ValueError, KeyError, TypeError, OSError) as e:
                raise DemoInputError(f"the keypoints JSON could not be read ({str(e).splitlines()[0]}): upload the "
                                     "JSON scripts/extract_pose.py writes") from None  # fmt: skip
            frames = iter_pose_frames(keypoints, *ref.shape[:2])
        else:
            frames = self.live_frames(job, ref.shape[:2])
        return ref, frames, ref_pose, max_frames

    def upload(self, data: object, job: Job, what: str, suffix: str) -> Path:
        path = self.out_dir / "uploads" / f"{job.id}{suffix}"
        path.write_bytes(decode_base64(data, what))
        return path

    @staticmethod
    def same_size(frame: np.ndarray, ref: np.ndarray, what: str) -> None:
        if frame.shape != ref.shape:
            raise DemoInputError(f"{what} is {frame.shape[0]}x{frame.shape[1]} (HxW) but the reference image is "
                                 f"{ref.shape[0]}x{ref.shape[1]}: give pose frames at its size")  # fmt: skip

    def live_frames(self, job: Job, size: tuple[int, int]) -> Iterator[np.ndarray]:
        """Frames the page sends ({"type": "frame"}), until "end", stop, or --pose-timeout without one."""
        timeout = self.args.pose_timeout
        while not job.stop.is_set():
            try:
                item = job.live.get(timeout=timeout)
            except queue.Empty:
                raise PoseStreamStopped(f"no pose frame for {timeout:g} s: the live pose stream stopped") from None
            if item is _END:
                return
            kind, data = item
            frame = decode_image(decode_base64(data, "a live frame"), "a live frame")
            if kind == "rgb":
                if self.dwpose is None:
                    raise DemoInputError(f"webcam frames need DWPose: {self.dwpose_reason}")
                frame = draw_pose_frames(self.dwpose(frame[None]), *frame.shape[:2])[0]
            if frame.shape[:2] != tuple(size):
                frame = np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.BILINEAR))
            yield frame

    # -------------------------------------------------------------------------------------------- generation

    def run(self, msg: dict, job: Job, send) -> None:
        """Stream one clip to the page (in a worker thread); every outcome ends in one message."""
        start = time.perf_counter()
        try:
            try:
                ref, frames, ref_pose, max_frames = self.inputs(msg, job)
                self.stream(job, msg, ref, frames, ref_pose, max_frames, start, send)
            finally:
                for upload in (self.out_dir / "uploads").glob(f"{job.id}.*"):
                    upload.unlink(missing_ok=True)
        except (DemoInputError, PoseStreamError, PoseStreamStopped, inference.InputError) as e:
            log.warning("clip %s: %s", job.id, e)
            send({"type": "error", "message": str(e)})
        except StoppedEarly:
            log.info("clip %s: stopped before its first frame", job.id)
            send({"type": "stopped", "frames": 0, "video": None})
        except ConnectionClosed:
            log.info("clip %s: the page went away", job.id)
        except Exception as e:  # a bug or an exhausted device: say so on the page, keep serving
            log.exception("clip %s failed", job.id)
            send({"type": "error", "message": f"the generation failed: {type(e).__name__}: {e}"})
        finally:
            self.busy.release()

    def stream(self, job: Job, msg: dict, ref, frames, ref_pose, max_frames, start: float, send) -> None:
        pipe = self.pipeline
        seed, prompt = msg.get("seed", 0), msg.get("prompt") or self.cfg.prompt
        if not isinstance(seed, int):
            raise DemoInputError(f"seed {seed!r} must be a whole number")
        ref_tensor = inference.to_image_tensor(ref)
        pose_tensor = None if ref_pose is None else inference.to_pose_tensor(ref_pose)
        try:
            clip = pipe.prepare_stream(ref_tensor, frames, str(prompt), pose_tensor, max_frames=max_frames,
                                       precompute_y=self.args.precompute_y)  # fmt: skip
        except ValueError as e:
            raise DemoInputError(str(e)) from None
        h, w = ref.shape[:2]
        send({"type": "started", "session": job.id, "height": h, "width": w, "fps": self.fps,
              "lookahead_frames": clip.pose.lookahead, "prepare_s": time.perf_counter() - start})  # fmt: skip
        written, first_s, stalled = 0, None, None
        with VideoWriter(job.video, self.fps) as writer:
            try:
                for i, block in enumerate(pipe.stream(clip, seed)):
                    video = inference.to_uint8_frames(block.frames)
                    writer.write(video)
                    now = time.perf_counter() - start
                    first_s = now if first_s is None else first_s
                    send({"type": "frames", "block": i, "frame_start": block.frame_start, "count": len(video),
                          "images": [encode_jpeg(f, self.args.jpeg_quality) for f in video],
                          "fps": (written + len(video)) / now, "first_frame_s": first_s})  # fmt: skip
                    written += len(video)
                    if job.stop.is_set():
                        break
            except PoseStreamStopped as e:
                stalled = str(e)
            if written == 0 and stalled:
                raise PoseStreamStopped(stalled)
            if written == 0 and job.stop.is_set():
                raise StoppedEarly()
            if written == 0:
                raise DemoInputError("the pose source ended before the first frame: give at least 1 pose frame")
        elapsed = time.perf_counter() - start
        outcome = "stopped" if job.stop.is_set() or stalled else "done"
        if stalled:
            log.warning("clip %s: %s; kept the %d frames made", job.id, stalled, written)
            send({"type": "error", "message": f"{stalled}; the {written} frames made so far are in the mp4"})
        log.info("clip %s %s: %d frames in %.2f s (%.1f FPS, first frame after %.2f s)", job.id, outcome, written,
                 elapsed, written / elapsed, first_s)  # fmt: skip
        send({"type": outcome, "frames": written, "video": f"/video/{job.video.name}", "fps": written / elapsed,
              "first_frame_s": first_s, "seconds": elapsed})  # fmt: skip
        self.prune_videos()

    def prune_videos(self) -> None:
        videos = sorted(self.out_dir.glob("*.mp4"), key=lambda p: p.stat().st_mtime)
        for old in videos[: max(0, len(videos) - self.args.keep_videos)]:
            old.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# Server: the page, finished videos, the WebSocket
# ----------------------------------------------------------------------------------------------------------

VIDEO_PATH = re.compile(r"^/video/([0-9a-f]{32}\.mp4)$")


def _response(status: int, reason: str, body: bytes, content_type: str) -> Response:
    headers = Headers({"Content-Type": content_type, "Content-Length": str(len(body)), "Cache-Control": "no-store"})
    return Response(status, reason, headers, body)


def make_request_handler(demo: Demo):
    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/ws":
            return None  # the WebSocket handshake
        if path in ("/", "/index.html"):
            return _response(200, "OK", PAGE.read_bytes(), "text/html; charset=utf-8")
        if path == "/config":
            return _response(200, "OK", json.dumps(demo.capabilities()).encode(), "application/json")
        match = VIDEO_PATH.match(path)
        if match and (demo.out_dir / match.group(1)).is_file():
            return _response(200, "OK", (demo.out_dir / match.group(1)).read_bytes(), "video/mp4")
        return _response(404, "Not Found", b"not found\n", "text/plain")

    return process_request


def make_ws_handler(demo: Demo):
    async def handler(ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        job: Job | None = None

        def send(message: dict) -> None:  # from the worker thread: in order, waiting for the socket
            asyncio.run_coroutine_threadsafe(ws.send(json.dumps(message)), loop).result(timeout=120)

        async def reply(message: dict) -> None:
            await ws.send(json.dumps(message))

        try:
            async for raw in ws:
                try:
                    msg = json.loads(raw)
                    kind = msg.get("type") if isinstance(msg, dict) else None
                except (json.JSONDecodeError, TypeError):
                    kind, msg = None, {}
                if kind == "start":
                    if not demo.busy.acquire(blocking=False):
                        log.warning("a start while a clip is streaming: refused")
                        await reply({"type": "error", "message": "a clip is streaming: stop it first"})
                        continue
                    job = Job(uuid.uuid4().hex, demo.out_dir / f"{uuid.uuid4().hex}.mp4")
                    job.thread = threading.Thread(target=demo.run, args=(msg, job, send), daemon=True)
                    job.thread.start()
                elif kind == "frame" and job is not None:
                    try:
                        job.live.put_nowait((msg.get("kind", "pose"), msg.get("image")))
                    except queue.Full:
                        log.warning("clip %s: live frames arrive faster than they are used; one dropped", job.id)
                elif kind == "end" and job is not None:
                    job.live.put(_END)
                elif kind == "stop" and job is not None:
                    job.stop.set()
                    with contextlib.suppress(queue.Full):
                        job.live.put_nowait(_END)
                else:
                    log.warning("unknown message %r", str(raw)[:80])
                    await reply({"type": "error", "message": "unknown message: the page and the server disagree "
                                 "(reload the page)"})  # fmt: skip
        except ConnectionClosed:
            pass
        finally:
            if job is not None:
                job.stop.set()
                with contextlib.suppress(queue.Full):
                    job.live.put_nowait(_END)

    return handler


async def serve_forever(demo: Demo, host: str, port: int, ready: threading.Event | None = None) -> None:
    max_size = int(demo.args.max_upload_mb * 2**20)
    async with serve(make_ws_handler(demo), host, port, process_request=make_request_handler(demo),
                     max_size=max_size, compression=None) as server:  # fmt: skip
        bound = server.sockets[0].getsockname()[1]
        log.info("serving on http://%s:%d (the %s networks on %s)", host, bound, demo.cfg.preset, demo.device)
        if ready is not None:
            ready.set()
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for flag, value in (("--max-frames", args.max_frames), ("--world-frames", args.world_frames)):
        if value < 1 or (value - 1) % 4:
            raise SystemExit(f"error: {flag} {value} is not 1 + 4k (e.g. 81)")
    try:
        demo = Demo(args)
    except inference.InputError as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(demo, args.host, args.port))


if __name__ == "__main__":
    main()
