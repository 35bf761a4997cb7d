"""``adjointdeis.k_diffusion`` against k-diffusion's and ComfyUI's own released ``sampling.py``.

The oracles are downloaded at test time (:mod:`kdiffusion_oracle`); every shared sampler runs on the same
denoiser, the same initial state and the same noise (one seeded list of draws handed to both as their
``noise_sampler``, or the same global seed for the churn and the default noise), and must agree to 1e-10
relative in float64 on Karras and exponential grids, ending at 0 and not.
"""

import math
import sys

import numpy as np
import pytest
import torch
from kdiffusion_oracle import load_sampling
from test_k_diffusion import karras_sigmas, relative_error, setup

from adjointdeis import k_diffusion as kd

# k-diffusion's own dpmpp_sde queries its tree a rounding error past sigma_max (exp(-(-log sigma))); so do we.
pytestmark = pytest.mark.filterwarnings("ignore:Should have tb<=t1")


@pytest.fixture(scope="session")
def wheel_cache(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider (as CI runs): once per session
    return tmp_path_factory.mktemp("oracle-wheels") if cache is None else cache.mkdir("oracle-wheels")


@pytest.fixture(scope="session")
def kdiff(wheel_cache):
    return load_sampling("k-diffusion", wheel_cache)


@pytest.fixture(scope="session")
def comfy(wheel_cache):
    return load_sampling("comfyui", wheel_cache)


def exponential_sigmas(n, sigma_min=0.03, sigma_max=12.0, final_zero=True):
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if final_zero else sigmas


GRIDS = {"karras": karras_sigmas(6), "karras_no_zero": karras_sigmas(6, final_zero=False),
         "exponential": exponential_sigmas(5), "exponential_no_zero": exponential_sigmas(5, final_zero=False)}


class ListNoise:
    """A deterministic noise sampler: the k-th call returns the k-th of a seeded list of normal draws."""

    def __init__(self, like, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.draws = [torch.randn(like.shape, generator=g, dtype=like.dtype) for _ in range(64)]
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.draws[len(self.calls) - 1]


# name: (k-diffusion function name, keyword arguments, takes a noise_sampler, seeds the global RNG)
SHARED = {
    "euler": ("sample_euler", {}, False, False),
    "euler_churn": ("sample_euler", {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 5.0, "s_noise": 1.003}, False, True),
    "heun": ("sample_heun", {}, False, False),
    "heun_churn": ("sample_heun", {"s_churn": 1.5, "s_noise": 0.99}, False, True),
    "heun_churn_negative_noise": ("sample_heun", {"s_churn": 1.0, "s_noise": -1.0}, False, True),
    "dpm_2": ("sample_dpm_2", {}, False, False),
    "dpm_2_churn": ("sample_dpm_2", {"s_churn": 1.0, "s_tmax": 3.0}, False, True),
    "euler_churn_negative_noise": ("sample_euler", {"s_churn": 1.0, "s_noise": -0.5}, False, True),
    "euler_ancestral": ("sample_euler_ancestral", {}, True, False),
    "euler_ancestral_eta": ("sample_euler_ancestral", {"eta": 0.6, "s_noise": 0.9}, True, False),
    "dpm_2_ancestral": ("sample_dpm_2_ancestral", {}, True, False),
    "dpm_2_ancestral_eta0": ("sample_dpm_2_ancestral", {"eta": 0.0}, True, False),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", {}, True, False),
    "dpmpp_2s_ancestral_eta": ("sample_dpmpp_2s_ancestral", {"eta": 0.5, "s_noise": 1.1}, True, False),
    "dpmpp_sde": ("sample_dpmpp_sde", {}, True, False),
    "dpmpp_sde_r": ("sample_dpmpp_sde", {"r": 0.3, "eta": 0.7, "s_noise": 0.95}, True, False),
    "dpmpp_2m": ("sample_dpmpp_2m", {}, False, False),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {}, True, False),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5, "s_noise": 0.9}, True, False),
    "dpmpp_2m_sde_eta0": ("sample_dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, True, False),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {}, True, False),
    "dpmpp_3m_sde_eta": ("sample_dpmpp_3m_sde", {"eta": 0.4, "s_noise": 1.05}, True, False),
    "lms": ("sample_lms", {}, False, False),
    "lms2": ("sample_lms", {"order": 2}, False, False),
}
COMFY = {
    "ipndm": ("sample_ipndm", {}, False),
    "ipndm2": ("sample_ipndm", {"max_order": 2}, False),
    "res_multistep": ("sample_res_multistep", {}, True),
    "res_multistep_ancestral": ("sample_res_multistep_ancestral", {"eta": 0.8}, True),
}


