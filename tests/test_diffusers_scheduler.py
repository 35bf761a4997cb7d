"""``FusedMultistepScheduler`` as a diffusers scheduler: diffusers' own scheduler checks, parity, a pipeline, gradients.

- The contract: the equivalents of diffusers' ``SchedulerCommonTest`` and of its DPM-Solver / DEIS
  scheduler tests (save/load round trip, step shapes and dtypes, ``from_config`` both ways, full-loop
  determinism and reference values, timestep variants, ``add_noise``, begin index, step bookkeeping).
  diffusers' own checks step at timesteps that are not in the schedule (0, 1, ...); this scheduler
  rejects those, so its checks step along ``scheduler.timesteps``.
- Parity: the same denoising loop (a deterministic nonlinear fake model, the pipeline's calling
  convention) with our scheduler and with ``DPMSolverMultistepScheduler`` / ``DEISMultistepScheduler``
  built from the same config; every state agrees to 1e-5 relative to its norm (docs/math.md section 4).
  DEIS order 3 is compared with diffusers' DEIS run in float64, since its float32 coefficients alone
  are off by 2e-5 (see tests/test_diffusers_parity.py).
- A ``DDPMPipeline`` with a small random ``UNet2DModel`` gives the same images with our scheduler as
  with diffusers' schedulers.
- Gradients through ``step``: gradcheck in float64, and autograd through diffusers' (plain torch)
  scheduler as a second implementation.
"""

import contextlib
import functools
import importlib
import inspect
import sys
import tempfile
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the integration needs diffusers: pip install adjointdeis[diffusers]")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)

from adjointdeis.diffusers import (FusedDEISMultistepScheduler, FusedDPMSolverMultistepScheduler,  # noqa: E402
                                   FusedMultistepScheduler)

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]

SHAPE = (2, 3, 8, 8)
RTOL = 1e-5
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
SPACINGS = [("linspace", 0), ("leading", 1), ("trailing", 0)]
STEPS = [8, 20]
FINALS = ["zero", "sigma_min"]


def fake_model(x, t):
    """A smooth nonlinear model output for x (batch, ...) at integer timestep t (tau = t / 1000 in [0, 1)).

    Read as eps it is 0.9 x at pure noise, so x0-hat stays moderate; the sine is the nonlinearity.
    """
    tau = torch.as_tensor(t, dtype=torch.float64) / 1000
    xd = x.to(torch.float64)
    return ((0.5 + 0.4 * tau) * xd + 0.3 * (1 - tau) * torch.sin(2 * xd + 3 * tau)).to(x.dtype)


