"""What ``biwm play`` delivers to a page: frames per second received by a WebSocket client, and the
latency from a key change to the first frame generated under it (median and p95 over ``--presses``
key changes), through the real server (biwm-play's Starlette app on uvicorn, in this process) and a
real WebSocket client.

    python benchmarks/play.py --out /tmp/play                          # the toy-lab student on a CPU
    python benchmarks/play.py --preset tiny --presses 10 --out /tmp/play_tiny
    python benchmarks/play.py --preset wan2.1-t2v-1.3b --out docs/results/gpu_play_h200   # on a GPU

``--model`` (default: the shipped toy-lab student) drives a saved model from held-out scene 0 of its
dataset; ``--preset`` a model of that shape with random weights (speed does not depend on them), from
random history latents. On a GPU the session uses biwm play's speed options (compiled blocks and
decoder, decode on a side stream; ``--eager``: none).

The client streams (the server generates chunk after chunk) and changes the held keys ``--presses``
times, alternating a key and no key, each a random fraction of a chunk after the last change showed
its first frame, so changes land anywhere within a chunk. Latency: from sending the change to
receiving the first frame whose chunk was generated with it (the server echoes the change's id).
FPS: frames received over the streaming time after the first chunk (compilation, warm-up) until
the last press. Timings are of this machine; nothing here is a GPU figure unless it ran on one.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SIZES, environment, markdown_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESS_KEYS = ["l", "w", "j", "d"]  # pressed in turn, each followed by a release


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def drivable_model(args):
    """(model, start) for ``--model`` or ``--preset``."""
    from biwm.core.driving import DrivableModel, Start

    device = torch.device(args.device)
    if args.preset is None:
        model = DrivableModel.load(args.model, device, compile=not args.eager)
        return model, model.scene_start(0)
    from _common import build_world, keyboard_camera, latent_grid

    from biwm.core.data import video_frames_for
    from biwm.core.sampling import Sampler

    height, width, _ = SIZES[args.preset]
    world = build_world(args.preset, device, args.dtype, inference=True).eval()
    model = DrivableModel(world, Sampler(4, 5.0, student=True), device, compile=not args.eager,
                          weights=f"random {args.preset}")
    tf, hw = world.backbone.temporal_factor, latent_grid(world, height, width)
    history = torch.randn(1, world.backbone.latent_channels, model.history_frames, *hw, device=device,
                          dtype=world.backbone.dtype)
    frames = torch.zeros(video_frames_for(model.history_frames, tf), 3, height, width, dtype=torch.uint8)
    camera = keyboard_camera(model.history_frames, tf, width / height, device)
    return model, Start(history, frames, camera, f"random latents ({args.preset})")


async def measure(url: str, presses: int, seed: int) -> dict:
    import websockets

    rng = random.Random(seed)
    sent: dict[int, float] = {}
    latencies: list[float] = []
    chunk_key_id, chunk_ms = {}, []
    received: list[float] = []
    async with websockets.connect(url.replace("http", "ws") + "ws", max_size=2**26) as ws:
        hello = json.loads(await ws.recv())
        key_id, waiting, next_change, streaming_from = 0, None, None, None
        while len(latencies) < presses:
            timeout = None if next_change is None else max(0.0, next_change - time.perf_counter())
            try:
                message = await asyncio.wait_for(ws.recv(), timeout)
            except asyncio.TimeoutError:  # time for the next key change, between frames
                message = None
            now = time.perf_counter()
            if message is None:
                pass
            elif isinstance(message, str):
                data = json.loads(message)
                if data["type"] == "chunk":
                    chunk_key_id[data["index"]] = data["key_id"]
                    chunk_ms.append(data["gen_ms"])
                elif data["type"] == "error":
                    raise RuntimeError(data["message"])
                continue
            else:
                chunk, index = int.from_bytes(message[:4], "big"), int.from_bytes(message[4:8], "big")
                if streaming_from is None:
                    if chunk == 0 and index == hello["chunk_frames"] - 1:
                        streaming_from = now  # warm-up (and compilation) done
                        next_change = now
                    continue
                received.append(now)
                if waiting is not None and chunk_key_id.get(chunk, -1) >= waiting and index == 0:
                    latencies.append(now - sent[waiting])
                    waiting = None
                    next_change = now + rng.random() * statistics.median(chunk_ms[-4:]) / 1000
            if waiting is None and next_change is not None and now >= next_change:
                key_id += 1
                held = [PRESS_KEYS[(key_id // 2) % len(PRESS_KEYS)]] if key_id % 2 else []
                sent[key_id] = time.perf_counter()
                await ws.send(json.dumps({"type": "keys", "keys": held, "id": key_id}))
                waiting, next_change = key_id, None
        span = received[-1] - streaming_from if received else 0.0
    return {"fps_delivered": len(received) / span if span > 0 else None, "frames_received": len(received),
            "streaming_s": span, "presses": len(latencies),
            "latency_ms": {"median": 1000 * statistics.median(latencies), "p95": 1000 * percentile(latencies, 0.95),
                           "min": 1000 * min(latencies), "max": 1000 * max(latencies)},
            "chunk_generation_ms_median": statistics.median(chunk_ms[1:] or chunk_ms), "hello": hello}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "examples" / "weights" / "toyworld-student"))
    parser.add_argument("--preset", choices=sorted(SIZES), help="random weights of this shape instead of --model")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="with --preset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eager", action="store_true", help="on a GPU: no compiled blocks or decoder")
    parser.add_argument("--presses", type=int, default=50, help="key changes to time (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes OUT.json")
    args = parser.parse_args()
    if args.presses < 1:
        parser.error("--presses: must be >= 1")

    from biwm.play.server import PlayServer, serving

    model, start = drivable_model(args)
    server = PlayServer(lambda scene: model.drive(start, args.seed, record=False), model.chunk_video_frames,
                        model.fps, Path(tempfile.mkdtemp(prefix="biwm-play-bench-")), str(model.weights),
                        model.sampler.describe())
    with serving(server) as url:
        result = asyncio.run(measure(url, args.presses, args.seed))
    hello = result.pop("hello")
    speed = model.speed.describe() if model.speed is not None else "eager"
    setup = {"model": str(model.weights), "start": start.label, "device": args.device, "speed": speed,
             "sampler": model.sampler.describe(), "frame": [hello["height"], hello["width"]],
             "chunk_video_frames": hello["chunk_frames"], "presses": args.presses}
    data = {"setup": setup, "environment": environment(torch.device(args.device)), **result}
    write_json(args.out.with_suffix(".json"), data)
    rows = [["FPS delivered", result["fps_delivered"]], ["key→frame median (ms)", result["latency_ms"]["median"]],
            ["key→frame p95 (ms)", result["latency_ms"]["p95"]],
            ["chunk generation median (ms)", result["chunk_generation_ms_median"]],
            ["frames received", result["frames_received"]], ["key changes timed", result["presses"]]]
    print(f"biwm play over a WebSocket: {setup['model']} on {args.device} ({speed}; {setup['sampler']}), "
          f"{hello['width']}x{hello['height']}")
    print(markdown_table(["measure", "value"], rows))
    print(f"wrote {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
