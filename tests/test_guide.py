"""``adjointdeis.guide`` on the Gaussian oracle, where the optimum is known in closed form.

With ``eps*`` of Gaussian data (mean ``mu + cond``) every solver step is affine, per dimension, in
the state and in cond, so the sampler's output is ``x0 = A * x_T + B * cond + C`` elementwise, with
A, B, C read off three sample runs. The loss ``||x0 - target||^2`` then has the optimum
``x_T* = (target - B cond - C) / A`` (optimising x_T) or ``cond* = (target - A x_T - C) / B``
(optimising cond), where the loss is 0; ``guide`` must reach it.
"""

import math

import numpy as np
import pytest
import torch
from gaussian import GaussianEps

from adjointdeis import ProbabilityRegularizer, VPSchedule, guide, sample

DIM, BATCH, STEPS = 12, 2, 10



def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    sched = VPSchedule.linear()
    mu = torch.rand(DIM, generator=g, dtype=torch.float64) * 2 - 1
    s = 0.5 + 0.5 * torch.rand(DIM, generator=g, dtype=torch.float64)
    model = GaussianEps(sched, mu, s)
    x_T = torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)
    cond = 0.3 * torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)
    target = torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)
    return model, sched, x_T, cond, target


def affine_map(model, sched, like):
    """(A, B, C) with sample(x_T, cond) == A x_T + B cond + C elementwise."""
    zero, one = torch.zeros_like(like), torch.ones_like(like)
    with torch.no_grad():
        run = [sample(model, x, sched, steps=STEPS, cond=c) for x, c in ((zero, zero), (one, zero), (zero, one))]
    return run[1] - run[0], run[2] - run[0], run[0]


def squared_distance(target):
    return lambda x0: (x0 - target).square().sum()


def test_optimising_x_T_reaches_the_analytic_optimum():
    model, sched, x_T, cond, target = problem()
    A, B, C = affine_map(model, sched, x_T)
    optimum = (target - B * cond - C) / A
    result = guide(model, sched, squared_distance(target), x_T, cond=cond, optimize="x_T", steps=STEPS, iters=40,
                   lr=0.5, optimizer="sgd", preserve_norm=False, progress=False)
    losses = result.losses
    assert all(b < a for a, b in zip(losses, losses[1:])), "SGD below 1/L decreases the loss at every step"
    assert (result.x_T - optimum).norm() / optimum.norm() < 1e-4
    assert result.final_loss < 1e-8 * losses[0]
    assert torch.allclose(result.sample, A * result.x_T + B * cond + C, rtol=0, atol=1e-12)


def test_optimising_cond_reaches_the_analytic_optimum():
    model, sched, x_T, cond, target = problem(1)
    A, B, C = affine_map(model, sched, x_T)
    optimum = (target - A * x_T - C) / B
    result = guide(model, sched, squared_distance(target), x_T, cond=cond, optimize=("cond",), steps=STEPS,
                   iters=30, lr=0.25, optimizer="sgd", progress=False)
    assert all(b < a for a, b in zip(result.losses, result.losses[1:]))
    assert (result.cond - optimum).norm() / optimum.norm() < 1e-6
    assert torch.equal(result.x_T, x_T)


def test_adam_falls_monotonically_early_and_converges():
    model, sched, x_T, cond, target = problem(2)
    A, B, C = affine_map(model, sched, x_T)
    optimum = (target - B * cond - C) / A
    result = guide(model, sched, squared_distance(target), x_T, cond=cond, optimize="x_T", steps=STEPS, iters=150,
                   lr=0.1, preserve_norm=False, progress=False)
    early = result.losses[:10]
    assert all(b < a for a, b in zip(early, early[1:]))
    assert (result.x_T - optimum).norm() / optimum.norm() < 1e-2
    assert result.final_loss < 1e-3 * result.losses[0]


def test_joint_optimisation_and_inputs_left_untouched():
    model, sched, x_T, cond, target = problem(3)
    x_before, cond_before = x_T.clone(), cond.clone()
    result = guide(model, sched, squared_distance(target), x_T, cond=cond, steps=STEPS, iters=60, lr=0.1,
                   preserve_norm=False, progress=False)
    assert result.final_loss < 1e-2 * result.losses[0]
    assert torch.equal(x_T, x_before) and torch.equal(cond, cond_before)
    assert not torch.equal(result.cond, cond) and not torch.equal(result.x_T, x_T)