def initial_noise(dtype=torch.float32, seed=0, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def loop(scheduler, x_T, begin=0, noises=None, generator=None, model=fake_model):
    """A pipeline's denoising loop after ``set_timesteps``; every state it visits and its result, in float64.

    Args:
        begin: start at ``timesteps[begin]`` after ``set_begin_index(begin)`` (img2img).
        noises: the SDE noise of each step, passed as ``variance_noise``; generator: or drawn from it.
    """
    if begin:
        scheduler.set_begin_index(begin)
    x, states = x_T, []
    for i, t in enumerate(scheduler.timesteps[begin:]):
        states.append(x.to(torch.float64))
        extra = {}
        if noises is not None:
            extra["variance_noise"] = noises[i]
        if generator is not None:
            extra["generator"] = generator
        x = scheduler.step(model(x, t), t, x, **extra).prev_sample
    return states + [x.to(torch.float64)]


def assert_same_states(ours, theirs, rtol=RTOL):
    """Every state to `rtol` relative to its norm.

    Where diffusers' last step is the zero-length one of a karras/exponential/beta/log-SNR grid ending at
    sigma_min, its third-order update divides by h^2 = 0 and returns NaN; ours is the identity there.
    """
    assert len(ours) == len(theirs), f"{len(ours) - 1} steps against diffusers' {len(theirs) - 1}"
    if not torch.isfinite(theirs[-1]).all() and torch.equal(ours[-1], ours[-2]):
        ours, theirs = ours[:-1], theirs[:-1]
    for i, (got, want) in enumerate(zip(ours, theirs)):
        error = ((got - want).norm() / want.norm()).item()
        assert error <= rtol, f"state {i} of {len(theirs) - 1}: relative error {error:.3e} > {rtol:g}"


def compare_with(theirs, steps, dtype=torch.float32, ours=None, **our_kwargs):
    """Runs ``theirs`` and ``FusedMultistepScheduler.from_config(theirs.config)`` over the same loop."""
    ours = ours or FusedMultistepScheduler.from_config(theirs.config, **our_kwargs)
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    x_T = initial_noise(dtype)
    assert_same_states(loop(ours, x_T), loop(theirs, x_T.float()))
    return ours


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("final", FINALS)
@pytest.mark.parametrize("spacing,steps_offset", SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("solver,order", [("ddim", 1), ("dpmpp", 1), ("dpmpp", 2), ("dpmpp", 3)])
def test_matches_dpmsolver(solver, order, prediction, spacing, steps_offset, final, steps):
    theirs = DPMSolverMultistepScheduler(solver_order=order, prediction_type=prediction, timestep_spacing=spacing,
                                         steps_offset=steps_offset, final_sigmas_type=final)
    ours = compare_with(theirs, steps, solver=solver)
    assert torch.equal(ours.sigmas, theirs.sigmas)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("order", [2, 3])
def test_matches_dpmsolver_in_float64(order, prediction):
    """A float64 sample runs our step in float64; diffusers computes in float32 whatever the input."""
    compare_with(DPMSolverMultistepScheduler(solver_order=order, prediction_type=prediction), 20, dtype=torch.float64)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("final", FINALS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_matches_dpmsolver_flow(order, shift, final, steps):
    theirs = DPMSolverMultistepScheduler(solver_order=order, prediction_type="flow_prediction", use_flow_sigmas=True,
                                         flow_shift=shift, final_sigmas_type=final)
    compare_with(theirs, steps)


@pytest.mark.parametrize("noise_source", ["generator", "variance_noise"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("final", FINALS)
@pytest.mark.parametrize("prediction", PREDICTIONS + ["flow_prediction"])
@pytest.mark.parametrize("order", [1, 2])
def test_matches_sde_dpmsolver(order, prediction, final, steps, noise_source):
    """Same noise: the same seeded generator (both draw float32 normals once per step), or explicit draws."""
    flow = prediction == "flow_prediction"
    config = dict(solver_order=order, algorithm_type="sde-dpmsolver++", prediction_type=prediction,
                  use_flow_sigmas=flow, flow_shift=3.0 if flow else 1.0, final_sigmas_type=final)
    runs = []
    for scheduler in (FusedMultistepScheduler(**config), DPMSolverMultistepScheduler(**config)):
        scheduler.set_timesteps(steps)
        if noise_source == "generator":
            runs.append(loop(scheduler, initial_noise(), generator=torch.Generator().manual_seed(7)))
        else:
            draws = torch.Generator().manual_seed(7)
            noises = [torch.randn(SHAPE, generator=draws) for _ in range(steps)]
            runs.append(loop(scheduler, initial_noise(), noises=noises))
    assert_same_states(*runs)


@pytest.mark.parametrize("config,steps", [
    (dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), 8),  # its last step is zero-length
    (dict(timestep_spacing="linspace"), 1000),  # a repeated timestep mid-grid
    (dict(algorithm_type="sde-dpmsolver", use_karras_sigmas=True, final_sigmas_type="sigma_min"), 8),
], ids=["karras_sigma_min", "linspace_1000", "sde_dpmsolver_karras"])
def test_sde_draws_on_zero_length_steps_as_diffusers(config, steps):
    """diffusers' SDE step draws its noise on every step, a zero-length one too: the same generator then gives the
    same later states (a zero-length step mid-grid) and leaves the generator where diffusers leaves it."""
    config = dict(dict(algorithm_type="sde-dpmsolver++", solver_order=1), **config)
    runs, states = [], []
    for scheduler in (FusedMultistepScheduler(**config), DPMSolverMultistepScheduler(**config)):
        scheduler.set_timesteps(steps)
        generator = torch.Generator().manual_seed(7)
        runs.append(loop(scheduler, initial_noise(), generator=generator))
        states.append(generator.get_state())
    assert torch.equal(*states)
    assert_same_states(runs[0][-1:], runs[1][-1:], rtol=1e-4)  # 1000 float32 steps


def upcast_deis(scheduler):
    """Makes DEISMultistepScheduler compute in float64 (same algorithm and sigma values; see module docstring)."""
    scheduler.sigmas = scheduler.sigmas.to(torch.float64)
    return scheduler


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing,steps_offset", SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("order,precision", [(1, torch.float32), (2, torch.float32), (3, torch.float64)])
def test_matches_deis(order, precision, prediction, spacing, steps_offset, steps):
    theirs = DEISMultistepScheduler(solver_order=order, prediction_type=prediction, timestep_spacing=spacing,
                                    steps_offset=steps_offset, algorithm_type="deis")
    ours = FusedMultistepScheduler.from_config(theirs.config)
    assert (ours.config.solver, ours.config.final_sigmas_type) == ("deis", "sigma_min")
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    if precision == torch.float64:
        upcast_deis(theirs)
    x_T = initial_noise(precision)
    assert_same_states(loop(ours, x_T), loop(theirs, x_T))


SIGMA_SPACINGS = ["use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas", "use_beta_sigmas"]


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("final", FINALS)
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("key", SIGMA_SPACINGS)
def test_matches_dpmsolver_sigma_spacings(key, order, final, steps):
    """Karras / exponential / log-SNR / beta noise levels; ending at sigma_min their last step is the identity."""
    pytest.importorskip("scipy")
    theirs = DPMSolverMultistepScheduler(solver_order=order, final_sigmas_type=final, **{key: True})
    compare_with(theirs, steps)


@pytest.mark.parametrize("config", [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2", solver_order=3),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing="trailing"),
    dict(trained_betas=np.linspace(1e-4, 0.03, 500).tolist(), num_train_timesteps=500),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(final_sigmas_type="sigma_min", euler_at_final=True, lower_order_final=False),
    dict(solver_order=3, final_sigmas_type="sigma_min", use_karras_sigmas=True, lower_order_final=False),
    dict(variance_type="learned_range"),
], ids=["scaled_linear", "cosine", "lambda_min_clipped", "trained_betas", "zero_snr", "euler_at_final",
        "karras_order3", "learned_variance"])
def test_matches_dpmsolver_config_options(config):
    theirs = DPMSolverMultistepScheduler(**config)
    model = fake_model
    if config.get("variance_type"):
        def model(x, t):
            return torch.cat([fake_model(x, t), torch.full_like(x, 5.0)], dim=1)
    for steps in (10, 25):
        ours = FusedMultistepScheduler.from_config(theirs.config)
        theirs.set_timesteps(steps)
        ours.set_timesteps(steps)
        x_T = initial_noise()
        assert_same_states(loop(ours, x_T, model=model), loop(theirs, x_T, model=model))


@pytest.mark.parametrize("steps", [1, 2, 3, 14, 15])
@pytest.mark.parametrize("final", FINALS)
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("order", [2, 3])
def test_order_schedule_matches_dpmsolver(order, lower_order_final, final, steps):
    """Warm-up and lowered final orders at the edges: 1-3 steps, and 14/15 around diffusers' threshold."""
    compare_with(DPMSolverMultistepScheduler(solver_order=order, lower_order_final=lower_order_final,
                                             final_sigmas_type=final), steps)


@pytest.mark.parametrize("steps", [1, 2, 3, 14, 15])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_order_schedule_matches_deis(lower_order_final, steps):
    theirs = DEISMultistepScheduler(solver_order=3, lower_order_final=lower_order_final)
    ours = FusedMultistepScheduler.from_config(theirs.config, solver="deis")
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    x_T = initial_noise(torch.float64)
    assert_same_states(loop(ours, x_T), loop(upcast_deis(theirs), x_T))


def test_deis_configs_select_deis():
    """A saved DEIS config (its _class_name) and an in-memory one (whose algorithm_type diffusers' from_config
    would hide as a default value) both give the DEIS family."""
    with tempfile.TemporaryDirectory() as directory:
        DEISMultistepScheduler().save_pretrained(directory)
        saved = FusedMultistepScheduler.from_pretrained(directory)
    in_memory = FusedMultistepScheduler.from_config(DEISMultistepScheduler().config)
    for ours in (saved, in_memory):
        assert (ours.config.family, ours.config.solver, ours.config.final_sigmas_type) == ("deis", "deis", "sigma_min")


@pytest.mark.parametrize("source", [
    lambda: DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_small_log", clip_sample=True),
    lambda: DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"),
    lambda: DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    lambda: PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                          steps_offset=1, timestep_spacing="leading"),
    lambda: UniPCMultistepScheduler(solver_order=3, prediction_type="sample"),
    lambda: UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    lambda: EulerDiscreteScheduler(use_karras_sigmas=True, prediction_type="v_prediction"),
], ids=["ddpm", "ddim_sd", "ddim_zero_snr", "pndm", "unipc", "unipc_flow", "euler_karras"])
def test_from_other_scheduler_configs(source):
    """A pipeline's scheduler config read by both: ours gives DPMSolverMultistepScheduler's loop."""
    config = source().config
    compare_with(DPMSolverMultistepScheduler.from_config(config), 12,
                 ours=FusedMultistepScheduler.from_config(config))


@pytest.mark.parametrize("config", [
    dict(),
    dict(solver_order=3, prediction_type="v_prediction", timestep_spacing="trailing", final_sigmas_type="sigma_min"),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=2.0),
    dict(solver="deis", solver_order=3),
])
def test_theirs_from_our_config(config):
    """diffusers' schedulers built from our config run the same sampler (DEIS for a DEIS config)."""
    ours = FusedMultistepScheduler(**config)
    theirs_class = DEISMultistepScheduler if ours.config.solver == "deis" else DPMSolverMultistepScheduler
    theirs = theirs_class.from_config(ours.config)
    ours.set_timesteps(12)
    theirs.set_timesteps(12)
    precision = torch.float64 if ours.config.solver == "deis" else torch.float32
    if precision == torch.float64:
        upcast_deis(theirs)
    x_T = initial_noise(precision)
    assert_same_states(loop(ours, x_T), loop(theirs, x_T))


@functools.lru_cache(maxsize=1)
def compatible_classes():
    usable = []
    for cls in FusedMultistepScheduler().compatibles:
        try:
            cls()
        except ImportError:
            continue
        usable.append(cls)
    return tuple(usable)


def test_compatibles_round_trip():
    """Every compatible diffusers scheduler loads our config, and its config loads back to ours unchanged."""
    names = {cls.__name__ for cls in compatible_classes()}
    assert {"DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
            "DEISMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler"} <= names
    for config in (dict(), dict(solver="deis", solver_order=3, prediction_type="sample"),
                   dict(algorithm_type="sde-dpmsolver++", timestep_spacing="trailing")):
        ours = FusedMultistepScheduler(**config)
        for cls in compatible_classes():
            if cls is DEISMultistepScheduler and ours.config.algorithm_type == "sde-dpmsolver++":
                continue
            through = cls.from_config(ours.config).config
            back = FusedMultistepScheduler.from_config(through)
            if cls is DEISMultistepScheduler:
                # DEIS stores algorithm_type "deis": its config is a DEIS one; read as DPM-Solver it is ours again.
                assert back.config.family == "deis"
                back = (FusedDEISMultistepScheduler if ours.config.family == "deis"
                        else FusedDPMSolverMultistepScheduler).from_config(through, solver=ours.config.solver)
            kept = {k: v for k, v in back.config.items() if k in ours.config and not k.startswith("_")}
            assert kept == {k: v for k, v in ours.config.items() if not k.startswith("_")}, cls.__name__
            init_keys = inspect.signature(FusedMultistepScheduler.__init__).parameters
            assert not {k for k in back.config if k not in ours.config} & set(init_keys), cls.__name__


def test_switch_through_diffusers_schedulers():
    """As diffusers' test_switch: a config passed through other schedulers samples the same."""
    ours = FusedMultistepScheduler(lower_order_final=False)
    ours.set_timesteps(10)
    reference = loop(ours, initial_noise())[-1]
    config = ours.config
    for cls in (DPMSolverSinglestepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler,
                DPMSolverMultistepScheduler, FusedMultistepScheduler):
        config = cls.from_config(config).config
    switched = FusedMultistepScheduler.from_config(config)
    switched.set_timesteps(10)
    assert torch.equal(loop(switched, initial_noise())[-1], reference)


def dummy_sample_deter():
    """diffusers' deterministic test sample: (4, 3, 8, 8), arange / numel in a permuted layout."""
    sample = torch.arange(4 * 3 * 8 * 8).reshape(3, 8, 8, 4) / (4 * 3 * 8 * 8)
    return sample.permute(3, 0, 1, 2)


def dummy_model(sample, t):
    """diffusers' scheduler-test model: ``sample * t / (t + 1)``."""
    t = torch.as_tensor(t).reshape(-1, *(1,) * (sample.dim() - 1)).to(sample.dtype)
    return sample * t / (t + 1)


@pytest.mark.parametrize("prediction,expected", [("epsilon", 0.24090), ("v_prediction", 0.09852)])
def test_full_loop_reference_values(prediction, expected):
    """diffusers' DPM-Solver full-loop checks: mean |sample| after 10 steps of its dummy model.

    The expected means are DPMSolverMultistepScheduler's with diffusers 0.42.1 (its test file's 0.3301
    and 0.2251 belong to another release); they are checked against the installed one too.
    """
    means = []
    for cls in (FusedMultistepScheduler, DPMSolverMultistepScheduler):
        scheduler = cls(prediction_type=prediction, lower_order_final=False)
        scheduler.set_timesteps(10)
        means.append(loop(scheduler, dummy_sample_deter(), model=dummy_model)[-1].abs().mean().item())
    assert abs(means[0] - expected) < 1e-5
    assert abs(means[0] - means[1]) < 1e-6


@pytest.mark.parametrize("config", [dict(), dict(algorithm_type="sde-dpmsolver++"), dict(solver="deis")])
def test_full_loop_is_deterministic(config):
    results = []
    for _ in range(2):
        scheduler = FusedMultistepScheduler(**config)
        scheduler.set_timesteps(15)
        results.append(loop(scheduler, initial_noise(), generator=torch.Generator().manual_seed(3))[-1])
    assert torch.equal(*results)


@pytest.mark.parametrize("config", [
    dict(num_train_timesteps=25),
    dict(num_train_timesteps=999, prediction_type="v_prediction", solver_order=3),
    dict(solver="deis", solver_order=3, prediction_type="sample", lower_order_final=False),
    dict(solver="ddim", timestep_spacing="leading", steps_offset=1),
    dict(algorithm_type="sde-dpmsolver++", solver_order=1),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
])
def test_save_load_round_trip(config):
    """save_pretrained / from_pretrained: the same config (diffusers' test_from_pretrained) and the same outputs."""
    scheduler = FusedMultistepScheduler(**config)
    with tempfile.TemporaryDirectory() as directory:
        scheduler.save_pretrained(directory)
        loaded = FusedMultistepScheduler.from_pretrained(directory)
    saved = dict(scheduler.config)
    del saved["_use_default_values"]
    assert saved == dict(loaded.config)
    outputs = []
    for s in (scheduler, loaded):
        s.set_timesteps(10)
        outputs.append(loop(s, initial_noise(), generator=torch.Generator().manual_seed(0))[-1])
    assert torch.equal(*outputs)


@pytest.mark.filterwarnings("ignore:It is deprecated to pass a pretrained model name or path:FutureWarning")
@pytest.mark.parametrize("theirs", [FlowMatchHeunDiscreteScheduler(shift=3.0), DEISMultistepScheduler(solver_order=3),
                                    FlowMatchEulerDiscreteScheduler(shift=2.0)], ids=lambda s: type(s).__name__)
def test_from_config_of_a_saved_directory_reads_its_class(theirs):
    """``from_config(path)``, diffusers' deprecated form of ``from_pretrained``, gives what ``from_pretrained`` gives:
    the family of the saved ``_class_name`` (a FlowMatchHeun config, only num_train_timesteps and shift, was read as
    FlowMatchEuler's) and the saved scheduler's samples."""
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory)
        loaded = [FusedMultistepScheduler.from_config(directory),
                  FusedMultistepScheduler.from_config(pretrained_model_name_or_path=directory)]
        expected = FusedMultistepScheduler.from_pretrained(directory)
    family = {"FlowMatchHeunDiscreteScheduler": "flow_heun", "DEISMultistepScheduler": "deis"}.get(
        type(theirs).__name__, "flow_euler")
    for ours in loaded:
        assert ours.config.family == expected.config.family == family
        assert ours.order == theirs.order
        ours.set_timesteps(4)
        theirs.set_timesteps(4)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist()


def test_trained_betas_round_trip():
    scheduler = FusedMultistepScheduler(trained_betas=np.array([0.1, 0.3]))
    with tempfile.TemporaryDirectory() as directory:
        scheduler.save_pretrained(directory)
        loaded = FusedMultistepScheduler.from_pretrained(directory)
    assert scheduler.betas.tolist() == loaded.betas.tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_step_shapes_and_dtypes(dtype):
    scheduler = FusedMultistepScheduler()
    scheduler.set_timesteps(25)
    sample = initial_noise(dtype, shape=(4, 3, 8, 8))
    residual = 0.1 * sample
    outputs = [scheduler.step(residual, t, sample).prev_sample for t in scheduler.timesteps[:2]]
    assert all(o.shape == sample.shape and o.dtype == dtype for o in outputs)
    float32_output = scheduler.step(residual.float(), scheduler.timesteps[2], sample).prev_sample
    assert float32_output.dtype == torch.promote_types(dtype, torch.float32)  # as DPMSolverMultistepScheduler


MIXED_DTYPES = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.float16, torch.float32),
                (torch.bfloat16, torch.float16), (torch.float64, torch.float32)]