def run_both(ours, theirs, options, noisy, seeded, sigmas, dtype=torch.float64):
    model, x, cond = setup(dtype)
    sigmas = sigmas.to(dtype)
    extra = {"cond": cond, "scale": 0.8}
    results, calls = [], []
    for fn in (ours, theirs):
        kwargs = dict(options)
        if noisy:
            kwargs["noise_sampler"] = ListNoise(x)
        if seeded:
            torch.manual_seed(11)
        with torch.no_grad():
            results.append(fn(model, x, sigmas, extra_args=extra, disable=True, **kwargs))
        calls.append(kwargs["noise_sampler"].calls if noisy else None)
    return results, calls


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("name", list(SHARED))
def test_matches_k_diffusion_with_the_same_noise(kdiff, name, grid):
    function, options, noisy, seeded = SHARED[name]
    (ours, theirs), (our_calls, their_calls) = run_both(getattr(kd, function), getattr(kdiff, function), options,
                                                        noisy, seeded, GRIDS[grid])
    assert relative_error(ours, theirs) < 1e-10
    assert our_calls == their_calls  # the noise sampler is called with the same arguments, in the same order


@pytest.mark.parametrize("grid", ["karras", "exponential_no_zero"])
@pytest.mark.parametrize("name", list(COMFY))
def test_matches_comfyui_with_the_same_noise(comfy, name, grid):
    function, options, noisy = COMFY[name]
    (ours, theirs), _ = run_both(getattr(kd, function), getattr(comfy, function), options, noisy, False, GRIDS[grid])
    assert relative_error(ours, theirs) < 1e-10


@pytest.mark.parametrize("name", ["dpmpp_2m", "lms", "heun_churn", "dpmpp_sde"])
def test_matches_k_diffusion_in_float32(kdiff, name):
    function, options, noisy, seeded = SHARED[name]
    (ours, theirs), _ = run_both(getattr(kd, function), getattr(kdiff, function), options, noisy, seeded,
                                 GRIDS["karras"], torch.float32)
    assert relative_error(ours, theirs) < 1e-5


def test_brownian_tree_noise_sampler_gives_k_diffusion_values(kdiff):
    _, x, _ = setup(torch.float64)
    sigmas = karras_sigmas(6)
    ours = kd.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=42)
    theirs = kdiff.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=42)
    batched = kd.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=[1, 2])
    batched_theirs = kdiff.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=[1, 2])
    numpy_seed = kd.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=np.int64(42))  # one seed, as theirs
    for s, t in zip(sigmas[:-2], sigmas[1:-1]):
        assert torch.equal(ours(s, t), theirs(s, t))
        assert torch.equal(batched(s, t), batched_theirs(s, t))
        assert torch.equal(numpy_seed(s, t), theirs(s, t))
    assert not torch.equal(ours(sigmas[0], sigmas[1]), batched(sigmas[0], sigmas[1]))


@pytest.mark.parametrize("function", ["sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
def test_same_seed_same_image_as_k_diffusion(kdiff, function):
    """k-diffusion's sampler with its Brownian tree and ours with ours, same seed; and both defaults, same global
    seed (the default tree draws its seed from torch's generator)."""
    model, x, cond = setup(torch.float64)
    sigmas = karras_sigmas(6)
    extra = {"cond": cond}
    low, high = sigmas[-2], sigmas[0]
    with torch.no_grad():
        ours = getattr(kd, function)(model, x, sigmas, extra_args=extra, disable=True,
                                     noise_sampler=kd.BrownianTreeNoiseSampler(x, low, high, seed=7))
        theirs = getattr(kdiff, function)(model, x, sigmas, extra_args=extra, disable=True,
                                          noise_sampler=kdiff.BrownianTreeNoiseSampler(x, low, high, seed=7))
        torch.manual_seed(5)
        ours_default = getattr(kd, function)(model, x, sigmas, extra_args=extra, disable=True)
        torch.manual_seed(5)
        theirs_default = getattr(kdiff, function)(model, x, sigmas, extra_args=extra, disable=True)
    assert relative_error(ours, theirs) < 1e-10
    assert relative_error(ours_default, theirs_default) < 1e-10
    assert relative_error(ours, ours_default) > 1e-3


def test_accepts_k_diffusions_own_noise_sampler(kdiff):
    model, x, cond = setup(torch.float64)
    sigmas = karras_sigmas(5)
    with torch.no_grad():
        ours = kd.sample_dpmpp_sde(model, x, sigmas, extra_args={"cond": cond}, disable=True,
                                   noise_sampler=kdiff.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=3))
        theirs = kdiff.sample_dpmpp_sde(model, x, sigmas, extra_args={"cond": cond}, disable=True,
                                        noise_sampler=kdiff.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=3))
    assert relative_error(ours, theirs) < 1e-10


