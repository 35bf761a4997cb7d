"""DSNO: the wrapper around the zoo UNet and a diffusers UNet2DModel, the teacher trajectories against the
Gaussian oracle's exact flow map, and distillation (loss goes down; a resumed run equals an uninterrupted one)."""

import functools

import pytest
import torch
from torch.testing import assert_close

import adjointdeis as ad
from adjointdeis import dsno
from adjointdeis.dsno import distillation
from adjointdeis.zoo.networks import DigitsUNet
from gaussian import GaussianEps, per_dimension


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return DigitsUNet(channels=(8, 16), emb_dim=16)


def set_temporal_weights(student, scale):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.temporal.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64))


def diffusers_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, norm_num_groups=4)


def test_finds_every_residual_block_of_the_zoo_unet():
    blocks = dsno.find_blocks(DigitsUNet())
    assert [(name, c) for name, _, c in blocks] == [("down1", 32), ("down2", 64), ("mid", 64), ("up2", 32),
                                                     ("up1", 32)]


def test_with_zero_temporal_weights_each_slice_is_the_backbone_at_its_time():
    backbone = tiny_unet()
    times = [700.0, 300.0, 30.0, 0.0]
    student = dsno.DSNO(backbone, times, modes=2)
    set_temporal_weights(student, 0.0)
    noise, cond = torch.randn(3, 1, 8, 8), torch.tensor([1, 4, 10])
    traj = student(noise, cond)
    assert traj.shape == (3, 4, 1, 8, 8)
    for i, t in enumerate(times):
        assert_close(traj[:, i], backbone(noise, torch.full((3,), t), cond), rtol=1e-5, atol=1e-6)


def test_temporal_blocks_mix_the_trajectory_slices():
    student = dsno.DSNO(tiny_unet(), [700.0, 300.0, 30.0, 0.0], modes=2)
    set_temporal_weights(student, 0.3)
    noise = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        before = student(noise)
        student.times[0] = 650.0   # only slice 0 is told another time ...
        after = student(noise)
    assert (after[:, 1:] - before[:, 1:]).abs().max() > 1e-4   # ... yet the other slices change
    set_temporal_weights(student, 0.0)
    with torch.no_grad():
        student.times[0] = 700.0
        unmixed = student(noise)
        student.times[0] = 650.0
        assert_close(student(noise)[:, 1:], unmixed[:, 1:], rtol=0, atol=0)


def test_backbone_alone_is_untouched_by_the_hooks():
    backbone = tiny_unet()
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 100.0)
    want = backbone(x, t)
    student = dsno.DSNO(backbone, [500.0, 0.0], modes=1)
    set_temporal_weights(student, 0.5)
    assert_close(backbone(x, t), want, rtol=0, atol=0)


def test_a_deep_copy_runs_its_own_temporal_blocks():
    import copy

    student = dsno.DSNO(tiny_unet(), [700.0, 300.0, 0.0], modes=2)
    set_temporal_weights(student, 0.3)
    twin = copy.deepcopy(student)
    noise = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        want = student(noise)
        assert_close(twin(noise), want, rtol=0, atol=0)
        for p in twin.temporal.parameters():
            p.zero_()
        assert_close(student(noise), want, rtol=0, atol=0)
        assert (twin(noise) - want).abs().max() > 1e-4


def test_wraps_a_diffusers_unet_forward_and_backward():
    unet = diffusers_unet()
    kinds = [type(m).__name__ for m in unet.modules()]
    student = dsno.DSNO(unet, [800.0, 500.0, 200.0, 0.0], modes=3)
    assert len(student.temporal) == kinds.count("ResnetBlock2D") + kinds.count("Attention") > 0
    traj = student(torch.randn(2, 1, 8, 8))
    assert traj.shape == (2, 4, 1, 8, 8) and torch.isfinite(traj).all()
    traj.square().mean().backward()
    for module in (student.temporal, unet.conv_in):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_a_number_of_times_is_placed_on_the_schedule():
    sched = ad.VPSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    student = dsno.DSNO(tiny_unet(), 4, 2, schedule=sched)
    want = sched.model_time(dsno.trajectory_times(sched, 4)).float()
    assert student.n_times == 4 and torch.equal(student.times, want)
    assert student.times[-1] == 0 and (student.times.diff() < 0).all()
    with pytest.raises(ValueError, match="needs schedule="):
        dsno.DSNO(tiny_unet(), 4, 2)