@pytest.mark.parametrize("sample_dtype,output_dtype", MIXED_DTYPES, ids=str)
@pytest.mark.parametrize("theirs", [
    functools.partial(DPMSolverMultistepScheduler, solver_order=2),
    functools.partial(DPMSolverMultistepScheduler, solver_order=3, prediction_type="sample"),
    functools.partial(DPMSolverMultistepScheduler, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    functools.partial(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", thresholding=True),
    functools.partial(DEISMultistepScheduler, solver_order=3, prediction_type="v_prediction"),
    functools.partial(FlowMatchEulerDiscreteScheduler, shift=3.0),
    FlowMatchHeunDiscreteScheduler,
], ids=["dpmpp2", "dpmpp3_sample", "dpmsolver", "sde_thresholding", "deis3_v", "flow_euler", "flow_heun"])
def test_a_model_output_in_another_dtype_gives_diffusers_dtype(theirs, sample_dtype, output_dtype):
    """A model whose output dtype is not the sample's (a bfloat16 transformer on float32 latents, as WanPipeline
    runs; a float32 model on half latents): each step returns the dtype diffusers' scheduler returns for the same
    inputs, its value within that dtype's rounding of diffusers' step computed in float32 from them. The loop goes
    on from diffusers' float32 states, rounded to the dtype the step returned."""
    reference = theirs()
    mixed = type(reference).from_config(reference.config)
    ours = FusedMultistepScheduler.from_config(reference.config)
    for scheduler in (reference, mixed, ours):
        scheduler.set_timesteps(6)
    sde = reference.config.get("algorithm_type") == "sde-dpmsolver++"
    exact, dtype = initial_noise(), sample_dtype
    for i, t in enumerate(ours.timesteps):  # the loop goes on in the dtype a step returns, as a pipeline's does
        sample = exact.to(dtype)
        output = fake_model(sample, t).to(output_dtype)
        extra = {"variance_noise": initial_noise(seed=100 + i)} if sde else {}
        want = mixed.step(output, t, sample, **extra).prev_sample
        exact = reference.step(output.float(), t, sample.float(), **extra).prev_sample
        got = ours.step(output, t, sample, **extra).prev_sample
        assert got.dtype == want.dtype, f"step {i}"
        tol = max(torch.finfo(got.dtype).eps, RTOL)
        torch.testing.assert_close(got.double(), exact.double(), rtol=tol, atol=tol * exact.abs().max().item())
        dtype = got.dtype


def test_return_dict_false_gives_the_same_tuple():
    outputs = []
    for return_dict in (True, False):
        scheduler = FusedMultistepScheduler()
        scheduler.set_timesteps(50)
        sample = initial_noise()
        out = scheduler.step(0.1 * sample, scheduler.timesteps[0], sample, return_dict=return_dict)
        outputs.append(out.prev_sample if return_dict else out)
    assert isinstance(outputs[1], tuple) and len(outputs[1]) == 1
    assert torch.equal(outputs[0], outputs[1][0])


def test_public_api():
    scheduler = FusedMultistepScheduler()
    assert scheduler.init_noise_sigma == 1.0 and scheduler.order == 1 and len(scheduler) == 1000
    sample = initial_noise()
    assert scheduler.scale_model_input(sample, 0) is sample
    assert "kwargs" not in inspect.signature(FusedMultistepScheduler.__init__).parameters
    assert not FusedMultistepScheduler._deprecated_kwargs
    assert DPMSolverMultistepScheduler in scheduler.compatibles and DDPMScheduler in scheduler.compatibles


def test_config_attribute_access_behaves_like_diffusers():
    """diffusers' test_getattr_is_correct: plain attributes silently, config attributes with a FutureWarning."""
    scheduler = FusedMultistepScheduler()
    scheduler.dummy_attribute = 5
    scheduler.register_to_config(test_attribute=5)
    assert scheduler.dummy_attribute == 5
    with pytest.warns(FutureWarning):
        assert scheduler.test_attribute == 5
    with pytest.raises(AttributeError, match="has no attribute 'does_not_exist'"):
        scheduler.does_not_exist


@pytest.mark.parametrize("spacing,steps_offset", SPACINGS)
@pytest.mark.parametrize("scheduler_class", [DPMSolverMultistepScheduler, DEISMultistepScheduler])
def test_timesteps_match_diffusers(scheduler_class, spacing, steps_offset):
    """Every spacing and a wide range of step counts, repeated timesteps included (diffusers' 1000 "linspace"
    steps repeat one; "leading" with steps_offset reaches timestep 1000): the same grid, and a repeated level
    is a zero-length step (the identity), so a whole loop stays finite where diffusers' order 2 gives NaN."""
    theirs = scheduler_class(timestep_spacing=spacing, steps_offset=steps_offset)
    ours = FusedMultistepScheduler.from_config(theirs.config)
    for steps in (1, 2, 3, 5, 10, 50, 100, 999, 1000):
        theirs.set_timesteps(steps)
        ours.set_timesteps(steps)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist(), steps
        assert torch.equal(ours.sigmas, theirs.sigmas), steps
        assert ours.timesteps.dtype == torch.int64 and ours.sigmas.dtype == torch.float32
        assert len(ours.step_plan) == ours.num_inference_steps == steps
        levels = ours.sigmas.tolist()
        for row, (a, b) in enumerate(zip(levels[:-1], levels[1:])):
            if a == b:
                assert ours.step_plan.rows[row][:5] == (1.0, 0.0, 0.0, 0.0, 0.0)
                assert row + 1 == len(levels) - 1 or ours.step_plan.num_history[row + 1] == 0


def test_custom_timesteps_match_diffusers():
    custom = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    theirs = DPMSolverMultistepScheduler()
    ours = FusedMultistepScheduler()
    theirs.set_timesteps(timesteps=custom)
    ours.set_timesteps(timesteps=custom)
    assert ours.timesteps.tolist() == custom
    x_T = initial_noise()
    assert_same_states(loop(ours, x_T), loop(theirs, x_T))


@pytest.mark.parametrize("config", [dict(), dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"),
                                    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)])
def test_custom_sigmas_reproduce_the_grid(config):
    """set_timesteps(sigmas=<its N levels>) rebuilds the grid of another scheduler with the same config: N
    values, the end appended as final_sigmas_type says (the convention of every diffusers scheduler with sigmas=)."""
    reference = FusedMultistepScheduler(**config)
    reference.set_timesteps(12)
    custom = FusedMultistepScheduler(**{k: v for k, v in config.items() if k != "use_karras_sigmas"})
    custom.set_timesteps(sigmas=reference.sigmas[:-1].tolist())
    assert torch.equal(custom.sigmas, reference.sigmas)
    assert custom.timesteps.tolist() == reference.timesteps.tolist()
    assert_same_states(loop(custom, initial_noise()), loop(reference, initial_noise()), rtol=0)


def test_dynamic_shifting_mu():
    ours = FusedMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True)
    fixed = FusedMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=2.5)
    ours.set_timesteps(10, mu=np.log(2.5))
    fixed.set_timesteps(10)
    assert torch.equal(ours.sigmas, fixed.sigmas)