@pytest.mark.parametrize("name", ["heun_churn", "dpm_2", "euler_ancestral", "dpmpp_sde"])
def test_callback_matches_k_diffusion(kdiff, name):
    function, options, noisy, seeded = SHARED[name]
    model, x, cond = setup(torch.float64)
    sigmas = karras_sigmas(5)
    seen = {}
    for who, fn in (("ours", getattr(kd, function)), ("theirs", getattr(kdiff, function))):
        infos, kwargs = [], dict(options)
        if noisy:
            kwargs["noise_sampler"] = ListNoise(x)
        torch.manual_seed(2)
        with torch.no_grad():
            fn(model, x, sigmas, extra_args={"cond": cond}, callback=infos.append, disable=True, **kwargs)
        seen[who] = infos
    assert [i["i"] for i in seen["ours"]] == [i["i"] for i in seen["theirs"]] == list(range(5))
    for ours, theirs in zip(seen["ours"], seen["theirs"]):
        assert set(ours) == set(theirs)
        assert float(ours["sigma"]) == float(theirs["sigma"])
        assert math.isclose(float(ours["sigma_hat"]), float(theirs["sigma_hat"]), rel_tol=1e-14)
        assert relative_error(ours["x"], theirs["x"]) < 1e-10
        assert relative_error(ours["denoised"], theirs["denoised"]) < 1e-10



class NestedCond(torch.nn.Module):
    """A denoiser reading its conditioning tensor from a nested extra_args entry (``{"c": {"cond": tensor}}``,
    as UIs pass theirs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, sigma, c):
        return self.model(x, sigma, cond=c["cond"])


@pytest.mark.parametrize("function", ["sample_dpmpp_2m", "sample_heun", "sample_euler_ancestral"])
def test_autograd_reaches_a_nested_extra_args_tensor_as_through_k_diffusion(kdiff, function):
    """grad="autograd" is plain autograd: a tensor the model reaches inside a nested extra_args entry gets the
    gradient that autograd through k-diffusion's own sampler (its no_grad decorator unwrapped) gives it."""
    model, x, cond = setup(torch.float64)
    sigmas = karras_sigmas(4)
    grads = []
    for run in (lambda *a, **k: getattr(kd, function)(*a, grad="autograd", **k),
                getattr(kdiff, function).__wrapped__):
        c = cond.clone().requires_grad_()
        torch.manual_seed(3)
        out = run(NestedCond(model), x, sigmas, extra_args={"c": {"cond": c}}, disable=True)
        (grad,) = torch.autograd.grad((out * out).sum(), c, allow_unused=True)
        grads.append(grad)
    assert grads[1] is not None and grads[0] is not None
    assert relative_error(*grads) < 1e-10


