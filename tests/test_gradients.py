"""Gradients through sampling: the discrete adjoint equals autograd, the adjoint modes converge."""

import math
import os
import subprocess
import sys
import warnings

import peft
import pytest
import torch
from torch.testing import assert_close

import adjointdeis as ad
from adjointdeis.benchmarks import tensor_peak_bytes
from gaussian import GaussianEps, per_dimension
from nets import TinyConvNet

SOLVERS = [("ddim", 1, False), ("dpmpp", 1, True), ("dpmpp", 2, False), ("dpmpp", 2, True), ("dpmpp", 3, False),
           ("deis", 1, False), ("deis", 2, False), ("deis", 3, False), ("heun", 2, False)]


def gradients(mode, net, x_T, cond, sched, *, weight, **kwargs):
    """dL/dx_T, dL/dcond and dL/dtheta of L = sum(weight * sample) under a gradient mode."""
    x_T = x_T.detach().requires_grad_()
    cond = cond.detach().requires_grad_()
    net.zero_grad()
    x = ad.sample(net, x_T, sched, cond=cond, grad=mode, generator=torch.Generator().manual_seed(3), **kwargs)
    (weight * x).sum().backward()
    return [x_T.grad, cond.grad] + [p.grad.clone() for p in net.parameters()]


def relative_error(got, want):
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def real_network_case(seed=0):
    torch.manual_seed(seed)
    net = TinyConvNet().double()
    x_T = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    cond = torch.randn(3, 4, dtype=torch.float64)
    weight = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    return net, x_T, cond, weight


@pytest.mark.parametrize("solver,order,sde", SOLVERS)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_discrete_equals_autograd_on_a_real_network(solver, order, sde, prediction):
    net, x_T, cond, weight = real_network_case()
    sched = ad.VPSchedule.linear() if prediction != "flow" else ad.FlowSchedule()
    kwargs = dict(steps=5, solver=solver, order=order, sde=sde, prediction=prediction, weight=weight)
    want = gradients("autograd", net, x_T, cond, sched, **kwargs)
    got = gradients("discrete", net, x_T, cond, sched, **kwargs)
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-8


@pytest.mark.parametrize("sde", [False, True])
def test_discrete_equals_autograd_with_guidance(sde):
    net, x_T, cond, weight = real_network_case(1)
    sched = ad.VPSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    uncond = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([[1.5], [3.0], [5.0]], dtype=torch.float64).view(3, 1, 1, 1).requires_grad_()
    results = {}
    for mode in ("autograd", "discrete"):
        for t in (uncond, scale):
            t.grad = None
        grads = gradients(mode, net, x_T, cond, sched, weight=weight, steps=6, sde=sde, uncond=uncond,
                          guidance_scale=scale, denoise_to_zero=True)
        results[mode] = grads + [uncond.grad.clone(), scale.grad.clone()]
    for g, w in zip(results["discrete"], results["autograd"]):
        assert relative_error(g, w) < 1e-8


def test_discrete_equals_exact_gradient_on_the_gaussian_oracle():
    sched = ad.VPSchedule.linear()
    mu, s = per_dimension(6)
    model = GaussianEps(sched, mu, s)
    x_T = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    ts = sched.timesteps(400)
    x = ad.sample(model, x_T, sched, steps=400, solver="dpmpp", order=2, grad="discrete")
    x.pow(2).sum().backward()
    got = [x_T.grad.clone(), model.mu.grad.clone(), model.s.grad.clone()]
    x_T.grad = None
    model.zero_grad()
    model.flow_map(x_T, ts[0], ts[-1]).pow(2).sum().backward()
    for g, w in zip(got, [x_T.grad, model.mu.grad, model.s.grad]):
        assert relative_error(g, w) < 1e-4


EXACT_STEPS = [160, 320, 640, 1280]


def gaussian_adjoint_errors(form, order, sde):
    sched = ad.VPSchedule.linear()
    mu, s = per_dimension(3, seed=2)
    model = GaussianEps(sched, mu, s)
    x_T = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    ts = sched.timesteps(10)
    t0, t1 = ts[0], ts[-1]
    if sde:
        # The reverse SDE is linear in x here: dx_0/dx_T = (k(t1)/k(t0))^2 alpha(t0)/alpha(t1), noise aside.
        k = lambda t: torch.sqrt(sched.alpha(t) ** 2 * s**2 + sched.sigma(t) ** 2)
        exact = (k(t1) / k(t0)) ** 2 * sched.alpha(t0) / sched.alpha(t1) * torch.ones_like(x_T)
    else:
        exact = torch.autograd.grad(model.flow_map(x_T, t0, t1).sum(), x_T)[0]
    errors = []
    for n in EXACT_STEPS:
        x = ad.sample(model, x_T, sched, steps=n, grad="adjoint", adjoint_form=form, adjoint_order=order, sde=sde,
                      generator=torch.Generator().manual_seed(1), parameters=[])
        errors.append((torch.autograd.grad(x.sum(), x_T)[0] - exact).abs().max().item())
    return errors