def test_preserve_norm_keeps_each_x_T_on_its_shell():
    model, sched, x_T, cond, target = problem(4)
    result = guide(model, sched, squared_distance(target), x_T, cond=cond, optimize="x_T", steps=STEPS, iters=15,
                   lr=0.1, progress=False)
    torch.testing.assert_close(result.x_T.norm(dim=1), x_T.norm(dim=1), rtol=1e-12, atol=0)
    assert not torch.allclose(result.x_T, x_T)
    assert result.final_loss < result.losses[0]


def test_autograd_and_discrete_follow_the_same_path():
    model, sched, x_T, cond, target = problem(5)
    runs = [guide(model, sched, squared_distance(target), x_T, cond=cond, steps=STEPS, iters=4, grad=grad,
                  progress=False) for grad in ("discrete", "autograd")]
    torch.testing.assert_close(torch.tensor(runs[0].losses), torch.tensor(runs[1].losses), rtol=1e-10, atol=0)
    torch.testing.assert_close(runs[0].x_T, runs[1].x_T, rtol=1e-10, atol=1e-12)


def test_early_stop_and_callback():
    model, sched, x_T, cond, target = problem(6)
    seen = []
    first = guide(model, sched, squared_distance(target), x_T, cond=cond, optimize="x_T", steps=STEPS, iters=1,
                  progress=False).losses[0]
    result = guide(model, sched, squared_distance(target), x_T, cond=cond, optimize="x_T", steps=STEPS, iters=200,
                   lr=0.5, optimizer="sgd", preserve_norm=False, target_loss=0.1 * first,
                   callback=lambda it, loss, x0: seen.append((it, loss, x0)), progress=False)
    assert result.stopped_early and len(result.losses) < 200
    assert result.final_loss <= 0.1 * first and result.losses[-2] > 0.1 * first
    assert [it for it, _, _ in seen] == list(range(len(result.losses)))
    assert [loss for _, loss, _ in seen] == result.losses
    assert torch.equal(seen[-1][2], result.sample)
    settled = guide(model, sched, squared_distance(target), x_T, cond=cond, optimize="x_T", steps=STEPS, iters=200,
                    lr=0.5, optimizer="sgd", preserve_norm=False, tol=1e-3, progress=False)
    assert settled.stopped_early and len(settled.losses) < 200
    assert abs(settled.losses[-1] - settled.losses[-2]) <= 1e-3 * max(settled.losses[-2], 1.0)


def test_gradient_clipping_bounds_the_step():
    model, sched, x_T, cond, target = problem(7)
    result = guide(model, sched, lambda x0: 1e3 * (x0 - target).square().sum(), x_T, cond=cond, optimize="x_T",
                   steps=STEPS, iters=1, lr=1.0, optimizer="sgd", preserve_norm=False, clip_grad=1e-3,
                   progress=False)
    assert (result.x_T - x_T).norm() <= 1e-3 * (1 + 1e-6)


def test_bad_arguments_raise():
    model, sched, x_T, cond, target = problem()
    loss = squared_distance(target)
    with pytest.raises(ValueError, match="unknown optimize entry 'weights'"):
        guide(model, sched, loss, x_T, cond=cond, optimize=("x_T", "weights"), progress=False)
    with pytest.raises(ValueError, match="optimizer must be one of 'adam', 'sgd'; got optimizer='lbfgs'"):
        guide(model, sched, loss, x_T, cond=cond, optimizer="lbfgs", progress=False)
    with pytest.raises(ValueError, match="iters"):
        guide(model, sched, loss, x_T, cond=cond, iters=0, progress=False)
    with pytest.raises(ValueError, match="no floating-point cond"):
        guide(model, sched, loss, x_T, optimize="cond", progress=False)
    with pytest.raises(ValueError, match="scalar"):
        guide(model, sched, lambda x0: x0, x_T, cond=cond, steps=2, iters=1, progress=False)
    with pytest.raises(FloatingPointError, match="the loss is nan at iteration 0"):
        guide(model, sched, lambda x0: x0.sum() * float("nan"), x_T, cond=cond, steps=2, iters=2, progress=False)
    with pytest.raises(ValueError, match="does not depend on the sample"):
        guide(model, sched, lambda x0: loss(x0).detach(), x_T, cond=cond, steps=2, iters=1, progress=False)
    for bad, match in ((dict(target_loss="x"), "target_loss"), (dict(callback=3), "callback"),
                       (dict(preserve_norm="yes"), "preserve_norm")):
        with pytest.raises(TypeError, match=match):
            guide(model, sched, loss, x_T, cond=cond, steps=2, iters=1, progress=False, **bad)


