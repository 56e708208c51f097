"""Stage 2: DMD on self-rollouts, backward simulation, the LoRA critic, cadence and resume."""

from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from conftest import tiny_recipe


def tiny_world(seed=0):
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunContext

    torch.manual_seed(seed)
    recipe = validate_recipe(tiny_recipe("/tmp/unused"))
    return RunContext(recipe=recipe, run_dir=recipe.run_dir).build_world_model()


def window_for(world, batch=2, history=2, k=2):
    from biwm.toyworld.world import ToyWorldConfig, render_clips
    from biwm.core.window import Window

    clips = render_clips([1, 2][:batch], history + 2 * k, ToyWorldConfig(height=32, width=32))
    latents = world.backbone.encode_video(clips.frames_float().transpose(1, 2))
    text = world.backbone.encode_text([""]).expand(batch)
    win = Window(text=text, chunk=latents[:, :, history:history + k], timestep=torch.zeros(batch),
                 history=latents[:, :, :history], camera=clips.camera.frames(slice(0, history + k)))
    return win, latents, clips.camera, text


def test_student_sigmas_match_the_published_list():
    from biwm.core.dmd import student_sigmas

    assert (student_sigmas(4, 5.0) * 1000).tolist() == pytest.approx([1000, 937.5, 833.333, 625, 0], abs=1e-3)


def test_backward_simulation_keeps_grad_only_at_the_exit_step():
    from biwm.core.dmd import few_step_chunk, student_sigmas

    world = tiny_world()
    win, _, _, _ = window_for(world)
    seen = []
    forward = world.forward

    def recording(window):
        seen.append(torch.is_grad_enabled())
        return forward(window)

    world.forward = recording
    sigmas = student_sigmas(4, 5.0)

    def noise():
        return torch.randn(win.chunk.shape)

    x0 = few_step_chunk(world, win, sigmas, noise, exit_step=2)
    assert seen == [False, False, True] and x0.requires_grad
    x0.square().mean().backward()
    assert world.backbone.trainable().proj_out.weight.grad is not None
    seen.clear()
    out = few_step_chunk(world, win, sigmas, noise)  # inference: every step, no graph
    assert seen == [False] * 4 and not out.requires_grad
    with pytest.raises(ValueError, match="exit_step 4 outside the 4 student steps"):
        few_step_chunk(world, win, sigmas, noise, exit_step=4)


def test_self_rollout_conditions_on_its_own_chunks():
    from biwm.core.data import latent_aligned_camera
    from biwm.core.dmd import self_rollout, student_sigmas

    world = tiny_world()
    _, latents, camera, text = window_for(world)
    rolled = self_rollout(world, text, latents[:, :, :2], latent_aligned_camera(camera, 1), 2, 2, student_sigmas(2, 5.0),
                          torch.Generator().manual_seed(0), exit_step=1)
    assert [c.window.history.shape[2] for c in rolled] == [2, 4]
    assert torch.equal(rolled[1].window.history[:, :, :2], latents[:, :, :2])
    assert torch.equal(rolled[1].window.history[:, :, 2:], rolled[0].latents.detach())
    assert not rolled[1].window.history.requires_grad and all(c.latents.requires_grad for c in rolled)
    assert rolled[1].window.camera.num_frames == 6


