"""``adjointdeis.k_diffusion``: k-diffusion's sampler functions, run through ``sample``.

Oracles: k-diffusion's own released ``sampling.py`` (tests/test_k_diffusion_oracle.py, every shared sampler);
here, independent plain-loop transcriptions of the published updates (Karras et al. Algorithm 2 for
Euler/Heun, DPM-Solver++(2M), (3M) and the SDE variant in ``t = -log(sigma)``) in the same VE coordinates and
calling convention, the gradients against plain autograd, and DEIS (which k-diffusion does not ship) against
Adams-Bashforth weights integrated by Gauss-Legendre quadrature.
"""

import math

import numpy as np
import pytest
import torch
from nets import TinyConvNet
from torch import nn

from adjointdeis import k_diffusion as kd
from adjointdeis import validation

SHAPE = (2, 2, 6, 6)
COND_DIM = 4



class EDMDenoiser(nn.Module):
    """A k-diffusion denoiser: EDM preconditioning around a small conv net, ``D(x, sigma, cond)`` -> x0-hat."""

    def __init__(self, sigma_data=0.5):
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyConvNet(channels=SHAPE[1], width=8, cond_dim=COND_DIM)
        self.sigma_data = sigma_data

    def forward(self, x, sigma, cond=None, scale=1.0):
        s = sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        sd2 = self.sigma_data**2
        c_skip, c_out = sd2 / (s**2 + sd2), s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1 / (s**2 + sd2).sqrt()
        return c_skip * x + scale * c_out * self.net(c_in * x, sigma.log() / 4, cond)


def karras_sigmas(n, sigma_min=0.02, sigma_max=10.0, rho=7.0, final_zero=True):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if final_zero else sigmas


def setup(dtype, seed=0):
    model = EDMDenoiser().to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype) * 10.0
    cond = torch.randn(SHAPE[0], COND_DIM, generator=g, dtype=torch.float64).to(dtype)
    return model, x, cond


def relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


# Transcriptions of k-diffusion's updates. Each returns the sample and the per-step (x, denoised).


def ref_dpmpp_2m(model, x, sigmas, extra):
    steps, old = [], None
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        den = model(x, sigma * x.new_ones(x.shape[0]), **extra)
        steps.append((x, den))
        h = math.log(sigma) - (math.log(nxt) if nxt > 0 else -math.inf)
        d = den
        if old is not None and nxt > 0:
            r = (math.log(sigmas[i - 1]) - math.log(sigma)) / h
            d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
        x = (nxt / sigma) * x - math.expm1(-h) * d
        old = den
    return x, steps


def ref_dpmpp_3m(model, x, sigmas, extra):
    """DPM-Solver++(3M) in sigma coordinates: k-diffusion's 3M update at eta = 0, 2M warm-up on step 2."""
    steps, hist, hs = [], [], []
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        den = model(x, sigma * x.new_ones(x.shape[0]), **extra)
        steps.append((x, den))
        if nxt == 0:
            x = den
        else:
            h = math.log(sigma) - math.log(nxt)
            phi_1 = -math.expm1(-h)
            x = (nxt / sigma) * x + phi_1 * den
            if len(hist) >= 2:
                r0, r1 = hs[-1] / h, hs[-2] / h
                d1_0, d1_1 = (den - hist[-1]) / r0, (hist[-1] - hist[-2]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h) / h + 1
                phi_3 = phi_2 / h - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif hist:
                r = hs[-1] / h
                x = x + phi_1 * (den - hist[-1]) / (2 * r)
            hs.append(h)
        hist.append(den)
    return x, steps


def ref_dpmpp_2m_sde(model, x, sigmas, extra, noise):
    steps, old, h_last = [], None, None
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        den = model(x, sigma * x.new_ones(x.shape[0]), **extra)
        steps.append((x, den))
        if nxt == 0:
            x = den
        else:
            h = math.log(sigma) - math.log(nxt)
            x = (nxt / sigma) * math.exp(-h) * x - math.expm1(-2 * h) * den
            if old is not None:
                x = x - 0.5 * math.expm1(-2 * h) * (h / h_last) * (den - old)
            x = x + noise() * nxt * math.sqrt(-math.expm1(-2 * h))
            h_last = h
        old = den
    return x, steps