def test_autograd_guidance_leaves_the_model_without_gradients():
    """guide differentiates what it optimises only (parameters=[]), with grad="autograd" too."""
    model, sched, x_T, cond, target = problem()
    net = torch.nn.Linear(1, 1)
    result = guide(lambda x, t, c: model(x, t, c) + 0 * net.weight, sched, squared_distance(target), x_T, cond=cond,
                   steps=2, iters=2, grad="autograd", progress=False)
    assert net.weight.grad is None and torch.isfinite(result.x_T).all()
    for parameters in ([net.weight], None):  # would build up .grad over the iterations (None: every parameter)
        with pytest.raises(ValueError, match="never the model's parameters: parameters="):
            guide(model, sched, squared_distance(target), x_T, cond=cond, steps=2, iters=2, progress=False,
                  parameters=parameters)
    assert net.weight.grad is None
    guide(model, sched, squared_distance(target), x_T, cond=cond, steps=2, iters=1, progress=False, parameters=())


def numpy_log_bound(rows):
    """DNO's two concentration bounds, written independently in numpy float64."""
    count, d = rows.shape
    mean = rows.mean(0)
    deviation = np.linalg.norm(rows.T @ rows / count - np.eye(d), ord=2)
    log_mean = min(-count * (mean ** 2).sum() / (2 * d), -np.log(2))
    excess = max(np.sqrt(1 + deviation) - 1 - np.sqrt(d / count), 0.0)
    return log_mean + min(-count * excess ** 2 / 2, -np.log(2))


def test_probability_regularizer_value_and_gradient():
    """The regulariser equals an independent numpy evaluation (ordered rows and the same permutations), and its
    gradient passes gradcheck, on noises far enough from Gaussian that both bounds are active."""
    g = torch.Generator().manual_seed(0)
    noises = [1.6 * torch.randn(3, 26, generator=g, dtype=torch.float64) + 0.4,
              torch.randn(5, 7, generator=g, dtype=torch.float64)]
    flat = torch.cat([n.reshape(-1) for n in noises]).numpy()
    d, shuffles, weight = 4, 3, 0.7
    rows = len(flat) // d
    gen = torch.Generator().manual_seed(5)
    perms = [torch.randperm(len(flat), generator=gen).numpy() for _ in range(shuffles)]
    want = numpy_log_bound(flat[:rows * d].reshape(rows, d))
    want += sum(numpy_log_bound(flat[p][:rows * d].reshape(rows, d)) for p in perms) / shuffles
    reg = ProbabilityRegularizer(weight, subsample=1, shuffles=shuffles, generator=torch.Generator().manual_seed(5))
    assert abs(float(reg(noises)) + weight * want) < 1e-12 * abs(want)
    assert numpy_log_bound(flat[:rows * d].reshape(rows, d)) < -2 * np.log(2) - 0.1  # both bounds active

    def regularized(a, b):
        fresh = ProbabilityRegularizer(weight, shuffles=shuffles, generator=torch.Generator().manual_seed(5))
        return fresh([a, b])
    assert torch.autograd.gradcheck(regularized, [n.clone().requires_grad_() for n in noises])
    with pytest.raises(ValueError, match="ProbabilityRegularizer.subsample"):
        ProbabilityRegularizer(subsample=-1)
    for bad, match in ((dict(weight=math.inf), "weight must be a finite number >= 0"),
                       (dict(weight="1"), "weight must be a finite number >= 0"),
                       (dict(weight=-1.0), "weight must be a finite number >= 0"),
                       (dict(shuffles=2.0), "shuffles must be an integer >= 0"),
                       (dict(generator=3), "generator must be a torch.Generator")):
        kind = TypeError if "generator" in bad else ValueError
        with pytest.raises(kind, match="ProbabilityRegularizer." + match):
            ProbabilityRegularizer(**bad)
    assert ProbabilityRegularizer(subsample=np.int64(1), shuffles=np.int64(0))(noises) == \
        ProbabilityRegularizer(subsample=1, shuffles=0)(noises)
    with pytest.raises(ValueError, match="fewer than a row"):
        ProbabilityRegularizer(subsample=3)([torch.zeros(10)])