def slope(errors):
    xs = [math.log(n) for n in EXACT_STEPS]
    ys = [-math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


@pytest.mark.parametrize("form", ["eps", "x0"])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("sde", [False, True])
def test_adjoint_convergence_order(form, order, sde):
    errors = gaussian_adjoint_errors(form, order, sde)
    assert abs(slope(errors) - order) < 0.3, errors


def test_adjoint_parameter_and_conditioning_gradients_converge():
    sched = ad.VPSchedule.linear()
    mu, s = per_dimension(3, seed=4)
    model = GaussianEps(sched, mu, s)
    x_T = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cond = torch.full((4, 3), 0.2, dtype=torch.float64, requires_grad=True)
    ts = sched.timesteps(10)
    loss = model.flow_map(x_T, ts[0], ts[-1], cond).pow(2).sum()
    exact = torch.autograd.grad(loss, [cond, model.mu, model.s])
    for form in ("eps", "x0"):
        errors = []
        for n in (200, 800):
            x = ad.sample(model, x_T, sched, steps=n, cond=cond, grad="adjoint", adjoint_form=form, adjoint_order=2)
            got = torch.autograd.grad(x.pow(2).sum(), [cond, model.mu, model.s])
            errors.append(max(relative_error(g, w) for g, w in zip(got, exact)))
        assert errors[1] < errors[0] / 8 and errors[1] < 1e-2, (form, errors)


def test_adjoint_decoupled_grid_and_resolved_states():
    sched = ad.VPSchedule.linear()
    model = GaussianEps(sched, *per_dimension(3, seed=5))
    x_T = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    ts = sched.timesteps(10)
    exact = torch.autograd.grad(model.flow_map(x_T, ts[0], ts[-1]).sum(), x_T)[0]

    def adjoint_grad(steps, **kwargs):
        x = ad.sample(model, x_T, sched, steps=steps, grad="adjoint", adjoint_form="x0", adjoint_order=2,
                      parameters=[], **kwargs)
        return torch.autograd.grad(x.sum(), x_T)[0]

    # Recorded states on an adjoint grid of its own come from a forward solve on that grid.
    assert_close(adjoint_grad(25, adjoint_steps=400), adjoint_grad(400), rtol=1e-12, atol=1e-12)
    # Resolved states (DDIM inversion from the sample) add an error that vanishes with the grid.
    coarse = relative_error(adjoint_grad(25, adjoint_steps=100, states="resolved"), exact)
    fine = relative_error(adjoint_grad(25, adjoint_steps=400, states="resolved"), exact)
    assert fine < coarse / 3 and fine < 5e-3, (coarse, fine)


def test_frozen_parameters_dict_conditioning_and_no_grad_callers():
    net, x_T, cond, weight = real_network_case(2)
    net.inp.requires_grad_(False)
    dict_net = lambda x, t, c: net(x, t, c["emb"])
    sched = ad.VPSchedule.linear()
    grads = {}
    for mode in ("autograd", "discrete"):
        c = cond.clone().requires_grad_()
        net.zero_grad()
        x = ad.sample(dict_net, x_T, sched, steps=4, cond={"emb": c}, grad=mode, parameters=net.parameters())
        (weight * x).sum().backward()
        grads[mode] = [c.grad] + [p.grad for p in net.parameters() if p.requires_grad]
        assert all(p.grad is None for p in net.inp.parameters())
    for g, w in zip(grads["discrete"], grads["autograd"]):
        assert relative_error(g, w) < 1e-8
    with torch.no_grad():
        x = ad.sample(net, x_T.requires_grad_(), sched, steps=4, cond=cond, grad="discrete")
    assert not x.requires_grad
    plain = ad.sample(net.requires_grad_(False), x_T.detach(), sched, steps=4, cond=cond)
    assert not plain.requires_grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_low_precision_models(dtype, tol):
    net, x_T, cond, weight = real_network_case(3)
    sched = ad.VPSchedule.linear()
    want = gradients("discrete", net, x_T, cond, sched, weight=weight, steps=5)
    net = net.to(dtype)
    got = gradients("discrete", net, x_T.to(dtype), cond.to(dtype), sched, weight=weight.to(dtype), steps=5)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert relative_error(g.double(), w) < tol


class SelfCasting(torch.nn.Module):
    """`net` running its own forward under ``torch.autocast(cpu, bfloat16)``: what the sampling run computes when
    it is made inside that autocast region, wherever backward() is then called."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, cond=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x, t, cond)


@pytest.mark.parametrize("mode", ["discrete", "adjoint"])
def test_a_run_made_under_autocast_is_differentiated_under_it(mode):
    """backward() outside the torch.autocast region (the usual mixed-precision recipe): the reverse pass's model
    re-runs are made under the sampling run's autocast settings again, as torch.utils.checkpoint does, so the
    gradients are those of the bfloat16 computation that made the sample: the gradients of a model that
    autocasts its own forward. (Not for grad="autograd": there autocast's weight-cast cache sums the parameter
    gradients of all calls in bfloat16.)"""
    torch.manual_seed(4)
    net = TinyConvNet()
    x_T, cond, weight = torch.randn(3, 2, 6, 6), torch.randn(3, 4), torch.randn(3, 2, 6, 6)
    sched = ad.VPSchedule.linear()
    want = gradients(mode, SelfCasting(net), x_T, cond, sched, weight=weight, steps=5)
    x_T_leaf, cond_leaf = x_T.clone().requires_grad_(), cond.clone().requires_grad_()
    net.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = ad.sample(net, x_T_leaf, sched, cond=cond_leaf, grad=mode, steps=5)
    (weight * x).sum().backward()
    got = [x_T_leaf.grad, cond_leaf.grad] + [p.grad.clone() for p in net.parameters()]
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-6


def test_discrete_adjoint_keeps_one_step_of_activations():
    """The forward pass keeps the last step's graph, the backward re-runs the model once per earlier step
    ((4N - 1)/(3N) of autograd's work), never all at once; the peak of live tensors stays one step's."""
    net, x_T, cond, weight = real_network_case(4)
    calls = []
    hook = net.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    x = ad.sample(net, x_T.requires_grad_(), ad.VPSchedule.linear(), steps=7, cond=cond)
    assert calls == [False] * 6 + [True]
    x.sum().backward()
    assert calls == [False] * 6 + [True] * 7
    hook.remove()

    def peak(steps, grad):
        x_T.grad = None
        net.zero_grad(set_to_none=True)
        return tensor_peak_bytes(lambda: ad.sample(net, x_T, ad.VPSchedule.linear(), steps=steps, cond=cond,
                                                   grad=grad).sum().backward())

    state = x_T.numel() * x_T.element_size()
    step = (peak(20, "autograd") - peak(4, "autograd")) / 16  # one step's activations
    assert peak(20, "discrete") - peak(4, "discrete") < 16 * state + step / 4  # 16 more states, no more activations


REUSE_CASES = {
    "parameters": dict(),
    "guidance": dict(guidance_scale=3.0),
    "threshold": dict(threshold=ad.DynamicThreshold(0.9, 1.2), prediction="x0"),
    "truncated": dict(grad_steps=2, sde=True),
    "heun": dict(solver="heun", order=2),
    "one step": dict(steps=1),
}


@pytest.mark.parametrize("case", REUSE_CASES)
def test_discrete_adjoint_reuses_the_forward_graph_of_the_last_row(case):
    """The last row's model call runs with grad in the forward pass and is not re-run by the backward pass: one
    re-run per earlier differentiated row, gradients equal to autograd's (parameters through their aliases,
    guidance, thresholding, truncation, a corrector row, a one-step run); the callback sees every row without
    grad; a second backward pass (nothing kept then) gives the same gradients."""
    net, x_T, cond, weight = real_network_case(6)
    kwargs = {"steps": 4, **REUSE_CASES[case]}
    if "guidance_scale" in kwargs:
        kwargs["uncond"] = torch.zeros_like(cond, requires_grad=True)
    want = gradients("autograd", net, x_T, cond, ad.VPSchedule.linear(), weight=weight, **kwargs)
    calls, seen = [], []
    hook = net.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    got = gradients("discrete", net, x_T, cond, ad.VPSchedule.linear(), weight=weight,
                    callback=lambda info: seen.append((info, torch.is_grad_enabled())), **kwargs)
    hook.remove()
    rows = len(seen)
    differentiated = {"truncated": 2, "one step": 1}.get(case, rows)
    assert calls == [False] * (rows - 1) + [True] * differentiated
    assert [info.row for info, _ in seen] == list(range(rows))
    assert not any(grad or info.x.requires_grad or info.output.requires_grad or info.x_next.requires_grad
                   for info, grad in seen)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None) == (case == "truncated" and i == 0)  # a truncated run's x_T: a constant
        assert g is None or relative_error(g, w) < 1e-8
    x = ad.sample(net, x_T, ad.VPSchedule.linear(), cond=cond, grad="discrete",
                  generator=torch.Generator().manual_seed(3), **kwargs)
    loss = (weight * x).sum()
    first = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(first, torch.autograd.grad(loss, list(net.parameters()))))


def test_bad_gradient_arguments():
    net, x_T, cond, _ = real_network_case()
    sched = ad.VPSchedule.linear()
    x_T.requires_grad_()
    cases = [
        (dict(grad="backprop"), "unknown grad mode"),
        (dict(grad="adjoint", adjoint_order=3), "adjoint_order"),
        (dict(grad="adjoint", adjoint_form="v"), "adjoint_form"),
        (dict(grad="adjoint", states="cached"), "states"),
        (dict(grad="adjoint", threshold=ad.DynamicThreshold()), "thresholded"),
        (dict(grad="adjoint", sde=True, states="resolved"), "resolved"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ad.sample(net, x_T, sched, steps=3, cond=cond, **kwargs)


def test_disconnected_model_and_non_finite_adjoint_errors():
    sched = ad.VPSchedule.linear()
    x_T = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    constant = torch.zeros(2, 3, dtype=torch.float64)
    x = ad.sample(lambda x, t: constant, x_T, sched, steps=3, parameters=[torch.zeros(1, requires_grad=True)])
    with pytest.raises(RuntimeError, match="does not depend"):
        x.sum().backward()
    model = GaussianEps(sched, *per_dimension(3))
    x = ad.sample(model, x_T, sched, steps=3, grad="adjoint", adjoint_form="eps", parameters=[])
    with pytest.raises(FloatingPointError, match="adjoint state became non-finite"):
        (x * float("inf")).sum().backward()
    x = ad.sample(model, x_T, sched, steps=3, grad="adjoint", adjoint_form="eps", parameters=[], check_finite=False)
    (x * float("inf")).sum().backward()  # returned as autograd would
    assert not torch.isfinite(x_T.grad).all()


def test_adjoint_options_equal_the_separate_keywords():
    sched = ad.VPSchedule.linear()
    model = GaussianEps(sched, *per_dimension(3, seed=6))
    x_T = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()

    def adjoint_grad(**kwargs):
        x = ad.sample(model, x_T, sched, steps=12, grad="adjoint", parameters=[], **kwargs)
        return torch.autograd.grad(x.sum(), x_T)[0]

    options = ad.AdjointOptions(order=2, form="x0", steps=20, states="resolved")
    assert torch.equal(adjoint_grad(adjoint=options),
                       adjoint_grad(adjoint_order=2, adjoint_form="x0", adjoint_steps=20, states="resolved"))
    assert torch.equal(adjoint_grad(), adjoint_grad(adjoint=ad.AdjointOptions()))
    with pytest.raises(ValueError, match="not both"):
        adjoint_grad(adjoint=options, adjoint_order=1)
    with pytest.raises(ValueError, match="adjoint_steps"):
        ad.AdjointOptions(steps=0)


@pytest.mark.parametrize("mode", ["discrete", "adjoint"])
def test_callback_fires_once_per_evaluation_of_the_sampling_run_only(mode):
    net, x_T, cond, _ = real_network_case(5)
    seen = []
    x = ad.sample(net, x_T.requires_grad_(), ad.VPSchedule.linear(), steps=4, solver="heun", cond=cond, grad=mode,
                  adjoint_steps=6 if mode == "adjoint" else None, callback=seen.append)
    assert [(info.row, info.step, info.starts_step) for info in seen] == [
        (0, 0, True), (1, 1, False), (2, 1, True), (3, 2, False), (4, 2, True), (5, 3, False), (6, 3, True)]
    assert torch.equal(seen[0].x, x_T) and torch.equal(seen[-1].x_next, x)
    assert all(torch.equal(a.x_next, b.x) for a, b in zip(seen, seen[1:]))
    x.sum().backward()
    assert len(seen) == 7


@pytest.mark.parametrize("grad_steps", [None, 1])
def test_lora_adapters_via_peft(grad_steps):
    """A peft LoRA model (only the adapters require grad): the discrete adjoint's adapter gradients equal autograd's,
    also truncated to the last step (DRaFT-LV); the frozen base gets none and the module keeps its parameters."""
    net, x_T, cond, weight = real_network_case(5)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["time", "cond", "mid"], init_lora_weights=False)
    model = peft.get_peft_model(net, config)
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert 0 < len(adapters) < len(list(model.parameters()))
    before = list(model.parameters())
    grads = {}
    for mode in ("autograd", "discrete"):
        x = ad.sample(model, x_T, ad.VPSchedule.linear(), steps=5, cond=cond, sde=True, grad=mode,
                      grad_steps=grad_steps, generator=torch.Generator().manual_seed(1))
        (weight * x).sum().backward()
        grads[mode] = [p.grad.clone() for p in adapters]
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        model.zero_grad(set_to_none=True)
    for g, w in zip(grads["discrete"], grads["autograd"]):
        assert relative_error(g, w) < 1e-8
    assert all(p is q for p, q in zip(model.parameters(), before))


class Stochastic(torch.nn.Module):
    """Dropout and a train-mode BatchNorm, and a layer its forward reaches through a plain list, outside
    ``_modules``, on the noisy steps only (t > 0.5)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.drop = torch.nn.Dropout(0.5)
        self.norm = torch.nn.BatchNorm1d(4)
        self.gate = torch.nn.Linear(4, 4)
        self.hidden = [self.gate]

    def forward(self, x, t):
        h = self.norm(self.drop(torch.tanh(self.a(x))))
        if float(t[0]) > 0.5:
            h = h + self.hidden[0](x)
        return h


@pytest.mark.parametrize("mode", ["discrete", "adjoint"])
def test_dropout_batchnorm_and_a_step_dependent_path(mode):
    """The reverse pass re-runs the model with the forward pass's random draws (its dropout masks: discrete is
    autograd's gradient), leaves the global generators and the train-mode BatchNorm's statistics as the forward
    pass left them, and reaches a parameter that only some steps use (outside ``_modules``)."""
    torch.manual_seed(0)
    net = Stochastic().double().train()
    x_T = torch.randn(3, 4, dtype=torch.float64)
    weight = torch.randn(3, 4, dtype=torch.float64)
    results = {}
    for grad in ("autograd", mode):
        x_T.grad = None
        net.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        x = ad.sample(net, x_T.requires_grad_(), ad.VPSchedule.linear(), steps=4, grad=grad)
        stats = [b.clone() for b in net.norm.buffers()]
        generator = torch.get_rng_state()
        (weight * x).sum().backward()
        assert torch.equal(torch.get_rng_state(), generator)
        assert all(torch.equal(b, s) for b, s in zip(net.norm.buffers(), stats))
        results[grad] = x.detach(), x_T.grad.clone(), [p.grad for p in net.parameters()]
    (x_a, gx_a, gp_a), (x_m, gx_m, gp_m) = results["autograd"], results[mode]
    assert torch.equal(x_a, x_m)
    assert all(g is not None for g in gp_m), "the gated layer's parameters get their gradient"
    if mode == "discrete":
        assert_close(gx_m, gx_a, rtol=1e-10, atol=1e-12)
        for g, w in zip(gp_m, gp_a):
            assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["discrete", "adjoint"])