class KnownDenoiser(nn.Module):
    """Predicts x̂0 = target(x_t) exactly: the velocity that makes predict_x0 return it."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.backbone = SimpleNamespace(timestep=lambda sigma: 1000 * sigma)  # Wan's convention

    def forward(self, window):
        sigma = (window.timestep / 1000).view(-1, 1, 1, 1, 1)
        return (window.chunk - self.target(window.chunk)) / sigma


def test_dmd_moves_samples_toward_the_teacher():
    """Teacher knows the data mode mu; the critic knows the generator's samples sit at x. The DMD
    update must carry x to mu, and its direction is normalised per sample."""
    from biwm.core.dmd import RolledChunk, dmd_direction, dmd_loss
    from biwm.core.text import TextConditioning
    from biwm.core.window import Window

    mu = torch.full((2, 4, 2, 3, 3), 0.5)
    x = nn.Parameter(torch.randn(2, 4, 2, 3, 3, generator=torch.Generator().manual_seed(0)) * 2)
    teacher = KnownDenoiser(lambda x_t: mu)
    critic = KnownDenoiser(lambda x_t: x.detach())
    window = Window(text=TextConditioning.from_tensor(torch.zeros(2, 1, 4), "t5"), chunk=torch.zeros_like(mu),
                    timestep=torch.zeros(2))
    optimizer = torch.optim.SGD([x], lr=0.02 * x.numel())  # the loss is a mean over elements
    rng = torch.Generator().manual_seed(1)
    distances = [float((x.detach() - mu).abs().mean())]
    for _ in range(70):
        loss = dmd_loss(RolledChunk(x, window), teacher, critic, window.text.select(0), 1.0, torch.full((2,), 0.5), rng)
        optimizer.zero_grad()
        loss.backward()
        # the gradient on x is exactly the normalised direction, over the element count
        expected = dmd_direction(x.detach(), mu, x.detach()) / x.numel()
        torch.testing.assert_close(x.grad, expected)
        optimizer.step()
        distances.append(float((x.detach() - mu).abs().mean()))
    assert all(b < a for a, b in zip(distances, distances[1:]))
    assert distances[-1] < 0.2 * distances[0]
    # per-sample weights (forward-KL's hook) scale each sample's push
    loss = dmd_loss(RolledChunk(x, window), teacher, critic, torch.zeros(1, 1, 4), 1.0, torch.full((2,), 0.5), rng,
                    weights=torch.tensor([0.0, 2.0]))
    optimizer.zero_grad()
    loss.backward()
    assert x.grad[0].abs().sum() == 0 and x.grad[1].abs().sum() > 0


def test_lora_critic_leaves_the_teacher_unchanged():
    from biwm.core.dmd import RolledChunk, critic_loss
    from biwm.core.lora import adapters_disabled, add_lora

    world = tiny_world()
    win, _, _, _ = window_for(world)
    noisy = win.with_chunk(torch.randn(win.chunk.shape, generator=torch.Generator().manual_seed(3)),
                           torch.full((2,), 600.0))
    with torch.no_grad():
        before = world(noisy)
    world.requires_grad_(False)  # as in the stage: the teacher is frozen, then gets adapters
    base = world.backbone.trainable()
    params = add_lora(base, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    assert params and all(p.requires_grad for p in params)
    assert {n for n, p in world.named_parameters() if p.requires_grad} == {
        n for n, _ in world.named_parameters() if "lora_" in n}
    with torch.no_grad():
        torch.testing.assert_close(world(noisy), before)  # B starts at zero
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    rng = torch.Generator().manual_seed(0)
    for _ in range(3):
        loss = critic_loss(RolledChunk(win.chunk, win), world, 3.0, rng)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        critic_out = world(noisy)
        with adapters_disabled(base):
            teacher_out = world(noisy)
        after = world(noisy)
    torch.testing.assert_close(teacher_out, before, rtol=0, atol=0)
    assert not torch.allclose(critic_out, before)
    torch.testing.assert_close(after, critic_out)  # adapters back on
    with pytest.raises(ValueError, match=r"lora_targets: \['to_q'\] match no layer"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), 2, ["to_q"])


def distill_recipe(run_dir, **distill):
    recipe = tiny_recipe(run_dir, finetune={"steps": 2})
    recipe["stages"] = [recipe["stages"][0],
                        {"stage": "distill", "steps": 5, "batch_size": 2, "history_frames": 2, "chunks": 2,
                         "chunk_frames": 2, "student_steps": 2, "generator_every": 2, "checkpoint_every": 2,
                         "generator_lr": 1e-4, "critic_lr": 1e-4, **distill}]
    return recipe


def run(data, resume=False):
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    return run_recipe(validate_recipe(data), resume=resume)


def test_distill_stage_cadence_weights_and_student_sampling(tmp_path):
    recipe = distill_recipe(tmp_path / "run")
    recipe["stages"].append({"stage": "evaluate", "trajectories": 2, "history_frames": 2, "chunks": 1,
                             "chunk_frames": 2, "steps": 7, "dynamics_scenes": 0, "shuffled_baseline": False,
                             "write_report": False, "teacher_steps": 5, "teacher_cfg": 3.0})
    metrics = run(recipe)
    distill = metrics["stages"]["distill"]
    # two time-scale rule: the critic every iteration, the generator at iterations 0, 2, 4
    assert distill["critic_updates"] == 5 and distill["generator_updates"] == 3
    weights = tmp_path / "run" / "distill" / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert f.metadata()["stage"] == "distill" and f.metadata()["student_steps"] == "2"
    stage1 = load_file(str(tmp_path / "run" / "finetune" / "model.safetensors"))
    student = load_file(str(weights))
    assert stage1.keys() == student.keys()
    assert any(not torch.equal(stage1[k], student[k]) for k in stage1)  # the generator (EMA) moved
    evaluation = metrics["stages"]["evaluate"]
    assert evaluation["nfe_per_chunk"] == 2 and evaluation["cfg_scale"] == 1.0  # the student's steps, not 7
    assert evaluation["sampler"].startswith("distilled generator, 2 steps")
    # the teacher (stage 1, with CFG) on the same trajectories, side by side with the student
    assert evaluation["teacher_nfe_per_chunk"] == 10 and evaluation["student_nfe_per_chunk"] == 2
    assert evaluation["student_psnr"] == evaluation["psnr"] and evaluation["teacher_psnr"] != evaluation["psnr"]
    for key in ("teacher_idm_accuracy", "student_idm_accuracy"):
        assert 0 <= evaluation[key] <= 1
    assert "student_psnr" not in metrics  # one block per stage, no merged top-level keys that mix stages


def test_distill_generator_init_starts_the_generator_from_another_model(tmp_path):
    from safetensors.torch import save_file

    run(tiny_recipe(tmp_path / "stage1", finetune={"steps": 2}) | {"stages": [tiny_recipe(tmp_path)["stages"][0]]})
    teacher = tmp_path / "stage1" / "finetune" / "model.safetensors"
    with safe_open(str(teacher), "pt") as f:
        meta = f.metadata()
    other = {k: v * 1.5 if v.is_floating_point() else v for k, v in load_file(str(teacher)).items()}
    from biwm.core.checkpoint import DIGEST_KEY, save_tensors

    save_tensors(other, tmp_path / "student.safetensors", {k: v for k, v in meta.items() if k != DIGEST_KEY})
    recipe = distill_recipe(tmp_path / "run", steps=1, init=str(teacher), generator_lr=1e-12,
                            generator_init=str(tmp_path / "student.safetensors"))
    recipe["stages"] = recipe["stages"][1:]
    run(recipe)
    student = load_file(str(tmp_path / "run" / "distill" / "model.safetensors"))
    moved = [k for k in student if student[k].is_floating_point() and other[k].abs().max() > 0]
    assert moved and all(torch.allclose(student[k], other[k], atol=1e-6) for k in moved)
    assert not all(torch.allclose(student[k], load_file(str(teacher))[k], atol=1e-6) for k in moved)


def test_distill_with_a_lora_critic_runs(tmp_path):
    metrics = run(distill_recipe(tmp_path / "run", steps=2, critic="lora", lora_rank=2))
    assert metrics["stages"]["distill"]["critic_updates"] == 2


def test_resume_mid_distill_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    from biwm.core import dmd

    run(distill_recipe(tmp_path / "a"))
    reference = load_file(str(tmp_path / "a" / "distill" / "model.safetensors"))
    crashed = distill_recipe(tmp_path / "b")
    real = dmd.critic_loss
    calls = {"n": 0}

    def crash_in_iteration_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:  # two chunks per iteration: the first chunk of iteration 3
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(dmd, "critic_loss", crash_in_iteration_three)
    with pytest.raises(KeyboardInterrupt):
        run(crashed)
    monkeypatch.undo()
    stage = tmp_path / "b" / "distill"
    assert [p.name for p in (stage / "checkpoints").iterdir()] == ["step_00000002"]
    assert not (stage / "model.safetensors").exists()
    metrics = run(crashed, resume=True)
    assert metrics["stages"]["distill"]["critic_updates"] == 5 and metrics["stages"]["distill"]["generator_updates"] == 3
    resumed = load_file(str(stage / "model.safetensors"))
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)


def test_distill_recipe_errors(tmp_path):
    from biwm.core.recipe import RecipeError, validate_recipe

    recipe = distill_recipe(tmp_path / "r", losses=["ganz"], sigma_min=0.99)
    with pytest.raises(RecipeError) as exc:
        validate_recipe(recipe)
    text = str(exc.value)
    assert "stages[1].losses[0].name: unknown loss 'ganz'; allowed: dmd, forward-kl, gan" in text
    assert "sigma_min (0.99) must be below sigma_max (0.98)" in text
    assert "the distill stage needs 'dmd'" in text
    # forward-kl weights DMD by the GAN discriminator's density ratio: without gan it is an error
    with pytest.raises(RecipeError, match=r"stages\[1\]: losses\[1\]: 'forward-kl' needs 'gan' in the same stage"):
        validate_recipe(distill_recipe(tmp_path / "r", losses=["dmd", "forward-kl"]))
    validate_recipe(distill_recipe(tmp_path / "r", losses=["dmd", "gan", "forward-kl"]))


def test_init_from_a_model_with_other_controls(tmp_path):
    """Secondary fine-tuning: a stage starts from any earlier biwm model; matching weights load, a new
    control starts at zero, and what does not match is reported by name."""
    import io

    from rich.console import Console

    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunContext
    from biwm.core.stages.common import load_world_model

    first = tiny_recipe(tmp_path / "a", finetune={"steps": 2})
    first["model"]["controls"] = ["actions"]
    first["stages"] = first["stages"][:1]
    run(first)
    weights = tmp_path / "a" / "finetune" / "model.safetensors"
    trained = load_file(str(weights))

    second = tiny_recipe(tmp_path / "b")
    second["model"]["controls"] = ["plucker", "actions"]
    recipe = validate_recipe(second)
    out = io.StringIO()
    ctx = RunContext(recipe=recipe, run_dir=tmp_path / "b", console=Console(file=out, width=300))
    world = load_world_model(ctx, init=weights, strict=False)
    state = {f"controls.{k}": v for k, v in world.controls.state_dict().items()}
    for key, value in state.items():
        if key.startswith("controls.actions."):
            torch.testing.assert_close(value, trained[key])  # matching weights loaded
    zero = [v for k, v in state.items() if k.startswith("controls.plucker.project.")]
    assert zero and all(torch.count_nonzero(v) == 0 for v in zero)  # the new control starts at zero
    assert "missing" in out.getvalue() and "controls.plucker." in out.getvalue()

    # and the stages accept it as init: finetune, then distill from that stage-1 model
    second["stages"] = [{**second["stages"][0], "steps": 1, "init": str(weights)},
                        {"stage": "distill", "steps": 1, "batch_size": 2, "history_frames": 2, "chunks": 1,
                         "chunk_frames": 2, "student_steps": 2, "init": str(weights)}]
    metrics = run(second)
    assert metrics["stages"]["distill"]["critic_updates"] == 1


def test_distill_noise_range_is_in_sigma_units_and_reads_the_old_timestep_names(tmp_path):
    """sigma_min / sigma_max are flow-matching noise levels; a recipe saved with the old t_min / t_max
    (out of 1000, Wan's timestep) still validates, as the same range; giving both names is an error."""
    from biwm.core.recipe import RecipeError, validate_recipe
    from biwm.core.stages.distill import DistillConfig

    cfg = DistillConfig(t_min=100, t_max=900)
    assert (cfg.sigma_min, cfg.sigma_max) == (0.1, 0.9)
    assert "t_min" not in cfg.model_dump() and DistillConfig().sigma_min == 0.02
    old = validate_recipe(distill_recipe(tmp_path / "r", t_min=20.0, t_max=980.0))
    assert (old.stages[1].sigma_min, old.stages[1].sigma_max) == (0.02, 0.98)
    with pytest.raises(RecipeError, match="t_min and sigma_min name the same setting"):
        validate_recipe(distill_recipe(tmp_path / "r", t_min=20.0, sigma_min=0.02))
    with pytest.raises(RecipeError, match="sigma_max"):
        validate_recipe(distill_recipe(tmp_path / "r", sigma_max=2.0))


def test_distill_says_when_generator_init_was_distilled_for_another_schedule(tmp_path):
    from types import SimpleNamespace

    from rich.console import Console
    from safetensors.torch import save_file

    from biwm.core.stages.distill import DistillConfig, _warn_schedule_change

    student = tmp_path / "student.safetensors"
    save_file({"x": torch.zeros(1)}, str(student),
              metadata={"stage": "distill", "student_steps": "4", "student_shift": "2.0", "teacher": ""})
    said = []
    for shift in (2.0, 5.0):
        console = Console(record=True, width=300)
        _warn_schedule_change(SimpleNamespace(console=console),
                              DistillConfig(generator_init=str(student), student_shift=shift))
        said.append(console.export_text())
    assert said[0] == ""  # the same schedule: nothing to say
    assert "distilled for 4 steps at shift 2" in said[1] and "student_shift 5" in said[1]