def test_noise_optimisation_raises_the_reward_and_the_regularizer_keeps_noise_gaussian():
    """optimize=("noise",) on an SDE run starts from the generator's draws and lowers the loss; with DNO's
    regulariser the optimised noises score better under it; discrete and autograd follow the same path."""
    model, sched, x_T, cond, target = problem(8)
    loss = squared_distance(target)
    kwargs = dict(cond=cond, optimize=("noise",), steps=STEPS, sde=True, progress=False, lr=0.2)
    with torch.no_grad():
        start = sample(model, x_T, sched, steps=STEPS, cond=cond, sde=True, generator=torch.Generator().manual_seed(2))
    plain = guide(model, sched, loss, x_T, iters=15, generator=torch.Generator().manual_seed(2), **kwargs)
    assert plain.losses[0] == float(loss(start))
    assert plain.noise.shape == (STEPS, *x_T.shape)
    assert plain.final_loss < 0.5 * plain.losses[0]
    assert torch.equal(plain.x_T, x_T)
    strong = lambda: ProbabilityRegularizer(weight=50.0, shuffles=4, generator=torch.Generator().manual_seed(1))
    runs = [guide(model, sched, loss, x_T, iters=15, generator=torch.Generator().manual_seed(2), grad=grad,
                  regularizer=strong(), **kwargs) for grad in ("discrete", "autograd")]
    torch.testing.assert_close(torch.tensor(runs[0].losses), torch.tensor(runs[1].losses), rtol=1e-10, atol=0)
    torch.testing.assert_close(runs[0].noise, runs[1].noise, rtol=1e-10, atol=1e-12)
    judge = ProbabilityRegularizer(shuffles=20, generator=torch.Generator().manual_seed(9))
    assert float(judge([runs[0].noise])) < float(judge([plain.noise]))
    # A noise(row, x) callable: the optimisation starts from its draws.
    fixed = 0.5 * torch.randn(STEPS, *x_T.shape, generator=torch.Generator().manual_seed(4), dtype=x_T.dtype)
    first = guide(model, sched, loss, x_T, iters=1, noise=lambda row, x: fixed[row], **kwargs)
    with torch.no_grad():
        assert first.losses[0] == float(loss(sample(model, x_T, sched, steps=STEPS, cond=cond, sde=True,
                                                    noise=list(fixed))))
    with pytest.raises(ValueError, match="the run injects none"):
        guide(model, sched, loss, x_T, cond=cond, optimize="noise", steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="optimize must include 'x_T' or 'noise'"):
        guide(model, sched, loss, x_T, cond=cond, optimize="cond", regularizer=strong(), progress=False)


def test_the_default_optimises_cond_only_when_it_has_floating_point_tensors():
    """optimize=None: x_T and cond's floating-point tensors; without cond, or with class labels, x_T alone (the
    labels are left as they are)."""
    model, sched, x_T, cond, target = problem()
    with_cond = guide(model, sched, squared_distance(target), x_T, cond=cond, steps=STEPS, iters=2, progress=False)
    assert not torch.equal(with_cond.cond, cond) and not torch.equal(with_cond.x_T, x_T)
    labelled = lambda x, t, c: model(x, t, c.to(x.dtype)[:, None].expand_as(x))
    for c in (None, torch.tensor([1, 0])):
        run = guide(model if c is None else labelled, sched, squared_distance(target), x_T, cond=c, steps=STEPS,
                    iters=2, progress=False)
        assert not torch.equal(run.x_T, x_T) and run.losses[-1] < run.losses[0]
        assert c is None or (torch.equal(run.cond, c) and not run.cond.requires_grad)


