"""Every DPMSolverMultistep / DEIS / FlowMatchEuler / FlowMatchHeun option, step for step against diffusers.

The same loop (a deterministic nonlinear fake model, the pipelines' calling convention) runs our scheduler
built with ``from_config`` and diffusers' scheduler from the same config; every state agrees to 1e-5 relative
to its norm in float32 (docs/math.md section 4). Where diffusers' own float32 arithmetic is the larger error
(DEIS order 3; FlowMatchHeun, whose derivative ``(x - (x - sigma v))/sigma`` cancels) the oracle is diffusers'
scheduler run in float64 or, for FlowMatchHeun, which upcasts only to float32, a float64 run of ours through
``adjointdeis.sample`` with the same grid (and diffusers to its own float32 floor, 5e-5). These are our
equivalents of diffusers' DPM-Solver and DEIS test classes (``bench/diffusers_suites.py`` runs those).
"""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (DEISMultistepScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,  # noqa: E402
                       FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler)

import adjointdeis as ad  # noqa: E402
from adjointdeis.diffusers import (FusedDEISMultistepScheduler, FusedFlowMatchHeunDiscreteScheduler,  # noqa: E402
                                   FusedMultistepScheduler)
from adjointdeis.diffusers.pipeline import setup_from_scheduler  # noqa: E402
from test_diffusers_scheduler import assert_same_states, fake_model, initial_noise, loop, upcast_deis  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*algorithm_type.* is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]
SIGMA_MIN = dict(final_sigmas_type="sigma_min")


def both(theirs, steps, ours=None, dtype=torch.float32, noises=None, generator_seed=None, model=fake_model,
         set_timesteps=None):
    """The loop with ours (from theirs' config unless given) and with theirs; asserts the same grid."""
    ours = ours or FusedMultistepScheduler.from_config(theirs.config)
    runs = []
    for scheduler in (ours, theirs):
        (set_timesteps or (lambda s: s.set_timesteps(steps)))(scheduler)
        generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
        runs.append(loop(scheduler, initial_noise(dtype), noises=noises, generator=generator, model=model))
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    assert torch.equal(ours.sigmas, theirs.sigmas.to(torch.float32))  # upcast_deis widens theirs' float32 values
    return runs


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
@pytest.mark.parametrize("ratio,max_value", [(0.995, 1.5), (0.87, 0.5)])
def test_thresholding_matches_dpmsolver(algorithm, order, prediction, ratio, max_value):
    theirs = DPMSolverMultistepScheduler(solver_order=order, prediction_type=prediction, algorithm_type=algorithm,
                                         thresholding=True, dynamic_thresholding_ratio=ratio,
                                         sample_max_value=max_value, **SIGMA_MIN)
    assert_same_states(*both(theirs, 10))


@pytest.mark.parametrize("order,precision", [(1, torch.float32), (2, torch.float32), (3, torch.float64)])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_thresholding_matches_deis(order, precision, prediction):
    theirs = DEISMultistepScheduler(solver_order=order, prediction_type=prediction, thresholding=True,
                                    dynamic_thresholding_ratio=0.9, sample_max_value=1.2)
    ours = FusedMultistepScheduler.from_config(theirs.config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    if precision == torch.float64:
        upcast_deis(theirs)
    assert_same_states(loop(ours, initial_noise(precision)), loop(theirs, initial_noise(precision)))


def test_thresholding_in_float16_keeps_the_dtype():
    """diffusers' test_fp16_support: thresholded steps on a float16 loop stay float16 and finite."""
    scheduler = FusedMultistepScheduler(thresholding=True, dynamic_thresholding_ratio=0.0)
    scheduler.set_timesteps(10)
    x = initial_noise(torch.float16)
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(x, t), t, x).prev_sample
    assert x.dtype == torch.float16 and torch.isfinite(x).all()


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_noise_prediction_dpmsolver_matches(order, prediction, solver_type):
    theirs = DPMSolverMultistepScheduler(solver_order=order, prediction_type=prediction, algorithm_type="dpmsolver",
                                         solver_type=solver_type, lower_order_final=False, **SIGMA_MIN)
    ours = FusedMultistepScheduler.from_config(theirs.config)
    assert (ours.config.solver, ours.config.solver_type) == ("dpmsolver", solver_type)
    assert_same_states(*both(theirs, 12, ours))


