"""Explicit injected noise as an input (its exact gradient) and truncated backpropagation (DRaFT-K, AlignProp)."""

import pytest
import torch

import adjointdeis as ad
from adjointdeis.gradients import truncation_steps
from memory import SavedBytes
from nets import TinyConvNet

# Every stochastic solver and order: (solver, order, sde, prediction).
STOCHASTIC = [("dpmpp", 1, True, "eps"), ("dpmpp", 2, True, "eps"), ("dpmpp", 3, True, "eps"), ("ddim", 1, True, "v"),
              ("dpmsolver", 1, True, "eps"), ("dpmsolver", 2, True, "x0"), ("renoise", 1, False, "flow")]
STEPS = 5


def case(seed=0, prediction="eps"):
    torch.manual_seed(seed)
    net = TinyConvNet().double()
    x_T = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    cond = torch.randn(3, 4, dtype=torch.float64)
    weight = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    sched = ad.FlowSchedule() if prediction == "flow" else ad.VPSchedule.linear()
    return net, x_T, cond, weight, sched


def leaves(x_T, cond, noises):
    return [x_T.detach().requires_grad_(), cond.detach().requires_grad_()], [z.detach().requires_grad_()
                                                                            for z in noises]


def grads_of(net, x, inputs, weight):
    return torch.autograd.grad((weight * x).sum(), [*inputs, *net.parameters()], allow_unused=True)


def assert_same(got, want, rtol=1e-10):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * w.abs().max().item())


@pytest.mark.parametrize("solver,order,sde,prediction", STOCHASTIC)
def test_noise_gradients_equal_autograd_for_every_stochastic_solver(solver, order, sde, prediction):
    """dL/dz_i of every injected noise (and of x_T, cond, theta alongside) equals autograd's, as a sequence of N
    tensors and as one (N, *x.shape) tensor."""
    net, x_T, cond, weight, sched = case(prediction=prediction)
    noises = torch.randn(STEPS, *x_T.shape, dtype=torch.float64)
    kwargs = dict(steps=STEPS, solver=solver, order=order, sde=sde, prediction=prediction)
    results = {}
    for mode in ("autograd", "discrete"):
        (x_in, c_in), zs = leaves(x_T, cond, noises)
        x = ad.sample(net, x_in, sched, cond=c_in, noise=zs, grad=mode, **kwargs)
        results[mode] = grads_of(net, x, [x_in, c_in, *zs], weight)
        stacked = noises.clone().requires_grad_()
        x = ad.sample(net, x_in, sched, cond=c_in, noise=stacked, grad=mode, **kwargs)
        results[mode + "-stacked"] = torch.autograd.grad((weight * x).sum(), stacked)
    assert_same(results["discrete"], results["autograd"])
    assert_same(results["discrete-stacked"], results["autograd-stacked"])
    assert_same(list(results["discrete-stacked"][0].unbind()), list(results["discrete"][2:2 + STEPS]))
    assert all(g.abs().max() > 0 for g in results["discrete"][2:2 + STEPS])


def test_noise_tensors_are_the_generators_draws_and_only_noises_may_require_grad():
    """Noise tensors give the sample their draws give (as noise= callables or the generator do); a noise that
    requires grad alone makes the run differentiable; noises that do not are not differentiated."""
    net, x_T, cond, weight, sched = case(1)
    net.requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    draws = [torch.randn(x_T.shape, generator=g, dtype=x_T.dtype) for _ in range(STEPS)]
    with torch.no_grad():
        from_generator = ad.sample(net, x_T, sched, steps=STEPS, sde=True, cond=cond,
                                   generator=torch.Generator().manual_seed(4))
        assert torch.equal(ad.sample(net, x_T, sched, steps=STEPS, sde=True, cond=cond, noise=draws), from_generator)
        assert torch.equal(ad.sample(net, x_T, sched, steps=STEPS, sde=True, cond=cond, noise=torch.stack(draws)),
                           from_generator)
    z = [d.clone().requires_grad_(i == 2) for i, d in enumerate(draws)]
    x = ad.sample(net, x_T, sched, steps=STEPS, sde=True, cond=cond, noise=z)
    assert x.requires_grad and torch.equal(x.detach(), from_generator)
    (weight * x).sum().backward()
    assert z[2].grad is not None and all(zi.grad is None for i, zi in enumerate(z) if i != 2)