def test_double_backward_raises(mode):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()).double().requires_grad_(False)
    x_T = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    x = ad.sample(lambda x, t: net(x), x_T, ad.VPSchedule.linear(), steps=2, grad=mode)
    with pytest.raises(RuntimeError, match="create_graph=True.*grad='autograd'"):
        torch.autograd.grad(x.square().sum(), x_T, create_graph=True)
    x = ad.sample(lambda x, t: net(x), x_T, ad.VPSchedule.linear(), steps=2, grad=mode)
    torch.autograd.grad(x.square().sum(), x_T)  # a first derivative


@pytest.mark.parametrize("mode", ["autograd", "discrete", "adjoint"])
def test_parameters_given_are_the_only_ones_differentiated(mode):
    """parameters= limits the gradient to those tensors in every mode (ad.guide's default, parameters=[]): the
    module's other parameters keep .grad None and the module is not modified."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4)).double()
    first, rest = list(net[0].parameters()), list(net[2].parameters())
    x_T = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    for parameters in ([], first):
        x_T.grad = None
        net.zero_grad(set_to_none=True)
        x = ad.sample(lambda x, t: net(x), x_T, ad.VPSchedule.linear(), steps=3, grad=mode, parameters=parameters)
        x.sum().backward()
        assert all(p.grad is None for p in rest)
        assert all((p.grad is not None) == any(p is q for q in parameters) for p in first)
    assert all(type(p) is torch.nn.Parameter and p.requires_grad for p in net.parameters())
    got = [x_T.grad.clone()] + [p.grad.clone() for p in first]
    x_T.grad = None
    net.zero_grad(set_to_none=True)
    ad.sample(lambda x, t: net(x), x_T, ad.VPSchedule.linear(), steps=3, grad="autograd").sum().backward()
    if mode != "adjoint":  # the same values as unrestricted autograd's (adjoint: the continuous gradient)
        for g, w in zip(got, [x_T.grad] + [p.grad for p in first]):
            assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["discrete", "adjoint"])
def test_tensors_that_require_grad_beyond_the_parameters_are_named_in_a_warning(mode):
    """A closure's module gets a gradient from grad='autograd' but not from discrete/adjoint (which differentiate
    parameters=, by default an nn.Module model's own): a warning says so; parameters= given, or a module model
    whose parameters are all it reaches, warns nothing."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()).double()
    x_T = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    sched = ad.VPSchedule.linear()
    with pytest.warns(UserWarning, match=r"reaches 2 tensor\(s\) that require grad.*\[4, 4\], \[4\]"):
        ad.sample(lambda x, t: net(x), x_T, sched, steps=3, grad=mode).sum().backward()
    assert all(p.grad is None for p in net.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        closure = lambda x, t: net(x)
        for model, parameters in ((closure, list(net.parameters())), (closure, []), (TinyModule(net), None)):
            ad.sample(model, x_T, sched, steps=3, grad=mode, parameters=parameters).sum().backward()


class TinyModule(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x)


class Counting(torch.nn.Module):
    """A forward that assigns: a call counter and a buffer replaced by a new tensor at every call."""

    def __init__(self):
        super().__init__()
        self.lin, self.calls = torch.nn.Linear(3, 3).double(), 0
        self.register_buffer("ema", torch.zeros(3, dtype=torch.float64))

    def forward(self, x, t):
        self.calls += 1
        self.ema = 0.9 * self.ema + x.detach().abs().mean(0)
        return self.lin(x)


def test_what_the_forward_assigns_reaches_the_module_as_with_autograd_and_the_backward_assigns_nothing():
    """After sampling, the module holds what N calls assigned in every mode (discrete's last call runs on a shallow
    copy: what it assigned is given back); the reverse pass's re-runs assign nothing to it."""
    seen = {}
    for mode in ("autograd", "discrete", "adjoint"):
        torch.manual_seed(0)
        model = Counting()
        x = ad.sample(model, torch.randn(2, 3, dtype=torch.float64, requires_grad=True), ad.VPSchedule.linear(),
                      steps=5, grad=mode)
        after_sampling = (model.calls, model.ema.clone(), model._buffers["ema"] is model.ema)
        x.sum().backward()
        seen[mode] = after_sampling
        assert model.calls == 5 and torch.equal(model.ema, after_sampling[1]), mode
    for mode in ("discrete", "adjoint"):
        assert seen[mode][0] == 5 and seen[mode][2] and torch.equal(seen[mode][1], seen["autograd"][1]), mode


@pytest.mark.parametrize("mode", ["discrete", "adjoint"])
def test_parametrize_cached_is_refused(mode):
    """parametrize.cached() hands every call the first call's weights: sampling or backpropagating inside it
    raises (plain autograd is what it is for)."""
    from torch.nn.utils import parametrize

    class Scaled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    net = torch.nn.Linear(3, 3).double()
    parametrize.register_parametrization(net, "weight", Scaled())
    model, sched = lambda x, t: net(x), ad.VPSchedule.linear()
    x_T = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with parametrize.cached(), pytest.raises(RuntimeError, match="parametrize.cached"):
        ad.sample(model, x_T, sched, steps=3, grad=mode, parameters=list(net.parameters()))
    x = ad.sample(model, x_T, sched, steps=3, grad=mode, parameters=list(net.parameters()))
    with parametrize.cached(), pytest.raises(RuntimeError, match="parametrize.cached"):
        x.sum().backward()
    with parametrize.cached():
        ad.sample(model, x_T, sched, steps=3, grad="autograd").sum().backward()


def test_a_compiled_module_s_copy_keeps_its_own_forward_through_synchronise():
    """The forward pass's call on the shadow gives the copies the module's attributes first: a torch.compile'd
    module's forward (bound to its original) must not be among them, or the call would run the user's module."""
    from adjointdeis.models import ParameterAliases, synchronise

    compiled = torch.compile(TinyModule(torch.nn.Linear(3, 3).double()), backend="eager")
    aliases = ParameterAliases(compiled, list(compiled.parameters()))
    synchronise(aliases.copies, back=False)
    x = torch.randn(2, 3, dtype=torch.float64)
    assert aliases.module.forward is not compiled.forward and not aliases.escaped(aliases.module(x, torch.zeros(2)))


def test_a_grad_scaler_sees_the_non_finite_gradients_of_an_overflowing_float16_backward():
    """The AMP recipe: float16 autocast, a GradScaler scaling the loss. Its first scales overflow the float16
    backward, and the scaler must see inf gradients and back off, as it does with autograd; check_finite=False
    lets them through (the default raises, naming check_finite)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(16, 3, 3, padding=1))
    model = lambda x, t: net(x)  # noqa: E731
    sched = ad.VPSchedule.linear()
    x_T = torch.randn(2, 3, 8, 8)

    def scales(mode, **kwargs):
        scaler, opt, seen = torch.amp.GradScaler("cpu"), torch.optim.SGD(net.parameters(), lr=1e-3), []
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = ad.sample(model, x_T, sched, steps=6, grad=mode, parameters=list(net.parameters()),
                              **kwargs).float().square().sum()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen.append(scaler.get_scale())
        return seen

    expected = scales("autograd")
    assert expected[-1] < 65536.0, "the case must overflow float16 at the scaler's first scales"
    assert scales("discrete", check_finite=False) == expected
    with pytest.raises(FloatingPointError, match="check_finite=False"):
        scales("discrete")


@pytest.mark.parametrize("mode", ["discrete", "adjoint"])
def test_a_compiled_function_around_a_discrete_or_adjoint_sample_runs_it_eagerly(mode):
    """torch.compile of a loss that samples with grad="discrete" or "adjoint" breaks the graph at the sampler
    (which dynamo could not trace: it crashed inside) and gives the eager gradients; fullgraph=True says why."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4, dtype=torch.float64)
    sched = ad.VPSchedule.linear()
    x0 = torch.randn(2, 4, dtype=torch.float64)

    def loss(x):
        return ad.sample(lambda x, t: net(x), x, sched, steps=4, grad=mode,
                         parameters=list(net.parameters())).square().sum()

    grads = []
    for fn in (loss, torch.compile(loss)):
        x = x0.clone().requires_grad_()
        net.zero_grad()
        fn(x).backward()
        grads.append((x.grad, net.weight.grad.clone()))
    assert_close(grads[1], grads[0], rtol=1e-12, atol=0)
    # In a child: after a failed fullgraph compile, torch 2.14 holds one more Python reference to every new tensor,
    # which turns off the CPU loop's buffer recycling for the rest of the process (a later test would see it).
    code = ("import torch, adjointdeis as ad\n"
            "net, sched = torch.nn.Linear(4, 4), ad.VPSchedule.linear()\n"
            f"f = lambda x: ad.sample(lambda x, t: net(x), x, sched, steps=2, grad={mode!r})\n"
            "torch.compile(f, fullgraph=True)(torch.randn(2, 4, requires_grad=True))\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode != 0 and "runs grad='discrete'/'adjoint' eagerly" in child.stderr


@pytest.mark.parametrize("mode", ["discrete", "adjoint"])
def test_a_lazy_module_not_called_yet_is_refused_and_differentiated_once_called(mode):
    """A lazy module's parameters get their shape at its first call, inside the sampling run, after discrete and
    adjoint took them as inputs (the adjoint's backward then failed inside autograd with a shape error): both
    raise, naming parameters; once called, the gradients are autograd's (discrete) and reach every parameter."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Tanh(), torch.nn.Linear(4, 4)).double()
    x_T = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="parameters include a lazy module's uninitialised parameter"):
        ad.sample(TinyModule(net), x_T, ad.VPSchedule.linear(), steps=3, grad=mode)
    net(x_T.detach())
    grads = {}
    for grad in ("autograd", mode):
        x = ad.sample(TinyModule(net), x_T, ad.VPSchedule.linear(), steps=3, grad=grad)
        grads[grad] = torch.autograd.grad(x.square().sum(), [x_T, *net.parameters()])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[mode])
    if mode == "discrete":
        for g, w in zip(grads[mode], grads["autograd"]):
            assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", [torch.nn.utils.spectral_norm, torch.nn.utils.parametrizations.spectral_norm])
def test_a_forward_that_reads_buffers_it_changes_is_re_run_from_what_each_call_read(norm):
    """A train-mode spectral_norm's forward takes one power-iteration step on its buffers (u, v) in place and reads
    them: each re-run of the reverse pass must start from the buffers its forward call found, or it differentiates
    another weight (relative error 0.07-0.25 here); after the pass they are as the forward pass left them."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(norm(torch.nn.Linear(4, 4)), torch.nn.Tanh(), torch.nn.Linear(4, 4)).double().train()
    start = [b.clone() for b in net.buffers()]
    x_T = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, dtype=torch.float64)
    grads = {}
    for mode in ("autograd", "discrete"):
        with torch.no_grad():
            for b, s in zip(net.buffers(), start):
                b.copy_(s)
        x = ad.sample(TinyModule(net), x_T, ad.VPSchedule.linear(), steps=4, order=2, grad=mode)
        sampled = [b.clone() for b in net.buffers()]
        grads[mode] = torch.autograd.grad((weight * x).sum(), [x_T, *net.parameters()])
        assert all(torch.equal(b, s) for b, s in zip(net.buffers(), sampled))
    for g, w in zip(grads["discrete"], grads["autograd"]):
        assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")  # its no_grad sampling calls
@pytest.mark.parametrize("mode", ["discrete", "adjoint"])
def test_a_reentrant_checkpoint_inside_the_model_is_named_and_a_non_reentrant_one_differentiated(mode):
    """torch.utils.checkpoint(use_reentrant=True) refuses torch.autograd.grad, which every re-run's VJP is: the
    backward raises naming use_reentrant=False (torch's own error told the user, who called backward(), not to
    pass inputs=); with use_reentrant=False discrete's gradients are autograd's."""
    import torch.utils.checkpoint as checkpoint

    class Checkpointed(torch.nn.Module):
        def __init__(self, reentrant):
            super().__init__()
            self.a, self.b, self.reentrant = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4), reentrant

        def forward(self, x, t):
            h = checkpoint.checkpoint(lambda u: torch.tanh(self.a(u) + t[:, None]), x, use_reentrant=self.reentrant)
            return self.b(h)

    torch.manual_seed(0)
    net = Checkpointed(True).double()
    x_T = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    x = ad.sample(net, x_T, ad.VPSchedule.linear(), steps=3, grad=mode)
    with pytest.raises(RuntimeError, match=rf"grad='{mode}'.*use_reentrant=True.*pass use_reentrant=False"):
        x.sum().backward()
    net.reentrant = False
    grads = {}
    for grad in ("autograd", mode):
        x = ad.sample(net, x_T, ad.VPSchedule.linear(), steps=3, grad=grad)
        grads[grad] = torch.autograd.grad(x.square().sum(), [x_T, *net.parameters()])
    if mode == "discrete":
        for g, w in zip(grads[mode], grads["autograd"]):
            assert_close(g, w, rtol=1e-10, atol=1e-12)