def test_set_timesteps_takes_the_family_s_positional_order():
    """diffusers' orders after device: DPM-Solver (mu, timesteps), FlowMatchEuler (sigmas, mu, timesteps), as FLUX's
    ``set_timesteps(n, device, sigmas, mu)`` call passes them."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(use_dynamic_shifting=True, shift=1.0)
    sigmas = np.linspace(1.0, 1 / 10, 10).tolist()
    flow, theirs = FusedMultistepScheduler.from_config(FlowMatchEulerDiscreteScheduler(**config).config), \
        FlowMatchEulerDiscreteScheduler(**config)
    flow.set_timesteps(10, "cpu", sigmas, 0.8)
    theirs.set_timesteps(10, "cpu", sigmas, 0.8)
    assert torch.allclose(flow.sigmas.double(), theirs.sigmas.double(), rtol=1e-6, atol=0)
    vp = FusedMultistepScheduler(use_dynamic_shifting=True, use_flow_sigmas=True, prediction_type="flow_prediction")
    by_keyword = FusedMultistepScheduler(use_dynamic_shifting=True, use_flow_sigmas=True,
                                         prediction_type="flow_prediction")
    vp.set_timesteps(10, "cpu", np.log(2.5))
    by_keyword.set_timesteps(10, "cpu", mu=np.log(2.5))
    assert torch.equal(vp.sigmas, by_keyword.sigmas)
    with pytest.raises(TypeError, match="mu both by position and by keyword"):
        vp.set_timesteps(10, "cpu", 1.0, mu=1.0)
    with pytest.raises(TypeError, match="at most 4 positional"):
        vp.set_timesteps(10, "cpu", 1.0, None, None)


@pytest.mark.parametrize("when", ["lookup", "begin_index", "after_step"])
def test_add_noise_matches_dpmsolver(when):
    ours, theirs = FusedMultistepScheduler(), DPMSolverMultistepScheduler()
    x0, noise = initial_noise(seed=1), initial_noise(seed=2)
    results = []
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(20)
        timesteps = scheduler.timesteps[[5, 9]]
        if when == "begin_index":
            scheduler.set_begin_index(7)
        elif when == "after_step":
            scheduler.step(fake_model(x0, scheduler.timesteps[0]), scheduler.timesteps[0], x0)
        results.append(scheduler.add_noise(x0, noise, timesteps))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", [dict(), dict(final_sigmas_type="sigma_min"), dict(algorithm_type="deis")])
def test_add_noise_after_the_last_step_matches_diffusers(config):
    """With the begin index set, add_noise after the run's last step uses the level it landed on (diffusers'
    ``sigmas[N]``: the clean sample at zero noise); it raised an IndexError."""
    theirs = (DEISMultistepScheduler if config.get("algorithm_type") == "deis" else DPMSolverMultistepScheduler)(**config)
    ours = FusedMultistepScheduler.from_config(theirs.config)
    x0, noise = initial_noise(seed=1), initial_noise(seed=2)
    results = []
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(4)
        scheduler.set_begin_index(0)
        loop(scheduler, initial_noise())
        assert scheduler.step_index == 4
        results.append(scheduler.add_noise(x0, noise, scheduler.timesteps[-1:]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)


def test_add_noise_before_set_timesteps_matches_ddpm():
    """For training, before set_timesteps: the training noise level of each timestep."""
    x0, noise = initial_noise(seed=1), initial_noise(seed=2)
    timesteps = torch.tensor([3, 977])
    torch.testing.assert_close(FusedMultistepScheduler().add_noise(x0, noise, timesteps),
                               DDPMScheduler().add_noise(x0, noise, timesteps), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_begin_index", [True, False])
@pytest.mark.parametrize("order", [2, 3])
def test_begin_index_restarts_the_history_like_dpmsolver(order, use_begin_index):
    """img2img: stepping from timesteps[k] warms the order up again from k, as diffusers does."""
    runs = []
    for scheduler in (FusedMultistepScheduler(solver_order=order), DPMSolverMultistepScheduler(solver_order=order)):
        scheduler.set_timesteps(20)
        if use_begin_index:
            runs.append(loop(scheduler, initial_noise(), begin=6))
        else:
            x, states = initial_noise(), []
            for t in scheduler.timesteps[6:]:
                states.append(x.double())
                x = scheduler.step(fake_model(x, t), t, x).prev_sample
            runs.append(states + [x.double()])
    assert_same_states(*runs)


def test_step_index_bookkeeping():
    scheduler = FusedMultistepScheduler()
    assert scheduler.step_index is None and scheduler.begin_index is None and scheduler.step_plan is None
    scheduler.set_timesteps(5)
    sample = initial_noise()
    for i, t in enumerate(scheduler.timesteps):
        assert scheduler.step_index == (None if i == 0 else i)
        sample = scheduler.step(fake_model(sample, t), t, sample).prev_sample
    assert scheduler.step_index == 5
    scheduler.set_begin_index(2)
    scheduler.set_timesteps(5)
    assert scheduler.step_index is None and scheduler.begin_index is None
    scheduler.set_begin_index(3)
    scheduler.step(sample, scheduler.timesteps[3], sample)
    assert scheduler.step_index == 4 and scheduler.begin_index == 3


def test_a_shared_cached_plan_cannot_be_changed_through_a_scheduler():
    """Schedulers with the same grid share one cached coefficient table; what one hands out is a copy."""
    first, second = FusedMultistepScheduler(solver_order=2), FusedMultistepScheduler(solver_order=2)
    first.set_timesteps(12)
    want = loop(first, initial_noise())[-1]
    first.step_plan.coeffs.zero_()
    second.set_timesteps(12)
    assert second.step_plan is first.step_plan
    assert torch.equal(loop(second, initial_noise())[-1], want)


def test_history_is_reset_by_set_timesteps():
    """Running the loop twice on one scheduler gives the same result: no history leaks between runs."""
    scheduler = FusedMultistepScheduler(solver_order=3)
    runs = []
    for _ in range(2):
        scheduler.set_timesteps(12)
        runs.append(loop(scheduler, initial_noise())[-1])
    assert torch.equal(*runs)


@pytest.mark.parametrize("key,value", [
    ("beta_schedule", "quadratic"), ("prediction_type", "noise"), ("solver", "euler"), ("algorithm_type", "unipc"),
    ("solver_order", 4), ("timestep_spacing", "uniform"), ("final_sigmas_type", "sigma_max"), ("solver_type", "bh3"),
    ("time_shift_type", "linear"), ("family", "flow_lcm"), ("sample_max_value", 0.0),
    ("dynamic_thresholding_ratio", 1.5),
])
def test_config_it_cannot_honour_names_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        FusedMultistepScheduler(**{key: value, **({"thresholding": True} if "thresholding" in key or "max" in key
                                                   else {})})


@pytest.mark.parametrize("config,match", [
    (dict(algorithm_type="sde-dpmsolver", solver_order=3), "solver_order"),
    (dict(algorithm_type="sde-dpmsolver++", solver="deis"), "sde-dpmsolver"),
    (dict(use_karras_sigmas=True, use_exponential_sigmas=True), "only one of"),
    (dict(use_karras_sigmas=True, use_lu_lambdas=True), "only one of"),
    (dict(family="dpmsolver", shift=3.0), "shift=3.0 is not a key of DPMSolverMultistepScheduler"),
    (dict(family="flow_euler", beta_schedule="scaled_linear"), "beta_schedule"),
    (dict(family="flow_euler", stochastic_sampling=True, solver="dpmpp"), "stochastic_sampling"),
    (dict(use_karras_sigmas=True, use_flow_sigmas=True), "use_flow_sigmas"),
    (dict(num_train_timesteps=1), "num_train_timesteps"),
])
def test_inconsistent_config_raises(config, match):
    with pytest.raises(ValueError, match=match):
        FusedMultistepScheduler(**config)


@pytest.mark.parametrize("key,value,error", [
    ("use_karras_sigmas", "false", TypeError), ("thresholding", 1, TypeError), ("rescale_betas_zero_snr", "yes", TypeError),
    ("lambda_min_clipped", float("nan"), ValueError), ("lambda_min_clipped", "-5", TypeError),
])
def test_config_value_of_the_wrong_kind_names_the_key(key, value, error):
    """A switch that is not True or False, or a NaN clip, raises naming the key (diffusers fails in arithmetic or
    runs on: ``lambda_min_clipped=nan`` clips nothing there)."""
    with pytest.raises(error, match=key):
        FusedMultistepScheduler(**{key: value}).set_timesteps(5)


def test_bad_begin_index_and_flow_timesteps_name_the_argument():
    scheduler = FusedMultistepScheduler()
    with pytest.raises(TypeError, match="begin_index"):
        scheduler.set_begin_index(1.5)
    flow = FusedMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="sigmas="):
        flow.set_timesteps(timesteps=[999, 500, 100])
    flow.set_timesteps(sigmas=[0.999, 0.5, 0.1])
    assert flow.timesteps.tolist() == [999, 500, 100]


def test_from_config_of_a_config_it_cannot_honour_names_the_key():
    with pytest.raises(ValueError, match="prediction_type"):
        FusedMultistepScheduler.from_config(DDPMScheduler(prediction_type="unknown_type").config)


def test_unexpected_timesteps_warn_and_follow_diffusers_step_index():
    """A first timestep not in the schedule starts at the last step (DPMSolverMultistep's index_for_timestep);
    a later unexpected one does not move the step index. Both warn, naming the timestep."""
    scheduler = FusedMultistepScheduler()
    sample = initial_noise()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(sample, 999, sample)
    for cls in (FusedMultistepScheduler, DPMSolverMultistepScheduler):
        reference = cls()
        reference.set_timesteps(3)
        with pytest.warns(UserWarning, match="timestep 998 is not one of") if cls is FusedMultistepScheduler else \
                contextlib.nullcontext():
            reference.step(0.1 * sample, 998, sample)
        assert reference.step_index == 3
    scheduler.set_timesteps(3)
    t0, t1, t2 = scheduler.timesteps.tolist()
    scheduler.step(sample, t0, sample)
    for wrong in (t0, float(t2), torch.tensor(t2), torch.tensor([t1, t2])):
        scheduler._step_index = 1
        with pytest.warns(UserWarning, match=f"step 1 is at timestep {t1}, got timestep"):
            scheduler.step(sample, wrong, sample)
        assert scheduler.step_index == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler._step_index = 1
        scheduler.step(sample, torch.tensor(t1), sample)
        scheduler.step(sample, float(t2), sample)
    with pytest.raises(ValueError, match="all 3 steps are done"):
        scheduler.step(sample, t2, sample)


def test_device_timestep_is_not_read():
    """A timestep on another device is never read (reading it would wait for the device): no check there."""
    scheduler = FusedMultistepScheduler()
    scheduler.set_timesteps(3)
    scheduler.set_begin_index(0)
    sample = initial_noise()
    scheduler.step(sample, torch.empty((), device="meta"), sample)
    assert scheduler.step_index == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one"), (dict(num_inference_steps=5, timesteps=[9, 5]), "exactly one"),
    (dict(num_inference_steps=0), "positive integer"), (dict(timesteps=[5, 9]), "non-increasing"),
    (dict(timesteps=[1000, 5]), r"\[0, 1000\)"), (dict(sigmas=[3.0, 1.0, 2.0]), "raise the noise"),
    (dict(sigmas=[3.0, 0.0]), "zero noise"), (dict(sigmas=[]), "non-empty"), (dict(sigmas=[3.0, -1.0]), ">= 0"),
    (dict(num_inference_steps=5, mu=0.5), "use_dynamic_shifting"),
])
def test_set_timesteps_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedMultistepScheduler().set_timesteps(**kwargs)


def test_missing_diffusers_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    for name in ("adjointdeis.diffusers", "adjointdeis.diffusers.scheduler"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError, match=r"pip install adjointdeis\[diffusers\]"):
        importlib.import_module("adjointdeis.diffusers")


def tiny_pipeline():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("theirs_class,config", [
    (DPMSolverMultistepScheduler, dict()),
    (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", timestep_spacing="trailing")),
    (DPMSolverMultistepScheduler, dict(solver_order=3, use_karras_sigmas=True, prediction_type="sample")),
], ids=["dpmsolver++", "sde-dpmsolver++", "karras_order3"])
def test_ddpm_pipeline_gives_the_same_images(theirs_class, config):
    """One-line swap in a real pipeline: the same images as diffusers' scheduler with the same config."""
    pipe = tiny_pipeline()
    images = []
    for cls in (theirs_class, FusedMultistepScheduler):
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **config)
        out = pipe(batch_size=2, num_inference_steps=8, output_type="pt", generator=torch.Generator().manual_seed(0))
        images.append(out.images.to(torch.float64))
    assert isinstance(pipe.scheduler, FusedMultistepScheduler)
    error = ((images[1] - images[0]).norm() / images[0].norm()).item()
    assert error <= RTOL