def ref_euler(model, x, sigmas, extra):
    steps = []
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i] * x.new_ones(x.shape[0]), **extra)
        steps.append((x, den))
        x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x, steps


def ref_heun(model, x, sigmas, extra):
    steps = []
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        den = model(x, sigma * x.new_ones(x.shape[0]), **extra)
        steps.append((x, den))
        d = (x - den) / sigma
        x_euler = x + d * (nxt - sigma)
        if nxt == 0:
            x = x_euler
        else:
            d_2 = (x_euler - model(x_euler, nxt * x.new_ones(x.shape[0]), **extra)) / nxt
            x = x + (d + d_2) / 2 * (nxt - sigma)
    return x, steps


def ref_deis(model, x, sigmas, extra, order):
    """Adams-Bashforth in log(sigma) on eps = (x - D)/sigma: x' = x + sum_j eps_j int L_j(log s) ds."""
    nodes, weights = np.polynomial.legendre.leggauss(30)
    steps, eps_hist = [], []
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        den = model(x, sigma * x.new_ones(x.shape[0]), **extra)
        steps.append((x, den))
        eps_hist.insert(0, (x - den) / sigma)
        k = 1 if nxt == 0 else min(order, i + 1)
        if k == 1:
            x = x + eps_hist[0] * (nxt - sigma)
            continue
        logs = [math.log(sigmas[i - j]) for j in range(k)]
        u = 0.5 * (math.log(nxt) - logs[0]) * nodes + 0.5 * (math.log(nxt) + logs[0])
        jac = 0.5 * (math.log(nxt) - logs[0])
        for j in range(k):
            basis = np.prod([(u - logs[m]) / (logs[j] - logs[m]) for m in range(k) if m != j], axis=0)
            x = x + eps_hist[j] * float(np.sum(weights * basis * np.exp(u)) * jac)
    return x, steps