@pytest.mark.parametrize("algorithm,order", [("sde-dpmsolver", 1), ("sde-dpmsolver", 2), ("sde-dpmsolver++", 3)])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sde_forms_match(algorithm, order, solver_type, prediction):
    """The noise-prediction SDE-DPM-Solver and SDE-DPM-Solver++(3M), the same noise drawn by both."""
    theirs = DPMSolverMultistepScheduler(solver_order=order, algorithm_type=algorithm, solver_type=solver_type,
                                         prediction_type=prediction, lower_order_final=False, **SIGMA_MIN)
    assert_same_states(*both(theirs, 12, generator_seed=3))


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_heun_second_order_matches(algorithm, prediction):
    theirs = DPMSolverMultistepScheduler(solver_order=2, algorithm_type=algorithm, solver_type="heun",
                                         prediction_type=prediction)
    assert_same_states(*both(theirs, 10, generator_seed=5))


@pytest.mark.parametrize("config", [
    dict(euler_at_final=True, lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(lambda_min_clipped=-5.1, beta_schedule="squaredcos_cap_v2", solver_order=3),
    dict(use_lu_lambdas=True, prediction_type="v_prediction", final_sigmas_type="sigma_min", lower_order_final=False),
    dict(use_beta_sigmas=True, solver_order=3),
    dict(use_exponential_sigmas=True, algorithm_type="sde-dpmsolver++"),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
         thresholding=True),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True),
    dict(use_lu_lambdas=True, beta_schedule="squaredcos_cap_v2", final_sigmas_type="sigma_min", solver_order=3),
], ids=["euler_at_final", "lambda_min_clipped", "lu_lambdas", "beta_sigmas", "exponential_sde", "zero_snr_thresholded",
        "dynamic_shifting", "lu_lambdas_cosine_sigma_min"])
def test_grid_options_match_dpmsolver(config):
    pytest.importorskip("scipy")
    theirs = DPMSolverMultistepScheduler(**config)
    mu = 0.8 if config.get("use_dynamic_shifting") else None

    def set_timesteps(scheduler):
        scheduler.set_timesteps(9, mu=mu)
        if mu is not None and isinstance(scheduler, DPMSolverMultistepScheduler):
            scheduler.config.flow_shift = 1.0  # diffusers keeps exp(mu) in its config; ours keeps it to the grid

    assert_same_states(*both(theirs, 9, generator_seed=2, set_timesteps=set_timesteps))


def test_a_last_level_above_the_one_before_by_float32_rounding_is_a_zero_length_step():
    """use_lu_lambdas on squaredcos_cap_v2 betas ends at exp(log(sigma_min)), an ulp below the sigma_min that
    final_sigmas_type="sigma_min" appends: the grid rises by rounding, which is no rise (diffusers steps through it,
    ours takes it as the zero-length step its other grids have there), in the scheduler and in denoise."""
    theirs = DPMSolverMultistepScheduler(use_lu_lambdas=True, beta_schedule="squaredcos_cap_v2", **SIGMA_MIN)
    theirs.set_timesteps(6)
    assert theirs.sigmas[-1] > theirs.sigmas[-2]  # the oracle's grid rises, by float32 rounding only
    ours, reference = both(theirs, 6)
    assert_same_states(ours, reference)
    assert torch.equal(ours[-1], ours[-2])

    class Network(torch.nn.Module):
        def forward(self, x, timestep, return_dict=False):
            return (fake_model(x, timestep.reshape(-1, *[1] * (x.dim() - 1))),)

    with torch.no_grad():
        got = ad.diffusers.denoise(Network(), initial_noise(), theirs, num_inference_steps=6)
    assert_same_states([got.double()], [reference[-1]])


@pytest.mark.parametrize("config", [dict(), dict(use_karras_sigmas=True), dict(use_flow_sigmas=True, flow_shift=3.0,
                                                                                 prediction_type="flow_prediction")])
