"""biwm play's server (biwm-play): held keys to actions, the WebSocket protocol against a fake drive
(malformed messages, busy, a tab closed mid-chunk), and recording with the toy-lab student."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
websockets_sync = pytest.importorskip("websockets.sync.client")

from biwm.core.camera import parse_keys  # noqa: E402
from biwm.play.keys import action_for  # noqa: E402
from biwm.play.server import MAX_MESSAGE, PlayServer, serving  # noqa: E402

from conftest import ROOT  # noqa: E402


def test_held_keys_map_to_the_actions_of_key_strings():
    assert action_for(set()) == 0
    for held, keys in [({"w"}, "w"), ({"w", "j"}, "wj"), ({"l", "s", "d"}, "sdl"), ({"i"}, "i"), ({"k", "a"}, "ak")]:
        assert action_for(held) == int(parse_keys(keys)[0]), held
    # opposite keys cancel: w+s is no move, w+s+j only turns left; all four turns held is idle
    assert action_for({"w", "s"}) == 0
    assert action_for({"w", "s", "j"}) == int(parse_keys("j")[0])
    assert action_for(set("ijkl")) == 0
    assert action_for({"j"}) != action_for({"l"})
    with pytest.raises(ValueError, match=r"unknown keys \['q'\]"):
        action_for({"w", "q"})


class FakeDrive:
    """Frames whose every pixel is the chunk's action label; ``gate`` (when set) holds each step until released."""

    def __init__(self, gate: threading.Event | None = None):
        self.start = type("Start", (), {"frames": torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "label": "fake"})()
        self.recording, self.gate, self.stepping, self.steps_done = False, gate, threading.Event(), 0

    def step(self, actions):
        self.stepping.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        self.steps_done += 1
        return actions.to(torch.uint8)[:, None, None, None].expand(len(actions), 3, 8, 8).clone()

    def record(self, on):
        self.recording = on


def fake_server(tmp_path: Path, gate=None) -> tuple[PlayServer, list[FakeDrive]]:
    drives = []

    def opener(scene):
        drives.append(FakeDrive(gate))
        return drives[-1]

    return PlayServer(opener, 4, 8, tmp_path), drives


def connect(url: str, paused: bool = True):
    return websockets_sync.connect(url.replace("http", "ws") + "ws" + ("?paused=1" if paused else ""),
                                   open_timeout=30, close_timeout=5)


def receive_json(ws) -> dict:
    message = ws.recv(timeout=60)
    assert isinstance(message, str), "expected a JSON message, got a frame"
    return json.loads(message)


def test_malformed_and_oversized_messages_get_error_frames_and_the_session_goes_on(tmp_path):
    server, _ = fake_server(tmp_path)
    bad = {"not json {": "not JSON", "[1, 2]": "expected a JSON object, got list", '{"type": "jump"}': "unknown message type",
           '{"type": "keys", "keys": "w"}': "keys: expected a list", '{"type": "keys", "keys": ["w", "x"]}': "unknown keys",
           '{"type": "keys", "keys": ["w"], "id": -1}': "id must be", '{"type": "pause", "paused": "yes"}': "paused must",
           '{"type": "reset", "scene": "x"}': "scene must", '{"type": "record"}': "on must be",
           json.dumps({"type": "keys", "keys": [], "pad": "x" * MAX_MESSAGE}): "message too long"}
    with serving(server) as url, connect(url) as ws:
        assert receive_json(ws)["type"] == "hello"
        for message, expected in bad.items():
            ws.send(message)
            reply = receive_json(ws)
            assert reply["type"] == "error" and expected in reply["message"], (message, reply)
        ws.send(b"\x00\x01binary")
        assert "binary messages are not accepted" in receive_json(ws)["message"]
        # still alive: the held keys drive the next chunk
        ws.send(json.dumps({"type": "keys", "keys": ["w", "j"], "id": 3}))
        ws.send(json.dumps({"type": "pause", "paused": False}))
        assert receive_json(ws) == {"type": "paused", "paused": False}
        chunk = receive_json(ws)
        assert (chunk["type"], chunk["keys"], chunk["action"], chunk["key_id"]) == ("chunk", ["j", "w"],
                                                                                   int(parse_keys("wj")[0]), 3)
        for index in range(4):
            frame = ws.recv(timeout=60)
            assert struct.unpack(">II", frame[:8]) == (chunk["index"], index)
            image = Image.open(io.BytesIO(frame[8:]))
            pixels = torch.from_numpy(np.array(image)).int()
            assert image.format == "JPEG" and pixels.shape == (8, 8, 3)
            assert int((pixels - chunk["action"]).abs().max()) <= 2  # a flat frame survives JPEG within rounding