class BatchNormDenoiser(torch.nn.Module):
    """A denoiser with a train-mode BatchNorm (running statistics move at every call) and a call counter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1).double()
        self.norm = torch.nn.BatchNorm2d(2).double()
        self.calls = 0

    def forward(self, x, sigma):
        self.calls += 1
        c = 1 / (1 + sigma[:, None, None, None] ** 2)
        return c * x + 0.1 * self.norm(self.conv(c * x))


@pytest.mark.parametrize("function", ["sample_dpmpp_2m", "sample_heun", "sample_euler_ancestral"])
def test_discrete_reverse_pass_leaves_the_users_module_as_k_diffusion_does(kdiff, function):
    """grad="discrete" re-runs the model in its reverse pass; those re-runs must not touch the user's module: its
    BatchNorm running statistics and attributes end as after autograd through k-diffusion's own sampler (one
    forward call per model evaluation), with the same gradients."""
    _, x, _ = setup(torch.float64)
    sigmas = karras_sigmas(4)
    runs = []
    for run in (lambda *a, **k: getattr(kd, function)(*a, grad="discrete", **k), getattr(kdiff, function).__wrapped__):
        model, xr = BatchNormDenoiser().train(), x.clone().requires_grad_()
        torch.manual_seed(3)
        out = run(model, xr, sigmas, disable=True)
        out.square().sum().backward()
        runs.append((model.norm.running_mean, model.norm.running_var, model.norm.num_batches_tracked, model.calls,
                     xr.grad, model.conv.weight.grad))
    (mean, var, batches, calls, grad_x, grad_w), (mean_k, var_k, batches_k, calls_k, grad_x_k, grad_w_k) = runs
    assert (int(batches), calls) == (int(batches_k), calls_k)
    assert relative_error(mean, mean_k) < 1e-12 and relative_error(var, var_k) < 1e-12
    assert relative_error(grad_x, grad_x_k) < 1e-10 and relative_error(grad_w, grad_w_k) < 1e-10

@pytest.mark.parametrize("function", ["sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral"])
def test_default_noise_with_the_same_global_seed(kdiff, function):
    model, x, cond = setup(torch.float64)
    sigmas = GRIDS["exponential"]
    results = []
    for fn in (getattr(kd, function), getattr(kdiff, function)):
        torch.manual_seed(3)
        with torch.no_grad():
            results.append(fn(model, x, sigmas, extra_args={"cond": cond}, disable=True))
    assert relative_error(*results) < 1e-10


def test_brownian_tree_without_torchsde_names_the_extra(monkeypatch):
    _, x, _ = setup(torch.float64)
    monkeypatch.setitem(sys.modules, "torchsde", None)
    with pytest.raises(ImportError, match=r"adjointdeis\[k-diffusion\]"):
        kd.BrownianTreeNoiseSampler(x, 0.1, 10.0)
    model, _, cond = setup(torch.float64)
    with pytest.raises(ImportError, match="torchsde"):
        kd.sample_dpmpp_sde(model, x, karras_sigmas(3), extra_args={"cond": cond}, disable=True)
    with torch.no_grad():  # generator= needs no torchsde
        out = kd.sample_dpmpp_sde(model, x, karras_sigmas(3), extra_args={"cond": cond}, disable=True,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("function", ["sample_euler", "sample_heun"])
@pytest.mark.parametrize("window", [{"s_tmin": 0.7}, {"s_tmax": 0.1}])
def test_churn_window_compares_float32_sigmas_as_k_diffusion(kdiff, function, window):
    """k-diffusion tests s_tmin <= sigma <= s_tmax on the float32 sigma, where 0.7 equals float32(0.7): the level
    the user typed churns (in float64 0.7 > float32(0.7) and it would not)."""
    model, x, cond = setup(torch.float32)
    sigmas = torch.tensor([10.0, 2.0, 0.7, 0.1, 0.0])
    seen, results = {}, []
    for who, fn in (("ours", getattr(kd, function)), ("theirs", getattr(kdiff, function))):
        infos = []
        torch.manual_seed(4)
        with torch.no_grad():
            results.append(fn(model, x, sigmas, extra_args={"cond": cond}, callback=infos.append, disable=True,
                              s_churn=2.0, **window))
        seen[who] = [float(i["sigma_hat"]) for i in infos]
    assert seen["ours"] == pytest.approx(seen["theirs"], rel=1e-6) and seen["ours"] != sigmas[:-1].tolist()
    assert relative_error(*results) < 1e-5


@pytest.mark.parametrize("function,options", [("sample_euler_ancestral", {}), ("sample_euler", {"s_churn": 1.0})])
def test_default_noise_of_a_channels_last_x_is_k_diffusion_s(kdiff, function, options):
    """k-diffusion draws randn_like(x), in x's memory order: a channels_last x gets its values at each index."""
    model, x, cond = setup(torch.float64)
    x = x.reshape(x.shape[0], -1, 1, 1).expand(-1, -1, 2, 3).contiguous(memory_format=torch.channels_last) \
        if x.dim() != 4 else x.contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    results = []
    for fn in (getattr(kd, function), getattr(kdiff, function)):
        torch.manual_seed(6)
        with torch.no_grad():
            results.append(fn(lambda v, s, **kw: v / (1 + s[:, None, None, None] ** 2), x, GRIDS["exponential"],
                              disable=True, **options))
    assert relative_error(*results) < 1e-10


@pytest.mark.parametrize("function", ["sample_euler_ancestral", "sample_dpmpp_2m_sde"])
def test_channels_last_noise_is_never_recycled_as_a_step_buffer(kdiff, function):
    """A channels_last x large enough for the CPU loop to recycle its buffers draws channels_last noise; the loop
    must not hand such a tensor out later as a (contiguous) step output, in this call or the next: each of three
    calls gives k-diffusion's sample with the same global seed, and so does a plain sample call after them."""
    from adjointdeis import planning
    x = (torch.randn(4, 8, 32, 32, generator=torch.Generator().manual_seed(1)) * 10).contiguous(
        memory_format=torch.channels_last)
    assert x.numel() * x.element_size() >= planning.RECYCLE_BYTES and not x.is_contiguous()

    def denoiser(v, s, **kw):
        return v / (1 + s[:, None, None, None] ** 2)
    sigmas = GRIDS["exponential"].to(torch.float32)
    for _ in range(3):
        results = []
        for fn in (getattr(kd, function), getattr(kdiff, function)):
            torch.manual_seed(6)
            with torch.no_grad():
                results.append(fn(denoiser, x, sigmas, disable=True))
        assert relative_error(*results) < 1e-5
    with torch.no_grad():
        runs = [kd.sample_dpmpp_2m(denoiser, x.contiguous(), sigmas, disable=True) for _ in range(2)]
    assert torch.equal(*runs)