def test_deis_grids_match(config):
    """DEIS' own grid ends (sigma_min; a zero-length last step for karras and flow). Oracle: diffusers' DEIS in
    float64 (in float32 its flow grid's first step alone is 1.7e-5 off)."""
    theirs = DEISMultistepScheduler(solver_order=2, **config)
    ours = FusedDEISMultistepScheduler.from_config(theirs.config)
    assert_same_states(*both(theirs, 10, ours, dtype=torch.float64,
                             set_timesteps=lambda s: (s.set_timesteps(10), upcast_deis(s) if s is theirs else s)))


@pytest.mark.parametrize("family,spacing", [("dpmsolver", "use_karras_sigmas"), ("dpmsolver", "use_exponential_sigmas"),
                                            ("deis", "use_karras_sigmas"), ("flow_euler", "use_karras_sigmas"),
                                            ("flow_euler", "use_beta_sigmas")])
def test_sigma_min_and_sigma_max_bound_the_grid_as_in_diffusers(family, spacing):
    """diffusers' karras, exponential and beta grids read ``sigma_min`` / ``sigma_max`` from the config when it has
    them (no __init__ argument: ``from_config`` registers them from, say, an EulerDiscreteScheduler config, and
    pipelines such as Cosmos register them); ours gives the same grid and samples."""
    pytest.importorskip("scipy")
    if family == "flow_euler":
        theirs = FlowMatchEulerDiscreteScheduler(**{spacing: True})
        theirs.register_to_config(sigma_min=0.02, sigma_max=0.9)
    else:
        reference = DEISMultistepScheduler if family == "deis" else DPMSolverMultistepScheduler
        source = EulerDiscreteScheduler(**{spacing: True}, sigma_min=0.1, sigma_max=10.0)  # EulerDiscrete's own keys
        theirs = reference.from_config(source.config)
    assert (theirs.config.sigma_min, theirs.config.sigma_max) in ((0.1, 10.0), (0.02, 0.9))
    ours = FusedMultistepScheduler.from_config(theirs.config)
    assert ours.config.family == family
    runs = both(theirs, 6, ours, model=flow_model if family == "flow_euler" else fake_model)
    assert ours.sigmas[0].item() == pytest.approx(theirs.config.sigma_max, rel=1e-6)
    assert_same_states(*runs)
    for value, error in (("0.1", TypeError), (-1.0, ValueError)):
        ours.register_to_config(sigma_min=value)
        with pytest.raises(error, match="scheduler config: sigma_min"):
            ours.set_timesteps(6)