def test_bad_input():
    with pytest.raises(ValueError, match="2 to 32 trajectory times"):
        dsno.DSNO(tiny_unet(), [0.0], modes=1)
    with pytest.raises(ValueError, match="times must be an integer in"):
        dsno.DSNO(tiny_unet(), 33, modes=2, schedule=ad.VPSchedule.linear())
    with pytest.raises(ValueError, match="strictly decreasing"):
        dsno.DSNO(tiny_unet(), [0.0, 1.0, 2.0], modes=1)
    with pytest.raises(ValueError, match="modes"):
        dsno.DSNO(tiny_unet(), [2.0, 1.0, 0.0], modes=3)
    with pytest.raises(ValueError, match="no residual or attention block"):
        dsno.DSNO(torch.nn.Conv2d(1, 1, 3), [1.0, 0.0], modes=1)
    with pytest.raises(ValueError, match="noise"):
        dsno.DSNO(tiny_unet(), [1.0, 0.0], modes=1)(torch.randn(2, 64))
    with pytest.raises(ValueError, match="cond must have noise's batch of 2"):
        dsno.DSNO(tiny_unet(), [1.0, 0.0], modes=1)(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]))


def test_teacher_trajectories_follow_the_exact_flow_map():
    sched = ad.VPSchedule.linear()
    mu, s = per_dimension(6)
    model = GaussianEps(sched, mu, s).requires_grad_(False)
    noise = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times = dsno.trajectory_times(sched, 4)
    t_max = sched.timesteps(1)[0]
    exact = []
    for t in times:
        x_t = model.flow_map(noise, t_max, t)
        exact.append((x_t - sched.sigma(t) * model(x_t, t.expand(5))) / sched.alpha(t))
    exact = torch.stack(exact, 1)
    errors = []
    for steps in (10, 40):   # DPM-Solver++(2M) between the trajectory times: second order
        data = distillation.teacher_trajectories(model, sched, times, noise, steps_per_time=steps, progress=False)
        errors.append((data.targets - exact).abs().max().item())
    assert errors[1] < 1e-3 and errors[1] < errors[0] / 8, errors
    snr_root = sched.alpha(times) / sched.sigma(times)
    assert_close(data.weights, snr_root.clamp(1, 1e4))
    assert data.weights[-1] > data.weights[0]


