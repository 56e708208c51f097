"""The play page's server: a Starlette app with the static page at ``/`` and one WebSocket at ``/ws``.

One generation session at a time (the model holds one GPU session): the connection that gets it
drives a :class:`biwm.core.driving.Drive`; another gets a ``busy`` message and is closed (code
1013, try again later). Closing the tab frees the session once the chunk in flight is finished
(a step cannot be interrupted half way; it runs in a worker thread, so the event loop never blocks).

Messages. Page -> server, JSON text of at most ``MAX_MESSAGE`` bytes:

- ``{"type": "keys", "keys": ["w", "j"], "id": 7}``: the key letters held now (:mod:`biwm.play.keys`);
  ``id`` numbers the key change, so the page can time key-to-frame latency.
- ``{"type": "pause", "paused": true}``; ``{"type": "step"}`` (one chunk, while paused);
  ``{"type": "reset", "scene": 3}`` (a new start: held-out
  scene 3 of the model's dataset); ``{"type": "record", "on": true}`` (start recording; ``false``
  stops and writes the mp4, its strip and the action log to the record folder).

Server -> page: JSON ``hello`` (model, start, frame size, chunk length, fps), ``chunk`` (its index,
the keys and action it was generated with, the ``key_id`` of the last key change it reflects, its
generation time), then one binary message per frame: an 8-byte header (chunk index, frame index
within the chunk: two big-endian uint32) and the frame as JPEG (quality ``JPEG_QUALITY``; a chunk's frames
are encoded in parallel threads); ``paused``, ``reset``, ``saved``;
``error`` (a bad message: the session goes on) and ``busy``.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import anyio
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from biwm.core.driving import Drive, DriveError
from biwm.play.keys import KEYS, action_for

MAX_MESSAGE = 4096  # bytes of one page message; the page's are below 200
# JPEG, not PNG: an 832x480 frame encodes in about 3 ms instead of 7-70 ms (PNG's time grows with the
# frame's detail; a random-weights model's frames took 72 ms each on this project's CPU), which put
# the encoding of a 16-frame chunk (over a second) between every two chunks of generation
JPEG_QUALITY = 90
ENCODERS = ThreadPoolExecutor(4, thread_name_prefix="biwm-play-jpeg")  # Pillow releases the GIL while encoding
MAX_SCENE = 1_000_000
BUSY = ("busy: another viewer is driving the model (one generation session at a time); close that tab, "
        "or try again when it is closed")
STATIC = Path(__file__).parent / "static"


def frame_message(chunk: int, index: int, frame: torch.Tensor) -> bytes:
    """One binary frame message: the header and frame [3, H, W] uint8 as JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(frame.permute(1, 2, 0).cpu().numpy()).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return struct.pack(">II", chunk, index) + buffer.getvalue()


def chunk_messages(chunk: int, frames: torch.Tensor) -> list[bytes]:
    """The frame messages of a chunk's frames [T, 3, H, W] uint8, encoded in parallel, in order."""
    frames = frames.cpu()  # one copy for the chunk, not one per frame
    return list(ENCODERS.map(lambda item: frame_message(chunk, *item), enumerate(frames)))


class BadMessage(ValueError):
    """A page message that is not one the protocol knows; the reply is an error frame."""