@pytest.mark.parametrize("reference,change", [
    (DPMSolverMultistepScheduler, dict(solver_order=3)),
    (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
    (DPMSolverMultistepScheduler, dict(prediction_type="v_prediction", thresholding=True)),
    (DPMSolverMultistepScheduler, dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    (DEISMultistepScheduler, dict(solver_order=3)),
    (FlowMatchEulerDiscreteScheduler, dict(invert_sigmas=True)),
], ids=["solver_order", "algorithm_type", "prediction_thresholding", "final_sigmas_type", "deis_order", "invert_sigmas"])
def test_register_to_config_after_construction_takes_effect_as_in_diffusers(reference, change):
    """diffusers reads its config when it steps, so ``register_to_config`` on a built scheduler (as some pipelines
    do) changes its samples; ours reads the config again at the next ``set_timesteps`` (it kept the config of its
    construction before, half of it: the grid followed the new config and the steps the old one)."""
    theirs = reference()
    ours = FusedMultistepScheduler.from_config(theirs.config)
    for scheduler in (ours, theirs):
        scheduler.register_to_config(**change)
    dtype = torch.float64 if reference is DEISMultistepScheduler else torch.float32
    model = flow_model if reference is FlowMatchEulerDiscreteScheduler else fake_model
    assert_same_states(*both(theirs, 8, ours, dtype=dtype, model=model, set_timesteps=lambda s: (
        s.set_timesteps(8), upcast_deis(s) if s is theirs and dtype == torch.float64 else s)))
    assert all(ours.config[key] == value for key, value in change.items())


def test_register_to_config_of_a_value_it_cannot_honour_names_the_key():
    ours = FusedMultistepScheduler()
    ours.register_to_config(solver_order=7)
    with pytest.raises(ValueError, match="solver_order"):
        ours.set_timesteps(5)
    ours = FusedMultistepScheduler()
    ours.register_to_config(shift=3.0)   # a FlowMatch key in a DPM-Solver config
    with pytest.raises(ValueError, match="shift=3.0"):
        ours.set_timesteps(5)


@pytest.mark.parametrize("solver", ["dpmpp", "dpmsolver", "deis"])
def test_another_solver_keeps_the_deis_grid(solver):
    """``solver=`` runs on the family's grid: DEIS' ends at sigma_min whatever solver runs there."""
    theirs = DEISMultistepScheduler()
    theirs.set_timesteps(6)
    ours = FusedDEISMultistepScheduler.from_config(theirs.config, solver=solver)
    ours.set_timesteps(6)
    assert torch.equal(ours.sigmas, theirs.sigmas.to(torch.float32))
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()


@pytest.mark.parametrize("order", [1, 2, 3])
def test_repeated_timesteps_are_identity_steps(order):
    """diffusers' test_timesteps grid: 25 training steps, 25 steps, timestep 12 twice. diffusers' multistep update
    divides by the zero step there (NaN at orders 2 and 3); ours is the identity and the history restarts, which is
    what diffusers computes at order 1."""
    theirs = DPMSolverMultistepScheduler(num_train_timesteps=25, solver_order=order, **SIGMA_MIN)
    theirs.set_timesteps(25)
    assert len(set(theirs.timesteps.tolist())) == 24
    ours = FusedMultistepScheduler.from_config(theirs.config)
    ours.set_timesteps(25)
    states = loop(ours, initial_noise())
    assert torch.isfinite(states[-1]).all()
    repeated = [i for i in range(24) if ours.sigmas[i] == ours.sigmas[i + 1]]
    assert repeated and all(torch.equal(states[i], states[i + 1]) for i in repeated)
    if order == 1:
        assert_same_states(states, loop(theirs, initial_noise()))
    else:
        assert not torch.isfinite(loop(theirs, initial_noise())[-1]).all()


def test_custom_timesteps_of_every_algorithm():
    """diffusers' test_custom_timesteps: set_timesteps(timesteps=its own) gives the same loop."""
    for config in (dict(), dict(algorithm_type="dpmsolver", **SIGMA_MIN), dict(family="deis")):
        reference = FusedMultistepScheduler(**config)
        reference.set_timesteps(10)
        custom = FusedMultistepScheduler(**config)
        custom.set_timesteps(timesteps=reference.timesteps)
        assert_same_states(loop(custom, initial_noise()), loop(reference, initial_noise()), rtol=0)


FLOW_CONFIGS = {
    "test-default": dict(),
    "sd3": dict(shift=3.0),
    "flux-dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096),
    "linear-shift": dict(use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.25, max_shift=0.75),
    "shift-terminal": dict(shift=2.0, shift_terminal=0.1),
    "invert-sigmas": dict(invert_sigmas=True),
    "karras": dict(shift=3.0, use_karras_sigmas=True),
    "exponential": dict(use_exponential_sigmas=True),
    "beta": dict(shift=2.0, use_beta_sigmas=True),
    "stochastic": dict(shift=3.0, stochastic_sampling=True),
}


def flow_model(x, t):
    """A smooth nonlinear velocity for x at FlowMatch's float timestep t in [0, 1000]."""
    tau = torch.as_tensor(t, dtype=torch.float64) / 1000
    xd = x.to(torch.float64)
    return ((0.6 + 0.2 * tau) * xd - 0.3 * torch.cos(2 * xd - tau)).to(x.dtype)


@pytest.mark.parametrize("steps", [2, 8])
@pytest.mark.parametrize("name", list(FLOW_CONFIGS))
def test_flow_match_euler_options_match(name, steps):
    pytest.importorskip("scipy")
    theirs = FlowMatchEulerDiscreteScheduler(**FLOW_CONFIGS[name])
    mu = 0.6 if theirs.config.use_dynamic_shifting else None
    ours = FusedMultistepScheduler.from_config(theirs.config)
    assert ours.config.family == "flow_euler" and ours.config.solver == ("renoise" if "stochastic" in name else "ddim")
    runs = both(theirs, steps, ours, generator_seed=9, model=flow_model,
                set_timesteps=lambda s: s.set_timesteps(steps, mu=mu))
    assert ours.timesteps.dtype == torch.float32 and torch.equal(ours.timesteps, theirs.timesteps)
    assert_same_states(*runs)


@pytest.mark.parametrize("arguments", [
    dict(sigmas=np.linspace(1.0, 1 / 6, 6), mu=0.45),
    dict(timesteps=[1000.0, 750.0, 400.0, 100.0]),
    dict(sigmas=[1.0, 0.6, 0.3], timesteps=[999.0, 600.0, 300.0]),
    dict(num_inference_steps=5, mu=0.7),
], ids=["flux-sigmas-mu", "timesteps", "sigmas-and-timesteps", "mu-ignored"])
def test_flow_match_set_timesteps_arguments_match(arguments):
    """FluxPipeline's N sigmas with mu (FLUX.1-dev), custom float timesteps, both, and mu without dynamic shifting
    (ignored, as FlowMatchEuler ignores it)."""
    dynamic = "sigmas" in arguments and "mu" in arguments
    theirs = FlowMatchEulerDiscreteScheduler(**FLOW_CONFIGS["flux-dev" if dynamic else "sd3"])
    assert_same_states(*both(theirs, None, model=flow_model, set_timesteps=lambda s: s.set_timesteps(**arguments)))


def test_flow_match_scale_noise_and_begin_index_match():
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = FusedMultistepScheduler.from_config(theirs.config)
    sample, noise = initial_noise(seed=1), initial_noise(seed=2)
    training = theirs.timesteps[[3, 500]]  # before set_timesteps: the training grid, as diffusers'
    assert torch.equal(ours.scale_noise(sample[:2], training, noise[:2]),
                       theirs.scale_noise(sample[:2], training, noise[:2]))
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
    for begin in (None, 4):
        results = []
        for scheduler in (ours, theirs):
            if begin is not None:
                scheduler.set_begin_index(begin)
            results.append(scheduler.scale_noise(sample, scheduler.timesteps[4:5], noise))
        assert torch.equal(*results)
    # img2img: the loop from timesteps[4] with the begin index set, as the pipelines run it.
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
    runs = [loop(s, initial_noise(), begin=4, model=flow_model) for s in (ours, theirs)]
    assert_same_states(*runs)


@pytest.mark.parametrize("shift,steps", [(1.0, 3), (3.0, 6)])
def test_flow_match_heun_matches(shift, steps):
    theirs = FlowMatchHeunDiscreteScheduler(shift=shift)
    ours = FusedMultistepScheduler.from_config(theirs.config)
    assert isinstance(FusedFlowMatchHeunDiscreteScheduler(), FusedMultistepScheduler)
    assert ours.config.family == "flow_heun" and ours.order == theirs.order == 2
    ours64 = FusedMultistepScheduler.from_config(theirs.config)
    ours64.set_timesteps(steps)
    states64 = loop(ours64, initial_noise(torch.float64), model=flow_model)
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    assert_same_states(loop(ours, initial_noise(), model=flow_model), loop(theirs, initial_noise(), model=flow_model),
                       rtol=5e-5)
    # The float64 oracle: the same Heun along the same grid through adjointdeis.sample.
    grid = torch.tensor(ours.sigmas[::2].tolist() + [0.0], dtype=torch.float64)[:steps + 1]
    with torch.no_grad():
        want = ad.sample(lambda x, t: flow_model(x, t[0] * 1000), initial_noise(torch.float64),
                         ad.FlowSchedule(t_max=1.0), steps=steps, timesteps=grid[:-1], solver="heun",
                         prediction="flow")
    assert ((states64[-1] - want).norm() / want.norm()).item() < 1e-6


def test_dpmpp_and_deis_on_the_flow_match_grid():
    """A better solver on FlowMatchEuler's own grid and timesteps (t = 1 first): finite, FLUX's timesteps."""
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs.set_timesteps(8)
    for solver, order in (("dpmpp", 2), ("dpmpp", 3), ("deis", 2), ("deis", 3)):
        ours = FusedMultistepScheduler.from_config(theirs.config, solver=solver, solver_order=order)
        ours.set_timesteps(8)
        assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
        assert torch.isfinite(loop(ours, initial_noise(), model=flow_model)[-1]).all()


def test_one_step_with_shift_terminal_names_the_key():
    """diffusers stretches the grid by its last level, 1 on a one-step grid: its level is 0 / 0 (and diffusers'
    own step then fails with an IndexError); the scheduler and denoise raised about step coefficients or a
    reduction, not naming shift_terminal. Two steps still give diffusers' grid."""
    theirs = FlowMatchEulerDiscreteScheduler(shift_terminal=0.02)
    theirs.set_timesteps(1)
    assert torch.isnan(theirs.sigmas[0])
    with pytest.raises(ValueError, match="non-finite noise levels.*shift_terminal"):
        FusedMultistepScheduler.from_config(theirs.config).set_timesteps(1)

    class Network(torch.nn.Module):
        def forward(self, x, timestep, return_dict=False):
            return (fake_model(x, timestep.reshape(-1, *[1] * (x.dim() - 1))),)

    with pytest.raises(ValueError, match="non-finite noise levels.*shift_terminal"):
        ad.diffusers.denoise(Network(), initial_noise(), theirs, num_inference_steps=1)
    assert_same_states(*both(theirs, 2, model=lambda x, t: fake_model(x, t)))


def test_flow_match_arguments_it_cannot_honour_name_themselves():
    scheduler = FusedMultistepScheduler.from_config(FlowMatchEulerDiscreteScheduler().config)
    scheduler.set_timesteps(4)
    sample = initial_noise()
    with pytest.raises(ValueError, match="per_token_timesteps"):
        scheduler.step(sample, scheduler.timesteps[0], sample, per_token_timesteps=torch.ones(1))
    scheduler.step(sample, scheduler.timesteps[0], sample, s_churn=0.5)  # unused by Euler, as in diffusers
    heun = FusedFlowMatchHeunDiscreteScheduler()
    heun.set_timesteps(4)
    with pytest.raises(ValueError, match="s_churn"):
        heun.step(sample, heun.timesteps[0], sample, s_churn=0.5)
    heun.set_begin_index(1)
    with pytest.raises(ValueError, match="second evaluation of a Heun step"):
        heun.step(sample, heun.timesteps[1], sample)
    with pytest.raises(ValueError, match="mu"):
        FusedMultistepScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
                                            ).set_timesteps(4)
    with pytest.raises(ValueError, match="family is 'flow_heun'"):
        FusedFlowMatchHeunDiscreteScheduler(family="deis")


def test_stochastic_sampling_with_inverted_sigmas_is_refused():
    """diffusers re-noises ``x - sigma v`` at its inverted sigmas, which our inverted grid (the flow with data and
    noise swapped) cannot give: the config raises naming the keys, in the scheduler and in ``denoise``'s setup."""
    theirs = FlowMatchEulerDiscreteScheduler(invert_sigmas=True, stochastic_sampling=True)
    with pytest.raises(ValueError, match="invert_sigmas"):
        FusedMultistepScheduler.from_config(theirs.config)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        setup_from_scheduler(theirs, 4)
    for config in (dict(invert_sigmas=True), dict(stochastic_sampling=True, shift=3.0)):  # each alone: diffusers'
        theirs = FlowMatchEulerDiscreteScheduler(**config)
        assert_same_states(*both(theirs, 4, generator_seed=4, model=flow_model))


@pytest.mark.parametrize("config,arguments,match", [
    (dict(shift_terminal=1.0), dict(num_inference_steps=4), "shift_terminal"),   # diffusers divides by 1 - 1
    (dict(shift_terminal=-0.5), dict(num_inference_steps=4), "shift_terminal"),  # ends below zero noise
    (dict(shift_terminal=1.5), dict(num_inference_steps=4), "shift_terminal"),
    (dict(shift_terminal=float("nan")), dict(num_inference_steps=4), "shift_terminal"),
    (dict(shift_terminal="0.1"), dict(num_inference_steps=4), "shift_terminal"),
    (dict(use_dynamic_shifting=True), dict(num_inference_steps=4, mu=float("nan")), "mu"),
    (dict(use_dynamic_shifting=True), dict(num_inference_steps=4, mu=float("inf")), "mu"),
    (dict(use_dynamic_shifting=True), dict(num_inference_steps=4, mu="0.5"), "mu"),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(num_inference_steps=4, mu=0.0), "mu"),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(num_inference_steps=4, mu=-0.5), "mu"),
    (dict(), dict(sigmas=[]), "sigmas"),
    (dict(), dict(sigmas=[1.0, float("nan"), 0.2]), "sigmas"),
    (dict(), dict(sigmas=[[1.0, 0.5]]), "sigmas"),
    (dict(), dict(timesteps=[1000.0, float("nan"), 200.0]), "timesteps"),
    (dict(), dict(sigmas=[1.0, 0.5, 0.2], timesteps=[1000.0, float("nan"), 200.0]), "timesteps"),
])
def test_flow_match_values_it_cannot_honour_name_themselves(config, arguments, match):
    """Values diffusers' FlowMatchEuler turns into NaN, repeated or out-of-range sigmas (or a crash elsewhere) raise
    naming the key or argument, in the scheduler and in ``denoise``'s setup; the valid neighbours give diffusers'
    grid."""
    with pytest.raises((ValueError, TypeError), match=match):
        FusedMultistepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, **config
                                            ).set_timesteps(**arguments)
    if "shift_terminal" not in config:
        with pytest.raises((ValueError, TypeError), match=match):
            setup_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0, **config), arguments.get(
                "num_inference_steps"), sigmas=arguments.get("sigmas"), timesteps=arguments.get("timesteps"),
                mu=arguments.get("mu"))
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.2)
    assert_same_states(*both(theirs, 4, model=flow_model))
    theirs = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    assert_same_states(*both(theirs, None, model=flow_model, set_timesteps=lambda s: s.set_timesteps(4, mu=0.3)))