def test_second_viewer_is_busy_and_a_tab_closed_mid_chunk_frees_the_session_after_that_chunk(tmp_path):
    gate = threading.Event()
    server, drives = fake_server(tmp_path, gate)
    with serving(server) as url:
        with connect(url, paused=False) as ws:
            assert receive_json(ws)["type"] == "hello"
            assert drives[0].stepping.wait(30)  # a chunk is in flight
            with connect(url) as second:
                reply = receive_json(second)
                assert reply["type"] == "busy" and "another viewer" in reply["message"]
                with pytest.raises(Exception):  # then closed
                    second.recv(timeout=10)
                assert second.close_code == 1013
            ws.close()  # the tab closes mid-chunk
        time.sleep(0.5)
        assert server.busy and drives[0].steps_done == 0  # the step is not abandoned half way
        gate.set()
        deadline = time.monotonic() + 30
        while server.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server.busy and drives[0].steps_done == 1 and server.sessions == 1
        with connect(url) as third:  # the freed session serves the next viewer
            assert receive_json(third)["type"] == "hello" and len(drives) == 2


@pytest.fixture(scope="module")
def student():
    from biwm.core.driving import DrivableModel

    return DrivableModel.load(ROOT / "examples" / "weights" / "toyworld-student")


def test_record_writes_the_session_video_strip_and_action_log(student, tmp_path):
    server = PlayServer.for_model(student, tmp_path / "rec")
    with serving(server) as url, connect(url) as ws:
        hello = receive_json(ws)
        assert (hello["height"], hello["width"], hello["chunk_frames"]) == (32, 32, 4)
        ws.send(json.dumps({"type": "record", "on": True}))
        assert receive_json(ws) == {"type": "recording", "on": True}
        for key_id, keys in enumerate((["w"], ["l"]), 1):
            ws.send(json.dumps({"type": "keys", "keys": keys, "id": key_id}))
            ws.send(json.dumps({"type": "step"}))  # one chunk, still paused
            chunk = receive_json(ws)
            assert chunk["keys"] == keys and chunk["key_id"] == key_id
            frames = [ws.recv(timeout=120) for _ in range(4)]
            assert all(isinstance(f, bytes) for f in frames)
        ws.send(json.dumps({"type": "record", "on": False}))
        saved = receive_json(ws)
    assert saved["type"] == "saved"
    mp4, strip, log = (Path(f) for f in saved["files"])
    assert mp4.suffix == ".mp4" and strip.name.endswith("_strip.png") and mp4.stat().st_size > 0
    trajectory = json.loads(log.read_text())
    assert trajectory["keys"] == "w*4,l*4" and trajectory["actions"] == parse_keys("w*4,l*4").tolist()
    assert trajectory["start"] == "held-out scene 0 of toyworld" and len(trajectory["c2w"]) == 8
    # moving forward 0.15 per frame: the fourth pose is 0.6 ahead of the start, along its view axis
    assert abs(trajectory["c2w"][3][2][3] - 0.6) < 1e-4
    import imageio.v2 as imageio

    assert len(imageio.mimread(str(mp4))) == 4 + 8  # the history, then the recorded frames


def test_chunk_messages_are_the_frames_in_order_as_jpeg():
    from biwm.play.server import chunk_messages

    frames = torch.stack([torch.full((3, 16, 24), 10 * i, dtype=torch.uint8) for i in range(6)])
    frames[:, 0, :, :12] = 200  # red on the left half: the channel order and orientation survive
    messages = chunk_messages(7, frames)
    assert [struct.unpack(">II", m[:8]) for m in messages] == [(7, i) for i in range(6)]
    for i, message in enumerate(messages):
        image = Image.open(io.BytesIO(message[8:]))
        assert image.format == "JPEG" and image.size == (24, 16)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).int()
        assert float((pixels - frames[i].int()).abs().float().mean()) <= 6  # JPEG's error, largest at the edge
        assert float(pixels[0, :, :10].float().mean()) >= 180 and float(pixels[0, :, 14:].float().mean()) <= 10 * i + 20