def test_a_callables_channels_last_noise_does_not_reach_later_runs():
    """A noise(row, x) callable may return non-contiguous (channels_last) noise; the CPU loop, which recycles the
    dropped tensors of a large run, must not hand one out as a step's contiguous output: a seeded run after such
    runs is the seeded run of a fresh process (bit for bit)."""
    from adjointdeis import planning
    net = TinyConvNet(channels=8).double().requires_grad_(False)
    x_T = torch.randn(2, 8, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert x_T.numel() * x_T.element_size() >= planning.RECYCLE_BYTES
    sched = ad.VPSchedule.linear()

    def channels_last(row, x):
        return torch.randn(x.shape, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ad.empty_cache()
        want = ad.sample(net, x_T, sched, steps=4, sde=True, generator=torch.Generator().manual_seed(2))
        for _ in range(2):
            ad.sample(net, x_T, sched, steps=4, sde=True, noise=channels_last)
        got = ad.sample(net, x_T, sched, steps=4, sde=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(got, want)


def test_bad_noise_tensors_raise_naming_noise():
    net, x_T, cond, _, sched = case()
    good = torch.randn(STEPS, *x_T.shape, dtype=torch.float64)
    cases = [
        (dict(noise=good[:4]), ValueError, r"noise: a tensor of noises must have shape \(N, \*x_T.shape\)"),
        (dict(noise=list(good[:4])), ValueError, "noise: got 4 tensors for a run with 5 noisy rows"),
        (dict(noise=[*good[:4], good[0, :2]]), ValueError, r"noise\[4\] must have x_T's shape"),
        (dict(noise=[*good[:4], 1.0]), TypeError, r"noise\[4\] must be a tensor"),
        (dict(noise=good.float()), TypeError, r"noise\[0\] must have x_T's dtype"),
        (dict(noise="gaussian"), TypeError, "noise must be callable"),
        (dict(noise=good, generator=torch.Generator()), ValueError, "not both"),
        (dict(noise=good, sde=False), ValueError, r"N = 0 noisy rows"),
    ]
    for kwargs, error, message in cases:
        kwargs = {"sde": True, **kwargs}
        with pytest.raises(error, match=message):
            ad.sample(net, x_T, sched, steps=STEPS, cond=cond, **kwargs)


def test_adjoint_mode_refuses_noise_gradients_and_uses_given_noise():
    net, x_T, cond, weight, sched = case(2)
    noises = torch.randn(STEPS, *x_T.shape, dtype=torch.float64)
    x_in = x_T.clone().requires_grad_()
    with pytest.raises(ValueError, match="does not differentiate the injected noise"):
        ad.sample(net, x_in, sched, steps=STEPS, sde=True, noise=noises.clone().requires_grad_(), grad="adjoint",
                  adjoint_form="x0")
    with pytest.raises(ValueError, match="its own grid"):
        ad.sample(net, x_in, sched, steps=STEPS, sde=True, noise=noises, grad="adjoint", adjoint_steps=8)
    results = []
    for noise in (noises, lambda row, x: noises[row]):
        x = ad.sample(net, x_in, sched, steps=STEPS, sde=True, noise=noise, grad="adjoint", adjoint_form="x0",
                      parameters=[])
        results.append((x.detach(), torch.autograd.grad((weight * x).sum(), x_in)[0]))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_adjoint_on_its_own_grid_refuses_drawn_noise_of_a_stochastic_run():
    """An adjoint grid of its own records the states in a second forward run, whose draws from the generator (or
    torch's) would be another path than the sample's. With logsnr spacing and adjoint_steps = steps that grid is
    the sampling grid: given the sample's noise (a callable), that run's gradient is adjoint_steps=None's."""
    net, x_T, _, weight, sched = case(3)
    net.requires_grad_(False)
    draws = torch.Generator().manual_seed(5)
    noises = [torch.randn(x_T.shape, generator=draws, dtype=x_T.dtype) for _ in range(STEPS)]

    def gradient(**kwargs):
        x_in = x_T.clone().requires_grad_()
        x = ad.sample(net, x_in, sched, steps=STEPS, grad="adjoint", adjoint_form="x0", **kwargs)
        return torch.autograd.grad((weight * x).sum(), x_in)[0]
    want = gradient(sde=True, generator=torch.Generator().manual_seed(5))
    for kwargs in (dict(generator=torch.Generator().manual_seed(5)), dict()):
        with pytest.raises(ValueError, match="adjoint_steps records the states of a stochastic run"):
            gradient(sde=True, adjoint_steps=STEPS, **kwargs)
    torch.testing.assert_close(gradient(sde=True, adjoint_steps=STEPS, noise=lambda row, x: noises[row]), want,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(gradient(adjoint_steps=STEPS), gradient(), rtol=1e-12, atol=0)  # ODE: no noise


def test_adjoint_refuses_the_renoise_solver():
    """solver "renoise" keeps nothing of the state but its data prediction, so its exact gradient in x_T (autograd's)
    is tiny, where the probability-flow adjoint is of order one: grad="adjoint" raises rather than return it."""
    net, x_T, _, weight, _ = case(4)
    net.requires_grad_(False)
    sched = ad.FlowSchedule()
    x_in = x_T.clone().requires_grad_()
    x = ad.sample(net, x_in, sched, steps=10, solver="renoise", prediction="flow", grad="autograd",
                  generator=torch.Generator().manual_seed(1))
    exact = torch.autograd.grad((weight * x).sum(), x_in)[0]
    assert exact.norm() < 1e-3 * x_T.numel()
    for states in ("recorded", "resolved"):
        with pytest.raises(ValueError, match="solver 'renoise'"):
            ad.sample(net, x_in, sched, steps=10, solver="renoise", prediction="flow", grad="adjoint",
                      adjoint_form="x0", states=states, generator=torch.Generator().manual_seed(1))


def detach_early_outputs(net, first_row):
    """The model, its outputs of the rows before `first_row` detached: an autograd oracle of truncation for the
    gradients of cond, theta and the later noises (x_T's gradient still flows through the linear terms)."""
    calls = []

    def model(x, t, cond):
        calls.append(None)
        out = net(x, t, cond)
        return out.detach() if len(calls) <= first_row else out
    return model


@pytest.mark.parametrize("solver,order,sde", [("dpmpp", 2, True), ("dpmpp", 3, False), ("heun", 2, False)])
@pytest.mark.parametrize("k", [1, 2, STEPS])
def test_truncation_equals_autograd_with_the_same_detach_points(solver, order, sde, k):
    """grad_steps=K: the discrete adjoint equals autograd run with the first N - K steps under no_grad, and,
    for cond, theta and the noises, autograd with the early model outputs detached; x_T and the early noises get
    no gradient (None) when K < N."""
    net, x_T, cond, weight, sched = case(3)
    kwargs = dict(steps=STEPS, solver=solver, order=order, sde=sde)
    rows_per_step = 2 if solver == "heun" else 1
    noises = torch.randn(STEPS if sde else 0, *x_T.shape, dtype=torch.float64)
    results = {}
    for mode in ("autograd", "discrete"):
        (x_in, c_in), zs = leaves(x_T, cond, noises)
        x = ad.sample(net, x_in, sched, cond=c_in, grad=mode, grad_steps=k, noise=zs if sde else None, **kwargs)
        results[mode] = grads_of(net, x, [x_in, c_in, *zs], weight)
    assert_same(results["discrete"], results["autograd"])
    (x_in, c_in), zs = leaves(x_T, cond, noises)
    oracle = detach_early_outputs(net, rows_per_step * (STEPS - k))
    x = ad.sample(oracle, x_in, sched, cond=c_in, grad="autograd", noise=zs if sde else None, **kwargs)
    want = grads_of(net, x, [x_in, c_in, *zs], weight)
    got = results["discrete"]
    assert_same(got[1:], [want[1]] + [w if i >= STEPS - k else None for i, w in enumerate(want[2:2 + len(zs)])]
                + list(want[2 + len(zs):]))
    assert (got[0] is None) == (k < STEPS)
    if k == STEPS:
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=0)


@pytest.mark.parametrize("k", [1, 3, STEPS])
def test_forward_mode_ad_keeps_the_truncation(k):
    """torch.func.jvp and forward_ad through sample with grad_steps=K: w . (J v) equals (J^T w) . v from the
    truncated discrete adjoint, for tangents of x_T, cond and the noises (forward mode passes no_grad, so before,
    the tangents crossed the truncation: the full run's directional derivative)."""
    net, x_T, cond, weight, sched = case(4)
    net.requires_grad_(False)
    noises = torch.randn(STEPS, *x_T.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    v_x, v_c, v_z = (torch.randn(t.shape, dtype=torch.float64, generator=g) for t in (x_T, cond, noises))
    run = lambda x, c, z: ad.sample(net, x, sched, cond=c, noise=list(z), steps=STEPS, sde=True, grad_steps=k)
    (x_in, c_in), zs = leaves(x_T, cond, noises)
    x = ad.sample(net, x_in, sched, cond=c_in, noise=zs, steps=STEPS, sde=True, grad_steps=k, grad="discrete")
    grads = torch.autograd.grad((weight * x).sum(), [x_in, c_in, *zs], allow_unused=True)
    tangents = [v_x, v_c, *v_z]
    want = sum((gr * t).sum() for gr, t in zip(grads, tangents) if gr is not None)
    _, tangent = torch.func.jvp(run, (x_T, cond, noises), (v_x, v_c, v_z))
    torch.testing.assert_close((weight * tangent).sum(), want, rtol=1e-10, atol=1e-10)
    fwd = torch.autograd.forward_ad
    with fwd.dual_level():
        out = run(fwd.make_dual(x_T, v_x), fwd.make_dual(cond, v_c), fwd.make_dual(noises, v_z))
        tangent = fwd.unpack_dual(out).tangent
    torch.testing.assert_close((weight * tangent).sum(), want, rtol=1e-10, atol=1e-10)


def test_random_truncation_draws_k_from_the_range_with_the_generator():
    """grad_steps=(lo, hi): K ~ uniform lo..hi from grad_steps_generator, the same gradient as grad_steps=K."""
    draws = {truncation_steps((2, 4), torch.Generator().manual_seed(s)) for s in range(60)}
    assert draws == {2, 3, 4}
    net, x_T, cond, weight, sched = case(4)
    for seed in range(3):
        k = int(torch.randint(1, STEPS + 1, (1,), generator=torch.Generator().manual_seed(seed)))
        results = []
        for grad_steps, gen in (((1, STEPS), torch.Generator().manual_seed(seed)), (k, None)):
            x = ad.sample(net, x_T, sched, steps=STEPS, cond=cond, grad_steps=grad_steps, grad_steps_generator=gen)
            results.append(grads_of(net, x, [], weight))
        assert_same(results[0], results[1], rtol=0)


def test_bad_truncation_arguments():
    net, x_T, cond, _, sched = case()
    x_in = x_T.clone().requires_grad_()
    for grad_steps in (0, STEPS + 1, 2.0, True, (3, 2), (0, 2), (1, 2, 3), (1, STEPS + 1), (STEPS + 1, STEPS + 1)):
        with pytest.raises(ValueError, match="grad_steps"):
            ad.sample(net, x_in, sched, steps=STEPS, cond=cond, grad_steps=grad_steps)
    for seed in range(8):   # a range past the run's steps raises whatever K the draw would give
        with pytest.raises(ValueError, match=rf"1 <= lo <= hi <= {STEPS} \(the run's steps\), got \(1, {STEPS + 1}\)"):
            ad.sample(net, x_in, sched, steps=STEPS, cond=cond, grad_steps=(1, STEPS + 1),
                      grad_steps_generator=torch.Generator().manual_seed(seed))
    with pytest.raises(ValueError, match="grad_steps .* needs grad='discrete' or 'autograd'"):
        ad.sample(net, x_in, sched, steps=STEPS, cond=cond, grad="adjoint", grad_steps=2)


def saved_peak(run):
    meter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        run()
    return meter.peak


def test_noise_gradients_save_nothing_more_and_truncation_saves_less():
    """What autograd keeps for backward: the same with differentiated noise tensors as with drawn noise, and
    (N - K) recorded states less with grad_steps=K."""
    net, x_T, cond, weight, sched = case(5)
    x_in = x_T.clone().requires_grad_()

    def run(**kwargs):
        x = ad.sample(net, x_in, sched, steps=STEPS, sde=True, cond=cond, grad="discrete", **kwargs)
        (weight * x).sum().backward()

    drawn = saved_peak(lambda: run(generator=torch.Generator().manual_seed(0)))
    given = saved_peak(lambda: run(noise=torch.randn(STEPS, *x_T.shape, dtype=torch.float64, requires_grad=True)))
    truncated = saved_peak(lambda: run(generator=torch.Generator().manual_seed(0), grad_steps=1))
    assert given == drawn
    assert drawn - truncated == (STEPS - 1) * x_T.numel() * x_T.element_size()