def distill_tiny(tmp_path, iters, name="ckpt.safetensors", resume=True, device="cpu"):
    teacher = tiny_unet().requires_grad_(False).to(device)
    sched = ad.VPSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    return distillation.distill(teacher, sched, times=4, n_trajectories=24, iters=iters, batch_size=8, lr=1e-3,
                        num_classes=10, steps_per_time=2, checkpoint=tmp_path / name, checkpoint_every=3,
                        resume=resume, progress=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_interrupted_distillation_resumes_where_it_stopped(tmp_path, monkeypatch, device):
    distill_tiny = functools.partial(globals()["distill_tiny"], device=device)
    tol = 0 if device == "cpu" else 1e-5   # CUDA's convolution gradients may sum in another order
    straight = distill_tiny(tmp_path, 6, "a.safetensors")
    loss, calls = distillation.dsno_loss, []

    def interrupted_after_4(*args):
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(distillation, "dsno_loss", interrupted_after_4)
    with pytest.raises(KeyboardInterrupt):   # checkpoint written after step 3, step 5 never happens
        distill_tiny(tmp_path, 6, "b.safetensors")
    assert (tmp_path / "b.safetensors.teacher.safetensors").is_file()
    calls.clear()
    monkeypatch.setattr(distillation, "dsno_loss", lambda *args: calls.append(1) or loss(*args))
    resumed = distill_tiny(tmp_path, 6, "b.safetensors")
    assert len(calls) == 3   # steps 4-6 only
    monkeypatch.setattr(distillation, "dsno_loss", loss)
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert_close(p, q, rtol=tol, atol=tol, msg=name)
    fresh = distill_tiny(tmp_path, 6, "b.safetensors", resume=False)   # starts over: same as straight
    for p, q in zip(straight.parameters(), fresh.parameters()):
        assert_close(p, q, rtol=tol, atol=tol)


def test_distillation_lowers_the_weighted_loss(tmp_path):
    teacher = tiny_unet().requires_grad_(False)
    sched = ad.VPSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    times = dsno.trajectory_times(sched, 4)
    g = torch.Generator().manual_seed(0)
    noise, cond = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    data = distillation.teacher_trajectories(teacher, sched, times, noise, cond, prediction="x0", steps_per_time=2,
                                     progress=False)
    before = distillation.dsno_loss(dsno.DSNO(tiny_unet(), data.model_times), noise, data.targets, data.weights, cond)
    student = distillation.distill(teacher, sched, times, 16, 60, batch_size=16, lr=2e-3, num_classes=10, data=data,
                           prediction="x0", progress=False)
    with torch.no_grad():
        after = distillation.dsno_loss(student, noise, data.targets, data.weights, cond)
    assert after < 0.5 * before


def test_the_seed_alone_fixes_the_student_and_the_caller_s_generator_is_left_alone():
    teacher = tiny_unet().requires_grad_(False)
    sched = ad.VPSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data = distillation.teacher_trajectories(teacher, sched, dsno.trajectory_times(sched, 4), noise,
                                             torch.arange(8) % 10, prediction="x0", steps_per_time=1, progress=False)
    students = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        want = torch.get_rng_state()
        students.append(distillation.distill(teacher, sched, 4, 8, 2, batch_size=4, num_classes=10, data=data,
                                             prediction="x0", seed=5, progress=False))
        assert torch.equal(torch.get_rng_state(), want)
    for (name, p), q in zip(students[0].state_dict().items(), students[1].state_dict().values()):
        assert torch.equal(p, q), name


def test_bad_distillation_settings_raise_before_any_teacher_trajectory(monkeypatch, tmp_path):
    def no_teacher(*args, **kwargs):
        raise AssertionError("teacher trajectories generated before the arguments were checked")

    monkeypatch.setattr(distillation, "teacher_trajectories", no_teacher)
    teacher = tiny_unet().requires_grad_(False)
    sched = ad.VPSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    for bad, name in ((dict(checkpoint_every=0), "checkpoint_every"), (dict(steps_per_time=0), "steps_per_time"),
                      (dict(modes=4), "modes"), (dict(iters=-1), "iters"), (dict(batch_size=0), "batch_size"),
                      (dict(n_trajectories=0), "n_trajectories")):
        with pytest.raises(ValueError, match=name):
            distillation.distill(teacher, sched, **{"times": 4, "n_trajectories": 8, "iters": 2,
                                                    "checkpoint": tmp_path / "c.safetensors", **bad},
                                 num_classes=10, progress=False)
    assert not list(tmp_path.iterdir())


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    distill_tiny(tmp_path, 3)
    teacher = tiny_unet().requires_grad_(False)
    sched = ad.VPSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    with pytest.raises(ValueError, match="another configuration"):
        distillation.distill(teacher, sched, times=4, n_trajectories=24, iters=6, batch_size=8, lr=5e-3, num_classes=10,
                     steps_per_time=2, checkpoint=tmp_path / "ckpt.safetensors", progress=False)


def test_compiles_to_one_graph():
    student = dsno.DSNO(tiny_unet(), [700.0, 300.0, 30.0, 0.0], modes=2)
    set_temporal_weights(student, 0.3)
    noise, cond = torch.randn(3, 1, 8, 8), torch.tensor([1, 4, 10])
    with torch.no_grad():
        want = student(noise, cond)
        got = torch.compile(student, fullgraph=True)(noise, cond)
    assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_backbone_gets_no_hooks_and_train_eval_reach_the_student():
    backbone = tiny_unet()
    student = dsno.DSNO(backbone, [700.0, 300.0, 0.0], modes=2)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in backbone.modules())
    assert {id(p) for p in student._student.parameters()} == {id(p) for p in student.parameters()}
    student.eval()
    assert not any(m.training for m in student._student.modules())
    student.train()
    assert all(m.training for m in student._student.modules())


