"""Toy-lab probe: per-chunk PSNR of rollouts against copy-last-frame, for several samplers, with the
sharpness and IDM camera-following accuracy of each, and a strip PNG (rows: truth, sample; 4 clips).
Quicker than ``biwm eval`` (no dynamics, no shuffled baseline), for comparing training arms and samplers:

    python scripts/lab_probe.py MODEL [--weights FILE] [--n 32] [--chunks 10] [--samplers 20:1,50:1] --out PREFIX

A sampler is STEPS:CFG[:SHIFT[:HISTORY_SIGMA]] (shift default 3, history sigma 0). Writes PREFIX.json and PREFIX.png.
``--dynamics-scenes N`` also scores each sampler's ``dynamics`` (as ``biwm eval`` does, on N still-camera scenes).
"""
import argparse, json, time
from pathlib import Path
import torch
from biwm.core.data import video_frames_for
from biwm.core.evaluation import Sampler, quality_scores, rollout_video
from biwm.core.metrics import sharpness
from biwm.toyworld.idm import find_idm, load_idm
from biwm.toyworld.scores import camera_scores, dynamics_scores
from biwm.core.recipe import dataset_for, validate_recipe
from biwm.core.runner import RunContext, evaluation_recipe_data, find_run
from rich.console import Console
from biwm.core.stages.common import load_world_model, text_embeddings

ap = argparse.ArgumentParser()
ap.add_argument("run", help="a model file, its folder, or a run/stage folder (what biwm eval takes)")
ap.add_argument("--weights"); ap.add_argument("--n", type=int, default=32)
ap.add_argument("--chunks", type=int, default=10); ap.add_argument("--out", required=True)
ap.add_argument("--samplers", default="20:1,50:1,20:2")
ap.add_argument("--start", type=int, default=0, help="first held-out clip: e.g. 100000 for a validation set "
                "apart from the clips biwm eval scores")
ap.add_argument("--dynamics-scenes", type=int, default=0, help="still-camera scenes for dynamics (0: skip)")
ap.add_argument("--dynamics-samples", type=int, default=2)
a = ap.parse_args()
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
run, w = find_run(Path(a.weights or a.run))
r = validate_recipe(evaluation_recipe_data(run, w), base_dir=run, source=str(w))
world = load_world_model(RunContext(r, run, console=Console(quiet=True)), init=w, report=False).to(dev).eval()
bb = world.backbone
H, K = 4, 4
dataset = dataset_for(r)
toy = getattr(dataset, "toyworld", None)  # the IDM and the still-camera scenes are the toy world's
if a.dynamics_scenes and toy is None:
    raise SystemExit(f"error: --dynamics-scenes needs the toy world; the model's dataset is {r.data.source}")
data = dataset.latents("heldout", a.n, H + a.chunks * K, bb, None, "probe", device=dev, keep_frames=True, start=a.start)
text, null = text_embeddings(world, dataset.prompt, a.n, dev)
hist = data.latents[:, :, :H].to(dev)
tf = bb.temporal_factor
cam = data.camera.frames(slice(tf - 1, None))
hv = video_frames_for(H, tf)
truth = data.frames[:, hv:].float().div(127.5).sub(1)
last = data.frames[:, hv - 1:hv].float().div(127.5).sub(1)
idm_file = find_idm(toy) if toy is not None else None
idm = load_idm(idm_file, toy, dev).model if idm_file else None
res = {"weights": str(w), "n": a.n, "chunks": a.chunks, "start": a.start}
copy = quality_scores(last.expand_as(truth), truth, K * tf)
res["copy_last"] = [round(x, 2) for x in copy["psnr_per_chunk"]]
print("copy-last", res["copy_last"], flush=True)
videos = {}
for spec in a.samplers.split(","):
    steps, cfg, shift, hsig = (spec.split(":") + ["3", "0"][len(spec.split(":")) - 2:])[:4]
    t0 = time.time()
    sampler = Sampler(int(steps), float(shift), float(cfg), history_sigma=float(hsig))
    v = rollout_video(world, text, null, hist, cam, a.chunks, K, sampler, 0, "bidirectional")
    q = quality_scores(v, truth, K * tf)
    res[spec] = {"psnr_per_chunk": [round(x, 2) for x in q["psnr_per_chunk"]], "seconds": round(time.time() - t0, 1)}
    if idm is not None:
        follow = camera_scores(idm, torch.cat([last, v], 1), data.camera, hv, toy, K * tf)
        res[spec]["idm_accuracy"] = round(follow["accuracy"], 3)
        res[spec]["idm_accuracy_per_chunk"] = [round(x, 3) for x in follow["accuracy_per_chunk"]]
    if a.dynamics_scenes:
        d = dynamics_scores(world, text, null, toy, a.dynamics_scenes, a.dynamics_samples, H, 3, K,
                            sampler, 1, "bidirectional", dev)
        res[spec].update({k: round(d[k], 4) for k in ("dynamics", "dynamics_generated", "dynamics_generated_frozen",
                                                      "dynamics_true")})
    videos[spec] = v
    print(spec, res[spec], flush=True)
    Path(a.out + ".json").write_text(json.dumps(res, indent=1))
for spec, v in videos.items():
    res[spec]["sharpness"] = round(sharpness(v, truth), 3)
from PIL import Image
spec0 = a.samplers.split(",")[0]
v = videos[spec0]
rows = []
for i in range(min(4, a.n)):
    t = torch.cat([data.frames[i, :hv].float().div(127.5).sub(1), truth[i, :12]], 0)
    g = torch.cat([data.frames[i, :hv].float().div(127.5).sub(1), v[i, :12]], 0)
    rows += [t, g]
img = torch.stack([torch.cat(list(r_), 2) for r_ in rows])  # [R, 3, H, W*T]
img = torch.cat(list(img), 1).permute(1, 2, 0)
Image.fromarray(((img.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(a.out + ".png")
Path(a.out + ".json").write_text(json.dumps(res, indent=1))