def parse_message(raw: dict[str, Any]) -> dict[str, Any]:
    """A received ASGI WebSocket message -> a checked command dict (a BadMessage says what is wrong)."""
    text = raw.get("text")
    if text is None:
        raise BadMessage("binary messages are not accepted; send JSON text")
    if len(text.encode("utf-8", "replace")) > MAX_MESSAGE:
        raise BadMessage(f"message too long: {len(text)} characters, at most {MAX_MESSAGE} bytes")
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadMessage(f"not JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(message, dict):
        raise BadMessage(f"expected a JSON object, got {type(message).__name__}")
    kind = message.get("type")
    if kind == "keys":
        keys, key_id = message.get("keys"), message.get("id", 0)
        if not isinstance(keys, list) or len(keys) > len(KEYS) or not all(isinstance(k, str) for k in keys):
            raise BadMessage(f"keys: expected a list of at most {len(KEYS)} key letters")
        if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 <= key_id < 2**53:
            raise BadMessage("keys: id must be a non-negative integer")
        try:
            action = action_for(set(keys))
        except ValueError as exc:
            raise BadMessage(f"keys: {exc}") from None
        return {"type": "keys", "keys": sorted(set(keys)), "action": action, "id": key_id}
    if kind in ("pause", "record"):
        field = "paused" if kind == "pause" else "on"
        if not isinstance(message.get(field), bool):
            raise BadMessage(f"{kind}: {field} must be true or false")
        return {"type": kind, field: message[field]}
    if kind == "step":
        return {"type": "step"}
    if kind == "reset":
        scene = message.get("scene", 0)
        if not isinstance(scene, int) or isinstance(scene, bool) or not 0 <= scene < MAX_SCENE:
            raise BadMessage(f"reset: scene must be an integer in [0, {MAX_SCENE})")
        return {"type": "reset", "scene": scene}
    raise BadMessage(f"unknown message type {kind!r}; known: keys, pause, step, reset, record")


class PlaySession:
    """One connection's generation session: a receiver that updates the held keys and queues commands,
    and a generator that steps the drive chunk by chunk in a worker thread and streams the frames."""

    def __init__(self, server: "PlayServer", ws: WebSocket, drive: Drive, scene: int, paused: bool):
        self.server, self.ws, self.drive, self.scene = server, ws, drive, scene
        self.keys: list[str] = []
        self.action, self.key_id = 0, 0
        self.paused = paused
        self.commands: list[dict[str, Any]] = []
        self.wake = anyio.Event()
        self.send_lock = anyio.Lock()
        self.chunk = 0

    async def send_json(self, message: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(message))

    async def send_bytes(self, data: bytes) -> None:
        async with self.send_lock:
            await self.ws.send_bytes(data)

    def hello(self) -> dict[str, Any]:
        start = self.drive.start
        return {"type": "hello", "model": str(self.server.model_name), "start": start.label, "scene": self.scene,
                "height": int(start.frames.shape[-2]), "width": int(start.frames.shape[-1]),
                "chunk_frames": self.server.chunk_frames, "fps": self.server.fps, "paused": self.paused,
                "sampler": self.server.describe, "recording": self.drive.recording}

    async def run(self) -> None:
        await self.send_json(self.hello())
        async with anyio.create_task_group() as group:
            group.start_soon(self._generate)
            await self._receive()
            group.cancel_scope.cancel()  # the page left: a step in flight finishes first (not abandoned)

    async def _receive(self) -> None:
        while True:
            raw = await self.ws.receive()
            if raw["type"] == "websocket.disconnect":
                return
            try:
                message = parse_message(raw)
            except BadMessage as exc:
                await self.send_json({"type": "error", "message": str(exc)})
                continue
            if message["type"] == "keys":
                self.keys, self.action, self.key_id = message["keys"], message["action"], message["id"]
            elif message["type"] == "pause":
                self.paused = message["paused"]
                await self.send_json({"type": "paused", "paused": self.paused})
            else:
                self.commands.append(message)
            self.wake.set()

    async def _generate(self) -> None:
        try:
            while True:
                while self.commands:
                    await self._command(self.commands.pop(0))
                if self.paused:
                    self.wake = anyio.Event()
                    await self.wake.wait()
                    continue
                await self._chunk()
        except (WebSocketDisconnect, OSError):
            return  # the page left while a frame was on its way; the receiver ends the session

    async def _chunk(self) -> None:
        keys, action, key_id = list(self.keys), self.action, self.key_id
        actions = torch.full((self.server.chunk_frames,), action, dtype=torch.long)
        began = time.perf_counter()
        try:
            frames = await anyio.to_thread.run_sync(self.drive.step, actions)
        except Exception as exc:  # a failing model must not take the server down: say so and pause
            self.paused = True
            await self.send_json({"type": "error", "message": f"generation failed, paused: {type(exc).__name__}: "
                                  f"{exc}"})
            return
        messages = await anyio.to_thread.run_sync(chunk_messages, self.chunk, frames)
        await self.send_json({"type": "chunk", "index": self.chunk, "keys": keys, "action": action, "key_id": key_id,
                              "frames": len(messages), "gen_ms": round(1000 * (time.perf_counter() - began), 1),
                              "recording": self.drive.recording})
        for message in messages:
            await self.send_bytes(message)
        self.chunk += 1

    async def _command(self, message: dict[str, Any]) -> None:
        if message["type"] == "reset":
            try:
                self.drive = await anyio.to_thread.run_sync(self.server.opener, message["scene"])
            except DriveError as exc:
                await self.send_json({"type": "error", "message": str(exc)})
                return
            self.scene, self.chunk = message["scene"], 0
            await self.send_json({**self.hello(), "type": "reset"})
        elif message["type"] == "step":
            await self._chunk()
        elif message["type"] == "record":
            if message["on"]:
                self.drive.record(True)
                await self.send_json({"type": "recording", "on": True})
                return
            try:
                files = await anyio.to_thread.run_sync(self.server.save, self.drive)
            except DriveError as exc:
                await self.send_json({"type": "error", "message": f"record: {exc}"})
                files = None
            self.drive.record(False)
            if files:
                await self.send_json({"type": "saved", "files": [str(f) for f in files]})


class PlayServer:
    """What the app serves: ``opener(scene)`` opens a :class:`Drive` from a held-out scene (it may take
    seconds: it runs in a worker thread), ``save(drive)`` writes a recording. One session at a time."""

    def __init__(self, opener: Callable[[int], Drive], chunk_frames: int, fps: int, record_dir: Path,
                 model_name: str = "", describe: str = "", scene: int = 0):
        self.opener, self.chunk_frames, self.fps = opener, chunk_frames, fps
        self.record_dir, self.model_name, self.describe, self.scene = Path(record_dir), model_name, describe, scene
        self.busy = False
        self.sessions = 0  # sessions finished (tests wait on it)

    @classmethod
    def for_model(cls, model, record_dir: Path, scene: int = 0, seed: int = 0) -> "PlayServer":
        """The server of a :class:`biwm.core.driving.DrivableModel`: each session starts from a held-out
        scene of its dataset, not recording."""
        return cls(lambda index: model.drive(model.scene_start(index), seed, record=False), model.chunk_video_frames,
                   model.fps, record_dir, model_name=str(model.weights), describe=model.sampler.describe(),
                   scene=scene)

    def save(self, drive: Drive) -> list[Path]:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return drive.save(self.record_dir / f"play-{stamp}-{self.sessions}.mp4")

    async def index(self, request) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def websocket(self, ws: WebSocket) -> None:
        await ws.accept()
        if self.busy:
            await ws.send_text(json.dumps({"type": "busy", "message": BUSY}))
            await ws.close(code=1013)
            return
        self.busy = True
        try:
            paused = ws.query_params.get("paused") == "1"
            drive = await anyio.to_thread.run_sync(self.opener, self.scene)
            await PlaySession(self, ws, drive, self.scene, paused).run()
        except WebSocketDisconnect:
            pass
        finally:
            self.busy = False
            self.sessions += 1

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/", self.index), WebSocketRoute("/ws", self.websocket)])


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (0: any free port) for uvicorn to serve on; an OSError says why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if sock.family == socket.AF_INET6 else f"http://{host}:{port}/"


def serve(server: PlayServer, sock: socket.socket) -> None:
    """Serve the play page on ``sock`` until interrupted."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(server.app(), log_level="warning")).run(sockets=[sock])


@contextmanager
def serving(server: PlayServer, host: str = "127.0.0.1", port: int = 0):
    """The play page served from a background thread (tests, benchmarks/play.py); yields its URL."""
    import uvicorn

    sock = listen(host, port)
    runner = uvicorn.Server(uvicorn.Config(server.app(), log_level="warning"))
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not runner.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not runner.started:
        raise RuntimeError("the play server did not start")
    try:
        yield url(sock)
    finally:
        runner.should_exit = True
        thread.join(30)
        sock.close()