SAMPLERS = {
    "dpmpp_2m": (kd.sample_dpmpp_2m, {}, ref_dpmpp_2m),
    "dpmpp_3m": (kd.sample_dpmpp_3m, {}, ref_dpmpp_3m),
    "euler": (kd.sample_euler, {}, ref_euler),
    "heun": (kd.sample_heun, {}, ref_heun),
    "deis1": (kd.sample_deis, {"order": 1}, lambda *a: ref_deis(*a, order=1)),
    "deis2": (kd.sample_deis, {"order": 2}, lambda *a: ref_deis(*a, order=2)),
    "deis3": (kd.sample_deis, {"order": 3}, lambda *a: ref_deis(*a, order=3)),
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_matches_transcribed_update(name, dtype):
    sampler, options, reference = SAMPLERS[name]
    model, x, cond = setup(dtype)
    sigmas = karras_sigmas(7).to(dtype)
    extra = {"cond": cond, "scale": 0.7}
    with torch.no_grad():
        ours = sampler(model, x, sigmas, extra_args=extra, disable=True, **options)
        want, _ = reference(model, x, sigmas.tolist(), extra)
    tol = 1e-8 if name == "deis3" and dtype == torch.float64 else TOL[dtype]
    assert relative_error(ours, want) < tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sde_matches_transcribed_update_with_the_same_noise(dtype):
    model, x, cond = setup(dtype)
    sigmas = karras_sigmas(6).to(dtype)
    with torch.no_grad():
        ours = kd.sample_dpmpp_2m_sde(model, x, sigmas, extra_args={"cond": cond}, disable=True,
                                      generator=torch.Generator().manual_seed(3))
        draws = torch.Generator().manual_seed(3)
        want, _ = ref_dpmpp_2m_sde(model, x, sigmas.tolist(), {"cond": cond},
                                   lambda: torch.randn(x.shape, generator=draws, dtype=dtype))
    assert relative_error(ours, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sigma,sigma_next", [(80.0, 60.0), (80.0, 20.0), (1.0, 0.5)])
def test_half_precision_steps_are_the_float64_step_rounded_once(dtype, sigma, sigma_next):
    """One Euler and one Heun step in bfloat16/float16 from a large sigma: the float64 step from the same
    rounded state and denoiser outputs (Heun's stage state rounded as it is stored), rounded once to the dtype,
    in at least 99% of the elements (the rest one unit off: two roundings, float32 then the dtype)."""
    weight = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.3
    model = lambda x, s: torch.tanh(x @ weight.to(x.dtype))
    x = (torch.randn(4096, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigma).to(dtype)
    sigmas, xd, dt = torch.tensor([sigma, sigma_next]), x.double(), sigma_next - sigma
    d = (xd - model(x, None).double()) / sigma
    stage = (xd + d * dt).to(dtype)
    d_next = (stage.double() - model(stage, None).double()) / sigma_next
    for name, exact in (("euler", xd + d * dt), ("heun", xd + (d + d_next) / 2 * dt)):
        got = getattr(kd, f"sample_{name}")(model, x, sigmas, disable=True)
        assert got.dtype == dtype
        assert (got == exact.to(dtype)).double().mean() >= 0.99, name


def test_final_sigma_above_zero_keeps_second_order():
    """Without the 0, k-diffusion's last step is a full 2M step (no lowered final order)."""
    model, x, cond = setup(torch.float64)
    sigmas = karras_sigmas(6, final_zero=False)
    with torch.no_grad():
        ours = kd.sample_dpmpp_2m(model, x, sigmas, extra_args={"cond": cond}, disable=True)
        want, _ = ref_dpmpp_2m(model, x, sigmas.tolist(), {"cond": cond})
    assert relative_error(ours, want) < 1e-10


@pytest.mark.parametrize("name", ["dpmpp_2m", "heun"])
def test_callback_receives_each_step(name):
    sampler, _, reference = SAMPLERS[name]
    model, x, cond = setup(torch.float64)
    sigmas = karras_sigmas(5)
    seen = []
    with torch.no_grad():
        sampler(model, x, sigmas, extra_args={"cond": cond}, callback=seen.append, disable=True)
        _, steps = reference(model, x, sigmas.tolist(), {"cond": cond})
    assert [info["i"] for info in seen] == list(range(5))
    for info, (x_i, den_i) in zip(seen, steps):
        assert set(info) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert info["sigma"] is not None and torch.equal(info["sigma"], sigmas[info["i"]])
        assert relative_error(info["x"], x_i) < 1e-10 and relative_error(info["denoised"], den_i) < 1e-10


def test_callback_fires_only_in_the_forward_pass():
    model, x, cond = setup(torch.float64)
    seen = []
    out = kd.sample_dpmpp_2m(model, x.requires_grad_(), karras_sigmas(4), extra_args={"cond": cond},
                             callback=seen.append, disable=True)
    out.square().sum().backward()
    assert len(seen) == 4 and x.grad is not None


@pytest.mark.parametrize("name", ["dpmpp_2m", "heun", "deis3"])
def test_gradients_discrete_equal_autograd(name):
    sampler, options, _ = SAMPLERS[name]
    model, x, cond = setup(torch.float64)
    sigmas = karras_sigmas(5)
    leaves = [x.requires_grad_(), cond.requires_grad_()] + list(model.parameters())
    grads = {}
    for grad in ("discrete", "autograd"):
        out = sampler(model, x, sigmas, extra_args={"cond": cond, "scale": 0.7}, disable=True, grad=grad, **options)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).square().sum()
        grads[grad] = torch.autograd.grad(loss, leaves)
    for got, want in zip(grads["discrete"], grads["autograd"]):
        assert relative_error(got, want) < 1e-8


def test_bad_arguments_raise():
    model, x, cond = setup(torch.float32)
    sigmas = karras_sigmas(4).float()
    with pytest.raises(ValueError, match="strictly decreasing"):
        kd.sample_dpmpp_2m(model, x, sigmas.flip(0), disable=True)
    with pytest.raises(ValueError, match="strictly decreasing"):
        kd.sample_euler_ancestral(model, x, sigmas.flip(0), disable=True)
    with pytest.raises(ValueError, match="solver_type"):
        kd.sample_dpmpp_2m_sde(model, x, sigmas, solver_type="euler", disable=True)
    with pytest.raises(ValueError, match="not both"):
        kd.sample_dpmpp_2m_sde(model, x, sigmas, noise_sampler=lambda s, t: torch.randn_like(x),
                               generator=torch.Generator(), disable=True)
    with pytest.raises(TypeError, match="noise_sampler"):
        kd.sample_euler_ancestral(model, x, sigmas, noise_sampler=3, disable=True)
    with pytest.raises(TypeError, match=r"noise_sampler\(sigma, sigma_next\) must return a tensor"):
        kd.sample_euler_ancestral(model, x, sigmas, noise_sampler=lambda s, t: None, disable=True)
    with pytest.raises(TypeError, match="sample_dpmpp_2m_sde: generator"):
        kd.sample_dpmpp_2m_sde(model, x, sigmas, generator=5, disable=True)
    with pytest.raises(ValueError, match="order"):
        kd.sample_deis(model, x, sigmas, order=4, disable=True)
    with pytest.raises(ValueError, match="order must be an integer in 1..4"):
        kd.sample_lms(model, x, sigmas, order=5, disable=True)
    with pytest.raises(ValueError, match="max_order"):
        kd.sample_ipndm(model, x, sigmas, max_order=0, disable=True)
    with pytest.raises(ValueError, match="r must be"):
        kd.sample_dpmpp_sde(model, x, sigmas, r=0.0, disable=True)
    with pytest.raises(ValueError, match="sample_euler_ancestral: eta"):
        kd.sample_euler_ancestral(model, x, sigmas, eta=math.nan, disable=True)
    with pytest.raises(ValueError, match="sample_dpmpp_2m_sde: s_noise"):
        kd.sample_dpmpp_2m_sde(model, x, sigmas, s_noise=math.inf, disable=True)
    with pytest.raises(TypeError, match="sample_heun: s_tmin"):
        kd.sample_heun(model, x, sigmas, s_churn=1.0, s_tmin="a", disable=True)
    with pytest.raises(TypeError, match="sample_dpmpp_sde: s_noise"):
        kd.sample_dpmpp_sde(model, x, sigmas, s_noise="a", disable=True)
    kd.sample_euler(model, x, sigmas, s_churn=1.0, s_tmax=math.inf, disable=True)  # the default s_tmax
    with pytest.raises(ValueError, match="grad='adjoint'"):
        kd.sample_heun(model, x.requires_grad_(), sigmas, grad="adjoint", disable=True)


@pytest.mark.parametrize("function", ["sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
@pytest.mark.parametrize("bad_x", ["integer", "list"])
def test_sde_samplers_name_a_bad_x_before_building_their_default_noise(function, bad_x):
    """The SDE samplers' default Brownian tree is built from x: a bad x is refused naming it (not a torch error from
    inside the tree), and before the tree draws its seed from torch's generator."""
    model, x, _ = setup(torch.float64)
    x = x.long() if bad_x == "integer" else x.tolist()
    torch.manual_seed(1)
    with pytest.raises(validation.ArgumentTypeError, match="x must be a real floating-point tensor"):
        getattr(kd, function)(model, x, karras_sigmas(4), disable=True)
    drawn = torch.rand(())
    torch.manual_seed(1)
    assert torch.equal(drawn, torch.rand(()))


@pytest.mark.parametrize("function,key,value,error", [
    ("sample_res_multistep", "s_noise", math.nan, ValueError), ("sample_res_multistep", "s_noise", "a", TypeError),
    ("sample_res_multistep_ancestral", "s_noise", math.inf, ValueError),
    ("sample_res_multistep_ancestral", "eta", math.nan, ValueError),
    ("sample_res_multistep_ancestral", "eta", None, TypeError)])
def test_res_multistep_names_a_bad_eta_or_s_noise(function, key, value, error):
    """As every other noisy sampler: a non-finite or non-numeric eta / s_noise raises naming it (a NaN eta was
    reported as bad sigmas, a string s_noise as a TypeError of Python's)."""
    model, x, cond = setup(torch.float64)
    with pytest.raises(error, match=f"{function}: {key}"):
        getattr(kd, function)(model, x, karras_sigmas(4), extra_args={"cond": cond}, disable=True,
                              generator=torch.Generator().manual_seed(0), **{key: value})


class SeededNoise:
    """noise_sampler(sigma, sigma_next): the k-th call returns the k-th draw of a fixed seed (alike in every run)."""

    def __init__(self, like, seed=4):
        self.g, self.like = torch.Generator().manual_seed(seed), like

    def __call__(self, sigma, sigma_next):
        return torch.randn(self.like.shape, generator=self.g, dtype=self.like.dtype)


# sampler, options, noise: "sampler" (a fresh SeededNoise per run), "generator" (a fresh seeded generator) or None
EVERY_SAMPLER = {
    "euler_churn": (kd.sample_euler, {"s_churn": 1.0}, "generator"),
    "heun_churn": (kd.sample_heun, {"s_churn": 1.0}, "generator"),
    "dpm_2": (kd.sample_dpm_2, {}, None),
    "dpm_2_churn": (kd.sample_dpm_2, {"s_churn": 1.0}, "generator"),
    "euler_ancestral": (kd.sample_euler_ancestral, {}, "sampler"),
    "dpm_2_ancestral": (kd.sample_dpm_2_ancestral, {"eta": 0.7}, "sampler"),
    "dpmpp_2s_ancestral": (kd.sample_dpmpp_2s_ancestral, {}, "sampler"),
    "dpmpp_sde": (kd.sample_dpmpp_sde, {"r": 0.4}, "sampler"),
    "dpmpp_2m_sde_heun": (kd.sample_dpmpp_2m_sde, {"solver_type": "heun", "eta": 0.6}, "sampler"),
    "dpmpp_3m_sde": (kd.sample_dpmpp_3m_sde, {}, "sampler"),
    "lms": (kd.sample_lms, {}, None),
    "ipndm": (kd.sample_ipndm, {}, None),
    "res_multistep": (kd.sample_res_multistep, {}, None),
    "res_multistep_ancestral": (kd.sample_res_multistep_ancestral, {}, "generator"),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", list(EVERY_SAMPLER))
def test_the_model_gets_sigma_in_x_s_dtype(name, dtype):
    """k-diffusion passes ``sigma * s_in`` with ``s_in = x.new_ones(...)``: the sigma in x's dtype whatever the grid's
    (a half model that feeds sigma to its half layers would fail on a float32 one)."""
    sampler, options, noise = EVERY_SAMPLER[name]
    seen = []

    def model(x, sigma):
        seen.append((x.dtype, sigma.dtype, tuple(sigma.shape)))
        return x / (1 + sigma.view(-1, 1) ** 2)

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(dtype) * 10
    kwargs = dict(options, generator=torch.Generator().manual_seed(1)) if noise == "generator" else dict(options)
    sampler(model, x, karras_sigmas(3).float(), disable=True, **kwargs)
    assert seen and all(entry == (dtype, dtype, (3,)) for entry in seen), seen


@pytest.mark.parametrize("final_zero", [True, False], ids=["to_zero", "not_to_zero"])
@pytest.mark.parametrize("name", list(EVERY_SAMPLER))
def test_every_sampler_discrete_gradients_equal_autograd(name, final_zero):
    """x, a conditioning tensor of extra_args and the model's parameters, with the same noise in both runs."""
    sampler, options, noise = EVERY_SAMPLER[name]
    model, x, cond = setup(torch.float64)
    sigmas = karras_sigmas(5, final_zero=final_zero)
    leaves = [x.requires_grad_(), cond.requires_grad_()] + list(model.parameters())
    grads = {}
    for grad in ("discrete", "autograd"):
        kwargs = dict(options)
        if noise == "sampler":
            kwargs["noise_sampler"] = SeededNoise(x)
        elif noise == "generator":
            kwargs["generator"] = torch.Generator().manual_seed(9)
        out = sampler(model, x, sigmas, extra_args={"cond": cond, "scale": 0.7}, disable=True, grad=grad, **kwargs)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).square().sum()
        grads[grad] = torch.autograd.grad(loss, leaves)
    for got, want in zip(grads["discrete"], grads["autograd"]):
        assert relative_error(got, want) < 1e-8


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler_ancestral"])
def test_a_closure_models_parameters(name):
    """A denoiser that is not an nn.Module, reaching a module's parameters in a closure: grad="autograd" gives them
    the gradient of the module itself (plain autograd reaches them); grad="discrete", which cannot see them, warns
    naming the tensors, as ``adjointdeis.sample`` does for such a model."""
    sampler = {"dpmpp_2m": kd.sample_dpmpp_2m, "euler_ancestral": kd.sample_euler_ancestral}[name]
    model, x, cond = setup(torch.float64)
    sigmas = karras_sigmas(4)
    grads = []
    for denoiser in (model, lambda v, s, **kw: model(v, s, **kw)):
        torch.manual_seed(2)
        out = sampler(denoiser, x, sigmas, extra_args={"cond": cond}, disable=True, grad="autograd")
        grads.append(torch.autograd.grad((out * out).sum(), list(model.parameters()), allow_unused=True))
    for got, want in zip(grads[1], grads[0]):
        assert (got is None) == (want is None) and (want is None or relative_error(got, want) < 1e-12)
    assert any(g is not None for g in grads[0])
    with pytest.warns(UserWarning, match="grad='discrete': the model reaches"):
        out = sampler(lambda v, s, **kw: model(v, s, **kw), x.clone().requires_grad_(), sigmas,
                      extra_args={"cond": cond}, disable=True, grad="discrete")
        out.sum().backward()


@pytest.mark.parametrize("name", ["dpmpp_2m", "deis3", "heun"])
def test_discrete_warns_about_a_tensor_it_cannot_differentiate(name):
    """A module reading a tensor that requires grad from a nested extra_args entry: grad="discrete" cannot
    differentiate it and says so (as ``adjointdeis.sample`` does for a module), while grad="autograd" gives it
    the gradient of the same tensor passed at the top level of extra_args (which both modes differentiate)."""
    sampler, options, _ = SAMPLERS[name]

    class Nested(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x, sigma, c=None, cond=None):
            return self.model(x, sigma, cond=c["cond"] if c is not None else cond)
    model, x, cond = setup(torch.float64)
    nested, sigmas = Nested(model), karras_sigmas(4)
    with pytest.warns(UserWarning, match="grad='discrete': the model reaches 1 tensor"):
        sampler(nested, x.clone().requires_grad_(), sigmas, extra_args={"c": {"cond": cond.clone().requires_grad_()}},
                disable=True, grad="discrete", **options).sum().backward()
    grads = []
    for extra in (lambda c: {"c": {"cond": c}}, lambda c: {"cond": c}):
        c = cond.clone().requires_grad_()
        out = sampler(nested, x, sigmas, extra_args=extra(c), disable=True, grad="autograd", **options)
        grads.append(torch.autograd.grad((out * out).sum(), c, allow_unused=True)[0])
    assert grads[0] is not None and relative_error(*grads) < 1e-12


def test_forward_mode_ad_through_a_sampler_with_a_module():
    """torch.func.jvp through a k-diffusion sampler whose model is a Module with trainable parameters (which the
    samplers pass on as `parameters`): w . (J v) against (J^T w) . v from the exact discrete adjoint."""
    model = EDMDenoiser()
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    x, v, w = (torch.randn(SHAPE, generator=g) for _ in range(3))
    xr = x.clone().requires_grad_()
    (vjp,) = torch.autograd.grad(kd.sample_dpmpp_2m(model, xr, sigmas, disable=True, grad="discrete"), xr, w)
    tangent = torch.func.jvp(lambda x: kd.sample_dpmpp_2m(model, x, sigmas, disable=True), (x,), (v,))[1]
    torch.testing.assert_close((w * tangent).sum(), (vjp * v).sum(), rtol=1e-4, atol=1e-4)