class _Payload:
    """Unpickling this runs a command that leaves a file behind."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch '{self.marker}'",)


def test_unusable_checkpoints_and_settings_raise_before_any_teacher_trajectory(monkeypatch, tmp_path):
    """lr, seed, num_classes and a checkpoint that cannot be read or written (a pickle, a folder, a missing folder)
    fail naming the argument before the teacher runs; a pickle is never unpickled, through any loader."""
    from adjointdeis import zoo

    def no_teacher(*args, **kwargs):
        raise AssertionError("teacher trajectories generated before the arguments were checked")

    monkeypatch.setattr(distillation, "teacher_trajectories", no_teacher)
    marker = tmp_path / "unpickled"
    torch.save({"weights": _Payload(marker)}, tmp_path / "evil.pt")
    (tmp_path / "folder").mkdir()
    teacher = tiny_unet().requires_grad_(False)
    sched = ad.VPSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    for bad, name in ((dict(lr=float("nan")), "lr"), (dict(lr=-1.0), "lr"), (dict(seed=1.5), "seed"),
                      (dict(num_classes=0), "num_classes"), (dict(checkpoint=tmp_path / "evil.pt"), "checkpoint"),
                      (dict(checkpoint=tmp_path / "folder"), "checkpoint"),
                      (dict(checkpoint=tmp_path / "missing" / "c.safetensors"), "checkpoint")):
        kwargs = {"times": 4, "n_trajectories": 8, "iters": 2, "num_classes": 10, **bad}
        with pytest.raises(ValueError, match=name):
            distillation.distill(teacher, sched, progress=False, **kwargs)
    with pytest.raises(ValueError, match="not a safetensors file"):
        zoo.read_weights(tmp_path / "evil.pt")
    assert not marker.exists()


def test_teacher_noise_is_not_the_benchmarks_noise_of_the_same_seed(tmp_path):
    """The offset 2**32 added to the teacher noise's seed was a no-op (torch's CPU generator keeps a seed's low 32
    bits), so distill(seed=0) trained on randn(seed=0), the very x_T bench_dsno_quality evaluates on."""
    from adjointdeis import zoo

    distill_tiny(tmp_path, 1)
    noise = zoo.read_weights(tmp_path / "ckpt.safetensors.teacher.safetensors")[0]["noise"]
    benchmark = torch.randn(noise.shape, generator=torch.Generator().manual_seed(0))   # distill_tiny's seed is 0
    assert abs(torch.corrcoef(torch.stack([noise.flatten(), benchmark.flatten()]))[0, 1]) < 0.1


@pytest.mark.cuda
def test_distillation_runs_where_the_teacher_is(tmp_path):
    """A CUDA teacher: the noise (drawn on the CPU, as for a CPU teacher), its trajectories and the training
    batches go to the teacher's device (a resumed run's optimiser state too: the test above on CUDA); the student
    there equals the CPU-distilled one up to rounding."""
    students = [distill_tiny(tmp_path, 6, f"{device}.safetensors", device=device) for device in ("cpu", "cuda")]
    assert next(students[1].parameters()).is_cuda
    for p, q in zip(students[0].parameters(), students[1].parameters()):
        assert_close(q.cpu(), p, rtol=1e-3, atol=1e-4)