def test_what_is_not_optimised_gets_no_gradient():
    """uncond, a tensor guidance_scale and given noises that are not optimised are the caller's tensors: guide
    leaves their .grad alone even when they require grad, and follows the same path as with plain tensors."""
    model, sched, x_T, cond, target = problem(9)
    uncond = 0.1 * torch.ones_like(cond)
    scale = torch.tensor([[1.5], [3.0]], dtype=torch.float64)
    noise = torch.randn(STEPS, *x_T.shape, generator=torch.Generator().manual_seed(3), dtype=x_T.dtype)
    for grad in ("discrete", "autograd"):
        runs = []
        for leaf in (False, True):
            given = [t.clone().requires_grad_(leaf) for t in (uncond, scale, noise)]
            runs.append(guide(model, sched, squared_distance(target), x_T, cond=cond, uncond=given[0],
                              guidance_scale=given[1], noise=given[2], sde=True, optimize=("x_T", "cond"),
                              steps=STEPS, iters=3, grad=grad, progress=False))
            assert all(t.grad is None for t in given), grad
        assert runs[0].losses == runs[1].losses and torch.equal(runs[0].x_T, runs[1].x_T)
    listed = [n.clone().requires_grad_() for n in noise]
    guide(model, sched, squared_distance(target), x_T, optimize="x_T", sde=True, noise=listed, steps=STEPS,
          iters=2, progress=False)
    assert all(n.grad is None for n in listed)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_guide_runs_under_no_grad_and_inference_mode(context):
    """guide differentiates whatever the caller's context (it failed with 'element 0 of tensors does not require
    grad'): the same path as outside, with CFG tensors and given noises made in that context."""
    model, sched, x_T, cond, target = problem(10)
    noise = torch.randn(STEPS, *x_T.shape, generator=torch.Generator().manual_seed(1), dtype=x_T.dtype)

    def run(optimize):
        return guide(model, sched, squared_distance(target), x_T.clone(), cond=cond.clone(),
                     uncond=torch.zeros_like(cond), guidance_scale=torch.tensor([[2.0], [1.0]], dtype=torch.float64),
                     sde=True, noise=noise.clone(), optimize=optimize, steps=STEPS, iters=3, progress=False)

    for optimize in (("x_T", "cond"), ("x_T", "noise")):
        want = run(optimize)
        with context():
            got = run(optimize)
        assert got.losses == want.losses and torch.equal(got.x_T, want.x_T)
        assert not torch.is_inference(got.x_T) and got.losses[-1] < got.losses[0]


def test_a_stochastic_runs_noise_is_drawn_once_and_returned():
    """With sde=True and only x_T optimised, every iteration sees the noise of the first: the objective is one
    affine function of x_T (SGD below 1/L decreases it at every step), and the sample is the one the returned x_T
    and noise give."""
    model, sched, x_T, cond, target = problem()
    run = dict(steps=STEPS, cond=cond, sde=True)
    result = guide(model, sched, squared_distance(target), x_T, optimize="x_T", iters=10, lr=0.5, optimizer="sgd",
                   preserve_norm=False, progress=False, generator=torch.Generator().manual_seed(3), **run)
    assert result.noise is not None and result.noise.shape[1:] == x_T.shape
    with torch.no_grad():
        again = sample(model, result.x_T, sched, noise=result.noise, **run)
    assert torch.equal(again, result.sample)
    assert all(b < a for a, b in zip(result.losses, result.losses[1:]))
    assert result.final_loss < result.losses[-1]


def test_x_T_with_a_truncation_that_never_reaches_it_raises():
    model, sched, x_T, cond, target = problem()
    with pytest.raises(ValueError, match=r"grad_steps=3 .* x_T would get no gradient"):
        guide(model, sched, squared_distance(target), x_T, cond=cond, optimize="x_T", steps=STEPS, iters=2,
              progress=False, grad_steps=3)
    result = guide(model, sched, squared_distance(target), x_T, cond=cond, optimize="cond", steps=STEPS, iters=2,
                   progress=False, grad_steps=3)  # the last steps' cond is differentiated: allowed
    assert len(result.losses) == 2