def test_ddpm_pipeline_with_deis_gives_deis_images():
    """DDPMPipeline passes generator= to step, which DEISMultistepScheduler.step does not take: DEIS runs
    in a copy of the pipeline's loop (same initial noise, same post-processing), ours in the pipeline."""
    pipe = tiny_pipeline()
    pipe.scheduler = FusedMultistepScheduler.from_config(pipe.scheduler.config, solver="deis", solver_order=2)
    ours = pipe(batch_size=2, num_inference_steps=10, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images.to(torch.float64)
    deis = DEISMultistepScheduler.from_config(pipe.scheduler.config)
    deis.set_timesteps(10)
    image = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in deis.timesteps:
            image = deis.step(pipe.unet(image, t).sample, t, image).prev_sample
    theirs = (image / 2 + 0.5).clamp(0, 1).to(torch.float64)
    assert ((ours - theirs).norm() / theirs.norm()).item() <= RTOL


class SmallDenoiser(torch.nn.Module):
    """A fixed random 3x3 conv with tanh, time-modulated: a differentiable stand-in for a UNet."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, dtype=dtype)

    def forward(self, x, t):
        tau = torch.as_tensor(t, dtype=x.dtype) / 1000
        return 0.8 * x + 0.2 * torch.tanh(self.conv(x) * (1 + tau))


@pytest.mark.parametrize("config", [
    dict(solver_order=2), dict(solver_order=3, prediction_type="v_prediction"), dict(solver="deis", solver_order=3),
    dict(algorithm_type="sde-dpmsolver++"), dict(use_flow_sigmas=True, prediction_type="flow_prediction"),
], ids=["dpmpp2", "dpmpp3_v", "deis3", "sde", "flow"])
def test_gradients_through_step_pass_gradcheck(config):
    """d sample / d x_T through 4 steps, against finite differences in float64 (SDE noise held fixed)."""
    model = SmallDenoiser(torch.float64)
    shape = (1, 3, 2, 2)
    noises = [torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def sample(x_T):
        scheduler = FusedMultistepScheduler(**config)
        scheduler.set_timesteps(4)
        sde = scheduler.config.algorithm_type == "sde-dpmsolver++"
        return loop(scheduler, x_T, noises=noises if sde else None, model=model)[-1]

    x_T = initial_noise(torch.float64, shape=shape).requires_grad_()
    assert torch.autograd.gradcheck(sample, (x_T,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("config", [dict(solver_order=2), dict(solver_order=3, prediction_type="sample"),
                                    dict(algorithm_type="sde-dpmsolver++", solver_order=2)])
def test_gradients_match_autograd_through_dpmsolver(config):
    """The same loss through our step and through diffusers' torch step: the same gradient w.r.t. x_T."""
    model = SmallDenoiser(torch.float32)
    weights = initial_noise(seed=5)
    noises = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    grads = []
    for cls in (FusedMultistepScheduler, DPMSolverMultistepScheduler):
        scheduler = cls(**config)
        scheduler.set_timesteps(6)
        x_T = initial_noise().requires_grad_()
        sde = config.get("algorithm_type") == "sde-dpmsolver++"
        loss = (loop(scheduler, x_T, noises=noises if sde else None, model=model)[-1] * weights).sum()
        grads.append(torch.autograd.grad(loss, x_T)[0])
    error = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
    assert error <= RTOL


def test_differentiable_in_the_model_output_and_under_no_grad():
    scheduler = FusedMultistepScheduler()
    scheduler.set_timesteps(3)
    sample = initial_noise()
    out = (0.1 * sample).requires_grad_()
    prev = scheduler.step(out, scheduler.timesteps[0], sample).prev_sample
    assert prev.requires_grad and torch.autograd.grad(prev.sum(), out)[0].abs().sum() > 0
    with torch.no_grad():
        prev = scheduler.step(out, scheduler.timesteps[1], prev).prev_sample
    assert not prev.requires_grad


@pytest.mark.cuda
def test_cuda_loop_never_syncs_and_matches_cpu():
    """With the begin index set, a CUDA loop runs under sync debug mode "error" and equals the CPU loop."""
    results = []
    for device in ("cpu", "cuda"):
        scheduler = FusedMultistepScheduler(algorithm_type="sde-dpmsolver++")
        scheduler.set_timesteps(10, device=device)
        scheduler.set_begin_index(0)
        x = initial_noise().to(device)
        noises = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)).to(device) for i in range(10)]
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            for i, t in enumerate(scheduler.timesteps):
                x = scheduler.step(0.9 * x, t, x, variance_noise=noises[i]).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results.append(x.cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, DEISMultistepScheduler,
                                 FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler])
def test_set_timesteps_puts_timesteps_and_sigmas_where_diffusers_does(cls):
    """diffusers keeps DPM-Solver's and DEIS' sigmas on the CPU and FlowMatch's on the device."""
    theirs = cls()
    ours = FusedMultistepScheduler.from_config(theirs.config)
    for scheduler in (theirs, ours):
        scheduler.set_timesteps(4, device="cuda")
    assert ours.timesteps.device == theirs.timesteps.device
    assert ours.sigmas.device == theirs.sigmas.device
