"""Driving a saved world model by hand, one chunk at a time: ``biwm generate`` (a key string or a pose
file) and biwm-play's web page (held keys) both open a :class:`Drive` from a :class:`DrivableModel`.

- :class:`DrivableModel`: a model file (``biwm.core.load``'s targets) with what driving it needs
  besides its weights and sampler: its dataset (held-out scenes to start from, the action step
  sizes), its evaluate settings (history and chunk length) and the speed options for the device.
- :class:`Start`: where a drive begins: the history latents, their frames and cameras, from a
  held-out scene of the model's dataset or from a video file.
- :class:`Drive`: a :class:`~biwm.core.sampling.RolloutSession` that decodes every chunk and keeps
  the log of what drove it (actions and poses per frame, and the frames while recording), which
  :meth:`Drive.save` writes as an mp4, a frame strip and a trajectory JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from biwm.core.camera import CameraTrack, default_intrinsics, format_keys, invert_pose, poses_to_actions
from biwm.core.sampling import RolloutSession
from biwm.core.speed import SpeedOptions
from biwm.core.window import WorldModel

DEFAULT_MOVE_STEP, DEFAULT_TURN_STEP_DEG = 0.15, 5.0  # a dataset without ActionSteps: the toy world's
HISTORY_FOV_DEG = 75.0  # a history video's cameras (unknown): the toy world's field of view


class DriveError(ValueError):
    """A drive that cannot start or go on as asked; the message names the file or field to blame."""


@dataclass
class Start:
    """Where a drive begins: ``latents`` [1, C, F, h, w], their ``frames`` [T, 3, H, W] uint8 and
    ``camera`` (latent-aligned, video rate: F * temporal factor frames); ``label`` says where from."""

    latents: Tensor
    frames: Tensor
    camera: CameraTrack
    label: str


def gpu_speed_options(world: WorldModel) -> SpeedOptions:
    """What interactive driving uses on a GPU: compiled blocks, the decoder compiled and channels-last
    where the backbone offers it, decode on a side stream."""
    from biwm.core.protocols import ChannelsLastDecoder, CompilableDecoder

    backbone = world.backbone
    return SpeedOptions(compile=True, compile_decoder=isinstance(backbone, CompilableDecoder),
                        channels_last_decoder=isinstance(backbone, ChannelsLastDecoder), overlap_decode=True)


class DrivableModel:
    """A world model ready to drive: its sampler, prompt, history and chunk lengths (``history_frames``,
    ``chunk_frames``), the frame rate of the videos it writes (``fps``) and the speed options (None:
    the device's default, :func:`gpu_speed_options` on CUDA and the eager model on a CPU, unless
    ``compile`` is false); each session applies them. :meth:`load` opens a saved model with its
    recipe's dataset (``ctx``: held-out scenes to start from, action step sizes) and evaluate
    settings; a model built in code (benchmarks) has no dataset and starts from a :class:`Start` it
    is given."""

    def __init__(self, world: WorldModel, sampler, device: torch.device | str = "cpu", *, prompt: str = "",
                 history_frames: int = 4, chunk_frames: int = 4, speed: SpeedOptions | None = None,
                 compile: bool = True, ctx=None, weights: str | Path = "(built in code)", fps: int = 8):
        self.device = torch.device(device)
        self.world, self.sampler, self.ctx, self.weights = world, sampler, ctx, weights
        self.history_frames, self.chunk_frames, self.fps = history_frames, chunk_frames, fps
        if speed is None and self.device.type == "cuda" and compile:
            speed = gpu_speed_options(world)
        self.speed = speed
        with torch.no_grad():
            self.text = world.backbone.encode_text([prompt]).to(self.device)
            self.null_text = world.backbone.encode_text([""]).to(self.device)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", speed: SpeedOptions | None = None,
             compile: bool = True) -> "DrivableModel":
        """A saved model (what :func:`biwm.core.load` takes) with its dataset and evaluate settings."""
        from biwm.core.loading import load_run_model

        world, sampler, ctx, weights = load_run_model(path, device)
        evaluate = ctx.recipe.stages[0]
        return cls(world, sampler, device, prompt=ctx.dataset.prompt, history_frames=evaluate.history_frames,
                   chunk_frames=evaluate.chunk_frames, speed=speed, compile=compile, ctx=ctx, weights=weights)

    @property
    def dataset(self):
        if self.ctx is None:
            raise DriveError("this model has no dataset to start from: give it a Start")
        return self.ctx.dataset

    @property
    def temporal_factor(self) -> int:
        return self.world.backbone.temporal_factor

    @property
    def chunk_video_frames(self) -> int:
        """Video frames each chunk generates (each needs one action or pose)."""
        return self.chunk_frames * self.temporal_factor

    @property
    def action_steps(self) -> tuple[float, float]:
        """(move_step, turn_step_deg) the dataset's actions integrate with."""
        from biwm.core.protocols import ActionSteps

        if self.ctx is not None and isinstance(self.dataset, ActionSteps):
            return self.dataset.move_step, self.dataset.turn_step_deg
        return DEFAULT_MOVE_STEP, DEFAULT_TURN_STEP_DEG

    def frame_size(self) -> tuple[int, int] | None:
        """(height, width) of the frames the dataset gives the model, when it says so."""
        fields = getattr(self.ctx.recipe.data, "frame_size_fields", None) if self.ctx is not None else None
        sizes = fields() if fields else {}
        height = next((v for k, v in sizes.items() if k.endswith("height")), None)
        width = next((v for k, v in sizes.items() if k.endswith("width")), None)
        return (height, width) if height and width else None

    def scene_start(self, index: int) -> Start:
        """The true history of held-out clip ``index`` of the model's dataset (the toy world: the scene of
        seed 1e9 + ``index``)."""
        if index < 0:
            raise DriveError(f"--scene: {index} is not a held-out clip index (>= 0)")
        data = self.dataset.latents("heldout", 1, self.history_frames, self.world.backbone, None,
                                    self.ctx.cache_key(), device=self.device, keep_frames=True, start=index)
        source = getattr(self.ctx.recipe.data, "source", "dataset")
        return Start(data.latents.to(self.device), data.frames[0], data.camera.to(self.device),
                     f"held-out scene {index} of {source}")

    def video_start(self, path: str | Path) -> Start:
        """The last frames of a video file as history (up to the model's history length, 1 + tf*k frames),
        with a still camera (its poses are unknown) and idle actions. Frames must have the model's size or
        an exact multiple of it (``biwm generate``'s upscaled mp4s), which is averaged down."""
        import imageio.v2 as imageio
        import numpy as np

        from biwm.core.data import video_frames_for

        path = Path(path)
        if not path.is_file():
            raise DriveError(f"--history: {path}: no such file")
        try:
            frames = imageio.mimread(str(path), memtest=False)
        except Exception as exc:  # imageio names no file in its errors
            raise DriveError(f"--history: {path} is not a readable video: {exc}") from None
        frames = torch.from_numpy(np.stack(frames[-video_frames_for(self.history_frames, self.temporal_factor):]))
        if frames.dim() != 4 or frames.shape[-1] not in (3, 4):
            raise DriveError(f"--history: {path}: expected RGB video frames, got an array of shape {list(frames.shape)}")
        frames = frames[..., :3].permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W]
        size = self.frame_size()
        if size is not None and tuple(frames.shape[-2:]) != size:
            factor = frames.shape[-2] // size[0]
            if factor < 2 or tuple(frames.shape[-2:]) != (size[0] * factor, size[1] * factor):
                raise DriveError(f"--history: {path} has {frames.shape[-1]}x{frames.shape[-2]} frames, the model "
                                 f"was trained on {size[1]}x{size[0]} (width x height; an exact multiple, as the "
                                 "videos biwm writes, is scaled down)")
            frames = torch.nn.functional.avg_pool2d(frames.float(), factor).round().to(torch.uint8)
        tf = self.temporal_factor
        usable = 1 + (frames.shape[0] - 1) // tf * tf  # 1 + tf*k frames
        frames = frames[-usable:]
        with torch.no_grad():
            video = frames.to(self.device).float().div(127.5).sub(1).transpose(0, 1)[None]
            latents = self.world.backbone.encode_video(video).float()
        count = latents.shape[2] * tf
        c2w = torch.eye(4, device=self.device).expand(1, count, 4, 4).clone()
        intrinsics = default_intrinsics(HISTORY_FOV_DEG, frames.shape[-1] / frames.shape[-2], 1, self.device)
        camera = CameraTrack(c2w, intrinsics, torch.zeros(1, count, dtype=torch.long, device=self.device))
        return Start(latents, frames, camera, str(path))

    def drive(self, start: Start, seed: int = 0, record: bool = True) -> "Drive":
        return Drive(self, start, seed, record)