class Stateful(torch.nn.Module):
    """A train-mode spectral_norm (its forward changes and reads its buffers) and BatchNorm, with a method that is
    not forward."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.utils.spectral_norm(torch.nn.Linear(4, 4))
        self.norm = torch.nn.BatchNorm1d(4)
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x, t, scale=1.0):
        return scale * self.b(self.norm(torch.tanh(self.a(x) + t[:, None])))

    def eps(self, x, t):
        return -self.forward(x, t)


@pytest.mark.parametrize("wrap", ["bound method", "partial", "partial of a bound method"])
@pytest.mark.parametrize("mode", ["discrete", "adjoint"])
def test_a_bound_method_or_partial_of_a_module_is_re_run_as_the_module_is(wrap, mode):
    """model=net.eps or functools.partial(net, ...): the reverse pass re-runs a shadow of net, as for net itself,
    so its train-mode buffers stay as the forward pass left them (they moved N - 1 more times) and discrete's
    gradients are autograd's (the re-runs read buffers other than their forward calls read: 24% off)."""
    import functools

    results = {}
    for grad in ("autograd", mode):
        torch.manual_seed(0)
        net = Stateful().double().train()
        model = {"bound method": net.eps, "partial": functools.partial(net, scale=2.0),
                 "partial of a bound method": functools.partial(net.forward, scale=2.0)}[wrap]
        x_T = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        x = ad.sample(model, x_T, ad.VPSchedule.linear(), steps=4, grad=grad, parameters=list(net.parameters()))
        sampled = [b.clone() for b in net.buffers()]
        results[grad] = torch.autograd.grad(x.square().sum(), [x_T, *net.parameters()]), sampled
        assert all(torch.equal(b, s) for b, s in zip(net.buffers(), sampled)), grad
    assert all(torch.equal(b, c) for b, c in zip(results[mode][1], results["autograd"][1]))
    if mode == "discrete":
        for g, w in zip(*(results[k][0] for k in (mode, "autograd"))):
            assert_close(g, w, rtol=1e-10, atol=1e-12)