@pytest.mark.parametrize("config", [dict(shift=3.0), dict(shift=1.0, use_karras_sigmas=True)])
def test_flow_match_set_shift_matches(config):
    """FlowMatchEuler's set_shift (a later shift for the next set_timesteps; the grid's ends stay those of the
    config's shift) and its shift property, in the scheduler and in ``denoise``'s setup."""
    theirs = FlowMatchEulerDiscreteScheduler(**config)
    ours = FusedMultistepScheduler.from_config(theirs.config)
    for scheduler in (ours, theirs):
        scheduler.set_shift(5.0)
    assert ours.shift == theirs.shift == 5.0 and ours.config.shift == theirs.config.shift
    assert_same_states(*both(theirs, 6, ours, model=flow_model))
    levels = setup_from_scheduler(theirs, 6).levels
    assert torch.equal(levels.to(torch.float32), theirs.sigmas)
    with pytest.raises(ValueError, match="shift"):
        ours.set_shift(-1.0)
    with pytest.raises(ValueError, match="shift"):
        FusedMultistepScheduler().set_shift(2.0)


def test_family_detection():
    """From in-memory configs (default values hidden by diffusers' from_config), saved ones, and our own."""
    cases = {"dpmsolver": DPMSolverMultistepScheduler(), "deis": DEISMultistepScheduler(),
             "flow_euler": FlowMatchEulerDiscreteScheduler(), "flow_heun": FlowMatchHeunDiscreteScheduler()}
    for family, theirs in cases.items():
        ours = FusedMultistepScheduler.from_config(theirs.config)
        assert ours.config.family == family
        assert FusedMultistepScheduler.from_config(ours.config).config.family == family
    assert FusedMultistepScheduler(shift=3.0).config.family == "flow_euler"
    assert FusedMultistepScheduler(algorithm_type="deis").config.family == "deis"
    assert math.isclose(FusedMultistepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config).config
                        .shift, 3.0)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_sample_takes_diffusers_timesteps(final):
    """ad.sample(..., steps=N, timesteps=scheduler.timesteps): diffusers' N timesteps, the end implied (zero noise
    by default, t_min = diffusers' sigma_min with denoise_to_zero=False): DPMSolverMultistep's sample."""
    theirs = DPMSolverMultistepScheduler(final_sigmas_type=final)
    theirs.set_timesteps(10)
    sched = ad.VPSchedule.from_alphas_cumprod(theirs.alphas_cumprod)
    x_T = initial_noise()
    with torch.no_grad():
        got = ad.sample(lambda x, t: fake_model(x, t.view(-1, 1, 1, 1)), x_T, sched, steps=10,
                        timesteps=theirs.timesteps, denoise_to_zero=None if final == "zero" else False)
    want = loop(theirs, x_T)[-1]
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
