"""Dynamic thresholding (docs/math.md section 2.1): diffusers' ``_threshold_sample`` bit for bit, gradients, compile.

The oracle is diffusers' own ``_threshold_sample`` (DPMSolverMultistepScheduler's, shared by DDPM, DDIM, DEIS
and UniPC); a thresholded ``sample`` run is compared with DPMSolverMultistepScheduler's thresholded loop, and
its gradients (``grad="discrete"``) with plain autograd through the same run.
"""

import pytest
import torch

import adjointdeis as ad
from adjointdeis.thresholding import DynamicThreshold, dynamic_threshold
from gaussian import GaussianEps, per_dimension

diffusers = pytest.importorskip("diffusers")
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]


def reference(x0, ratio, max_value):
    scheduler = diffusers.DPMSolverMultistepScheduler(thresholding=True, dynamic_thresholding_ratio=ratio,
                                                      sample_max_value=max_value)
    return scheduler._threshold_sample(x0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (4, 3, 5, 7), (2, 1, 1, 1)])
def test_bit_exact_against_diffusers(dtype, shape):
    for seed in range(4):
        x0 = (3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)
        for ratio in (0.0, 0.3333, 0.87, 0.995, 1.0):
            for max_value in (0.5, 1.0, 1.7, 10.0):
                got, want = dynamic_threshold(x0, ratio, max_value), reference(x0, ratio, max_value)
                assert got.dtype == dtype and torch.equal(got, want), (seed, ratio, max_value)


def test_non_contiguous_input():
    x0 = 3 * torch.randn(3, 8, 8, 4, dtype=torch.float64).permute(3, 0, 1, 2)
    assert torch.equal(dynamic_threshold(x0, 0.9, 2.0), reference(x0.contiguous(), 0.9, 2.0))


def test_samples_without_elements_run_as_without_a_threshold():
    sched, threshold = ad.VPSchedule.linear(), DynamicThreshold(0.9, 1.5)
    for shape in ((2, 0), (0, 3)):
        x_T = torch.randn(shape)
        got = ad.sample(lambda x, t: x * 0, x_T, sched, steps=3, threshold=threshold)
        assert got.shape == shape and torch.equal(got, ad.sample(lambda x, t: x * 0, x_T, sched, steps=3))


@pytest.mark.parametrize("ratio,max_value", [(0.9, 3.0), (0.9, 0.5), (0.5, 1.5), (1.0, 4.0)])
def test_gradients(ratio, max_value):
    """gradcheck in float64 (the threshold between 1 and max_value: the quantile's two order statistics get
    gradients; max_value <= 1: a constant threshold), and equality with autograd through diffusers' own."""
    x0 = (2 * torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: dynamic_threshold(v, ratio, max_value), (x0,))
    g = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ours = torch.autograd.grad(dynamic_threshold(x0, ratio, max_value), x0, g)[0]
    theirs = torch.autograd.grad(reference(x0, ratio, max_value), x0, g)[0]
    assert torch.equal(ours, theirs)


def test_compiles_to_one_graph():
    x0 = 2 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(lambda v: dynamic_threshold(v, 0.995, 1.5), fullgraph=True)
    torch.testing.assert_close(compiled(x0), dynamic_threshold(x0, 0.995, 1.5), rtol=0, atol=1e-6)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        DynamicThreshold(ratio=1.2)
    with pytest.raises(ValueError, match="sample_max_value"):
        DynamicThreshold(max_value=0.0)


def test_settings_given_as_tensors_are_stored_as_the_floats_validated():
    """DynamicThreshold is frozen (shared across threads): a tensor setting must not stay the caller's tensor,
    whose later change would bypass the validation and change the threshold of every run using it."""
    ratio, max_value = torch.tensor(0.9, dtype=torch.float64), torch.tensor(2.5, dtype=torch.float64)
    threshold = DynamicThreshold(ratio, max_value)
    ratio.fill_(5.0)
    max_value.fill_(-1.0)
    assert type(threshold.ratio) is float and type(threshold.max_value) is float
    x0 = 3 * torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert torch.equal(threshold(x0), reference(x0, 0.9, 2.5))
    assert DynamicThreshold(torch.tensor(0.5), 2.0) == DynamicThreshold(0.5, 2.0)


def test_thresholded_sample_matches_dpmsolver_and_its_gradient_is_exact():
    """ad.sample(threshold=) on the discrete schedule with DPMSolverMultistep's N timesteps (diffusers' convention)
    equals its thresholded loop; grad="discrete" equals autograd through the same run; grad="adjoint" refuses."""
    theirs = diffusers.DPMSolverMultistepScheduler(thresholding=True, dynamic_thresholding_ratio=0.9,
                                                   sample_max_value=1.2, solver_order=2)
    theirs.set_timesteps(8)
    sched = ad.VPSchedule.from_alphas_cumprod(theirs.alphas_cumprod)
    model = GaussianEps(sched, *per_dimension(4))
    model.mu.data *= 3  # an x0 far enough out that the threshold bites
    x_T = torch.randn(4, 2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    threshold = DynamicThreshold(0.9, 1.2)
    with torch.no_grad():
        got = ad.sample(model, x_T, sched, steps=8, timesteps=theirs.timesteps, threshold=threshold)
        x = x_T.float()
        for t in theirs.timesteps:
            x = theirs.step(model(x.double(), t.expand(4)).float(), t, x).prev_sample
    assert ((got - x.double()).norm() / x.double().norm()).item() < 1e-5
    unthresholded = ad.sample(model, x_T, sched, steps=8, timesteps=theirs.timesteps)
    assert not torch.allclose(got, unthresholded)
    grads = {}
    for grad in ("discrete", "autograd"):
        leaf = x_T.clone().requires_grad_()
        out = ad.sample(model, leaf, sched, steps=8, timesteps=theirs.timesteps, threshold=threshold, grad=grad)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        grads[grad] = torch.autograd.grad((out * weights).square().sum(), [leaf, model.mu])
    for d, a in zip(grads["discrete"], grads["autograd"]):
        assert ((d - a).norm() / a.norm()).item() < 1e-10
    with pytest.raises(ValueError, match="thresholded"):
        ad.sample(model, x_T.requires_grad_(), sched, timesteps=theirs.timesteps.double(), threshold=threshold,
                  grad="adjoint")


def test_thresholded_sample_compiles_to_one_graph():
    sched = ad.VPSchedule.linear()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(9, 16), torch.nn.SiLU(), torch.nn.Linear(16, 8))
    model = lambda x, t: net(torch.cat([x, t[:, None]], 1))  # noqa: E731
    x_T = 3 * torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def run(x):
        return ad.sample(model, x, sched, steps=5, threshold=DynamicThreshold(0.8, 1.5))

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(run, fullgraph=True)(x_T), run(x_T), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_thresholded_cuda_loop_never_syncs():
    """A thresholded scheduler loop on CUDA under sync debug mode "error" (the quantile's ranks are host integers)."""
    from adjointdeis.diffusers import FusedMultistepScheduler

    scheduler = FusedMultistepScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    scheduler.set_timesteps(10, device="cuda")
    scheduler.set_begin_index(0)
    x = 2 * torch.randn(2, 4, 16, 16, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in scheduler.timesteps:
            x = scheduler.step(0.9 * x, t, x).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.cpu()).all()