class Drive:
    """An open rollout of a :class:`DrivableModel` from a :class:`Start`, driven chunk by chunk with
    action labels (:meth:`step`) or poses (:meth:`step_poses`); each step returns the chunk's frames
    [T, 3, H, W] uint8. Actions and poses are logged for every generated frame; frames only while
    ``recording`` (they are what :meth:`save` writes)."""

    def __init__(self, model: DrivableModel, start: Start, seed: int = 0, record: bool = True):
        self.model, self.start = model, start
        device = model.device
        generator = torch.Generator(device).manual_seed(seed)
        camera = start.camera if model.world.controls else None
        self.session = RolloutSession(model.world, model.text, model.null_text, start.latents, model.sampler,
                                      camera, generator, chunk_frames=model.chunk_frames, speed=model.speed,
                                      decode=True)
        self.actions: list[int] = []
        self.c2w: list[Tensor] = []
        self.recording = record
        self.recorded: list[Tensor] = []
        self.recorded_from = 0  # the first generated frame of the recording

    @property
    def generated_frames(self) -> int:
        return len(self.actions)

    def _last_pose(self) -> Tensor:
        return (self.session.camera.c2w if self.session.camera is not None else self.start.camera.c2w)[0, -1]

    def step(self, actions: Tensor) -> Tensor:
        """The next chunk under action labels [chunk_video_frames] (keys), integrated into poses with
        the dataset's step sizes."""
        n = self.model.chunk_video_frames
        if actions.shape != (n,) or actions.is_floating_point():
            raise DriveError(f"a chunk needs {n} integer action labels, got {actions.dtype} {list(actions.shape)}")
        if self.session.camera is None:
            self.session.step(None)
            self._log(actions, self._last_pose().expand(n, 4, 4))
            return self._decoded()
        move, turn = self.model.action_steps
        self.session.step(actions[None].to(self.model.device), move_step=move, turn_step_deg=turn)
        self._log(actions, self.session.camera.c2w[0, -n:])
        return self._decoded()

    def step_poses(self, c2w: Tensor) -> Tensor:
        """The next chunk under camera-to-world poses [chunk_video_frames, 4, 4], in the world frame
        of the start (its actions, for a model with action control, are the nearest labels)."""
        n = self.model.chunk_video_frames
        if c2w.shape != (n, 4, 4):
            raise DriveError(f"a chunk needs {n} poses [4, 4], got {list(c2w.shape)}")
        c2w = c2w.to(self.model.device, torch.float32)
        move, turn = self.model.action_steps
        actions = poses_to_actions(c2w[None], move, turn, start_c2w=self._last_pose()[None])[0]
        if self.session.camera is None:
            self.session.step(None)
            self._log(actions, c2w)
            return self._decoded()
        keep_actions = self.session.camera.actions is not None
        self.session.step(CameraTrack(c2w[None], self.session.camera.intrinsics,
                                      actions[None] if keep_actions else None))
        self._log(actions, c2w)
        return self._decoded()

    def _log(self, actions: Tensor, c2w: Tensor) -> None:
        self.actions.extend(int(a) for a in actions.tolist())
        self.c2w.extend(c2w.detach().float().cpu())

    def _decoded(self) -> Tensor:
        # waits for this chunk's frames (decoded on a side stream with overlap_decode): the next chunk's
        # keys are read only after they are shown, which keeps key-to-frame latency at one chunk
        frames = torch.cat(self.session.finish(), dim=1)[0].permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W]
        if self.recording:
            self.recorded.append(frames)
        return frames

    def record(self, on: bool) -> None:
        """Start (afresh) or stop keeping frames for :meth:`save`."""
        if on and not self.recording:
            self.recorded, self.recorded_from = [], self.generated_frames
        self.recording = on

    def trajectory(self) -> dict:
        """The recorded part of the drive: actions (labels and key string) and poses relative to the
        pose before its first frame, which :func:`read_poses` takes back."""
        first = self.recorded_from
        actions = self.actions[first:]
        before = self.c2w[first - 1] if first else self.start.camera.c2w[0, -1].cpu()
        relative = [invert_pose(before) @ pose for pose in self.c2w[first:]]
        return {"model": str(self.model.weights), "start": self.start.label, "start_frame": first,
                "sampler": self.model.sampler.describe(), "chunk_video_frames": self.model.chunk_video_frames,
                "keys": format_keys(actions) if actions else "", "actions": actions,
                "c2w": [[[round(float(v), 6) for v in row] for row in pose.tolist()] for pose in relative]}

    def save(self, out: Path, fps: int | None = None, scale: int = 4) -> list[Path]:
        """Writes ``out`` (mp4: the start's history, then the recorded frames), ``OUT_strip.png`` (at
        most 16 of its frames, history marked) and ``OUT.json`` (:meth:`trajectory`), each atomically;
        returns their paths."""
        from biwm.core.checkpoint import atomic_write_text
        from biwm.core.video import write_mp4, write_strip

        if not self.recorded:
            raise DriveError("nothing recorded to save")
        out = Path(out)
        history = self.start.frames if self.recorded_from == 0 else self.recorded[0][:0]
        video = torch.cat([history.cpu(), *self.recorded])
        strip, trajectory = out.with_name(out.stem + "_strip.png"), out.with_suffix(".json")
        write_mp4(out, video, fps=fps or self.model.fps, scale=scale)
        every = max(1, -(-video.shape[0] // 16))
        write_strip(strip, [video], every=every, scale=max(1, 64 // video.shape[-1]), labels=["rollout"],
                    history=history.shape[0])
        atomic_write_text(trajectory, json.dumps(self.trajectory()))
        return [out, strip, trajectory]


def read_poses(path: str | Path) -> Tensor:
    """Camera-to-world poses [T, 4, 4] from a JSON file: ``{"c2w": [[4x4], ...]}`` (what
    :meth:`Drive.save` writes) or the list alone; relative to the pose before the first frame."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DriveError(f"--poses: {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DriveError(f"--poses: {path} is not JSON: {exc}") from None
    poses = data.get("c2w") if isinstance(data, dict) else data
    try:
        c2w = torch.tensor(poses, dtype=torch.float32)
    except (TypeError, ValueError):
        c2w = None
    if c2w is None or c2w.dim() != 3 or c2w.shape[1:] != (4, 4) or not len(c2w):
        raise DriveError(f"--poses: {path}: 'c2w' must be a non-empty list of 4x4 camera-to-world matrices")
    if not bool(torch.isfinite(c2w).all()):
        raise DriveError(f"--poses: {path}: 'c2w' holds NaN or inf")
    return c2w


def chunked(count: int, per_chunk: int, chunks: int | None, what: str) -> int:
    """How many chunks ``count`` frames of ``what`` (keys, poses) drive: exactly ``chunks`` of
    ``per_chunk`` frames when given, else a whole number of chunks; anything else is an error
    that says how many frames to give."""
    if chunks is not None:
        if count != chunks * per_chunk:
            raise DriveError(f"{what} give {count} frames, but {chunks} chunks of {per_chunk} frames need "
                             f"{chunks * per_chunk}; give exactly {chunks * per_chunk} (nothing is truncated or padded)")
        return chunks
    if count % per_chunk:
        low, high = count // per_chunk * per_chunk, (count // per_chunk + 1) * per_chunk
        options = f"{low} or {high}" if low else f"{high}"
        raise DriveError(f"{what} give {count} frames, not a whole number of chunks of {per_chunk} frames; give "
                         f"{options} (nothing is truncated or padded)")
    return count // per_chunk
