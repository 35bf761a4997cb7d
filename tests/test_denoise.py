"""``adjointdeis.diffusers.denoise``: a diffusers denoising loop with gradients.

Gradients: ``grad="discrete"`` against plain autograd through the same loop, float64, on a tiny
``UNet2DConditionModel`` (cross attention, classifier-free guidance) and a tiny ``UNet2DModel``
(unconditional), for the latents, the prompt embeddings and every UNet parameter, to 1e-8 relative.
Forward: the result against diffusers' own loop (``scheduler.step`` after each UNet call, guidance
batched as the pipelines do) with the same UNet, float32, to 1e-5 relative.
"""

import functools

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, DEISMultistepScheduler,  # noqa: E402
                       DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchHeunDiscreteScheduler, PNDMScheduler, UNet2DConditionModel, UNet2DModel,
                       UniPCMultistepScheduler)

from adjointdeis.diffusers.pipeline import denoise  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]

CHANNELS, SIZE, SEQ, EMBED = 2, 8, 5, 12
GRAD_RTOL = 1e-8
FORWARD_RTOL = 1e-5



def conditional_unet(dtype=torch.float32):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=EMBED, attention_head_dim=4,
        norm_num_groups=4)
    return unet.to(dtype).eval()


def unconditional_unet(dtype=torch.float32):
    torch.manual_seed(1)
    unet = UNet2DModel(
        sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, norm_num_groups=4)
    return unet.to(dtype).eval()


def inputs(dtype, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, CHANNELS, SIZE, SIZE, generator=g, dtype=torch.float64).to(dtype)
    embeds = torch.randn(batch, SEQ, EMBED, generator=g, dtype=torch.float64).to(dtype)
    negative = torch.randn(batch, SEQ, EMBED, generator=g, dtype=torch.float64).to(dtype)
    return latents, embeds, negative


def diffusers_loop(unet, scheduler, latents, steps, embeds=None, negative=None, guidance_scale=None,
                   generator=None):
    """The pipelines' loop with diffusers' own scheduler, under no_grad."""
    scheduler = type(scheduler).from_config(scheduler.config)
    scheduler.set_timesteps(steps)
    x = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            if embeds is None:
                out = unet(x, t).sample
            elif guidance_scale is None:
                out = unet(x, t, encoder_hidden_states=embeds).sample
            else:
                both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative, embeds])).sample
                out_uncond, out_cond = both.chunk(2)
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            extra = {} if generator is None else {"generator": generator}
            x = scheduler.step(out, t, x, **extra).prev_sample
    return x


def stepped(unet, scheduler, latents):
    """An unconditional loop over a diffusers scheduler whose timesteps are set."""
    x = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x


def relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


def gradients(result, leaves):
    loss = (result * torch.linspace(-1, 1, result.numel(), dtype=result.dtype).view_as(result)).square().sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def flat(grads, like):
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, like)])


def test_discrete_gradients_equal_autograd_with_guidance():
    unet = conditional_unet(torch.float64)
    latents, embeds, negative = inputs(torch.float64, batch=1)
    leaves = [latents.requires_grad_(), embeds.requires_grad_(), negative.requires_grad_()]
    params = list(unet.parameters())
    scheduler = DPMSolverMultistepScheduler(solver_order=2)
    results = {}
    for grad in ("discrete", "autograd"):
        out = denoise(unet, latents, scheduler, prompt_embeds=embeds, negative_prompt_embeds=negative,
                      guidance_scale=4.0, num_inference_steps=4, grad=grad)
        results[grad] = (out.detach(), gradients(out, leaves + params))
    (x_d, g_d), (x_a, g_a) = results["discrete"], results["autograd"]
    assert torch.equal(x_d, x_a)
    for name, i in (("latents", 0), ("prompt_embeds", 1), ("negative_prompt_embeds", 2)):
        assert relative_error(g_d[i], g_a[i]) < GRAD_RTOL, name
    assert relative_error(flat(g_d[3:], params), flat(g_a[3:], params)) < GRAD_RTOL
    assert all(g is not None for g in g_d[3:]), "every UNet parameter receives a gradient"


def test_discrete_gradients_equal_autograd_unconditional_pipeline():
    unet = unconditional_unet(torch.float64)
    scheduler = DPMSolverMultistepScheduler(solver_order=3, prediction_type="v_prediction")
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    latents = inputs(torch.float64, batch=1)[0].requires_grad_()
    params = list(unet.parameters())
    grads = {}
    for grad in ("discrete", "autograd"):
        out = denoise(pipe, latents, pipe.scheduler, num_inference_steps=5, grad=grad)
        grads[grad] = gradients(out, [latents] + params)
    assert relative_error(grads["discrete"][0], grads["autograd"][0]) < GRAD_RTOL
    assert relative_error(flat(grads["discrete"][1:], params), flat(grads["autograd"][1:], params)) < GRAD_RTOL


@pytest.mark.parametrize("grad", ["discrete", "adjoint"])
def test_the_reverse_pass_leaves_a_train_mode_network_as_the_forward_pass_left_it(grad):
    """A UNet in training mode with a BatchNorm and a forward that counts its calls: the backward pass of
    grad="discrete" and "adjoint" re-runs a shadow of it (as sample does a module), so its running statistics and
    counter stay as the N sampling calls left them, as with autograd (it re-ran the user's network, moving them
    N - 1 more times); the discrete gradients equal autograd's."""

    class Counting(UNet2DModel):
        def forward(self, *args, **kwargs):
            self.calls += 1
            return super().forward(*args, **kwargs)

    results = {}
    for mode in ("autograd", grad):
        torch.manual_seed(1)
        unet = Counting(sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, block_out_channels=(8, 16),
                        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, norm_num_groups=4)
        unet.conv_in = torch.nn.Sequential(unet.conv_in, torch.nn.BatchNorm2d(8))
        unet = unet.double().train()
        unet.calls = 0
        latents = inputs(torch.float64, batch=2)[0].requires_grad_()
        params = list(unet.parameters())
        out = denoise(unet, latents, DPMSolverMultistepScheduler(solver_order=2), num_inference_steps=4, grad=mode)
        sampled = [b.clone() for b in unet.buffers()], unet.calls
        grads = gradients(out, [latents] + params)
        assert all(torch.equal(b, s) for b, s in zip(unet.buffers(), sampled[0])) and unet.calls == 4, mode
        results[mode] = out.detach(), grads, sampled[0]
    (x_a, g_a, b_a), (x_m, g_m, b_m) = results["autograd"], results[grad]
    assert torch.equal(x_m, x_a) and all(torch.equal(b, c) for b, c in zip(b_m, b_a))
    if grad == "discrete":
        assert relative_error(g_m[0], g_a[0]) < GRAD_RTOL
        assert relative_error(flat(g_m[1:], params), flat(g_a[1:], params)) < GRAD_RTOL


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_forward_matches_diffusers_dpmsolver_2m(prediction, final):
    unet = conditional_unet()
    latents, embeds, negative = inputs(torch.float32)
    scheduler = DPMSolverMultistepScheduler(solver_order=2, prediction_type=prediction, final_sigmas_type=final)
    with torch.no_grad():
        ours = denoise(unet, latents, scheduler, prompt_embeds=embeds, negative_prompt_embeds=negative,
                       guidance_scale=3.0, num_inference_steps=8)
    theirs = diffusers_loop(unet, scheduler, latents, 8, embeds, negative, 3.0)
    assert relative_error(ours, theirs) < FORWARD_RTOL


def test_forward_matches_diffusers_without_guidance_and_with_grad():
    """guidance_scale <= 1 is no guidance, as in diffusers; a graph-building run gives the same numbers."""
    unet = conditional_unet()
    latents, embeds, _ = inputs(torch.float32)
    scheduler = DEISMultistepScheduler(solver_order=2, timestep_spacing="trailing")
    ours = denoise(unet, latents.requires_grad_(), scheduler, prompt_embeds=embeds, guidance_scale=1.0,
                   num_inference_steps=6)
    assert ours.requires_grad
    theirs = diffusers_loop(unet, scheduler, latents.detach(), 6, embeds)
    assert relative_error(ours.detach(), theirs) < FORWARD_RTOL


def test_forward_matches_diffusers_unconditional_sde():
    unet = unconditional_unet()
    scheduler = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)
    latents = inputs(torch.float32)[0]
    with torch.no_grad():
        ours = denoise(unet, latents, scheduler, num_inference_steps=6, generator=torch.Generator().manual_seed(7))
    theirs = diffusers_loop(unet, scheduler, latents, 6, generator=torch.Generator().manual_seed(7))
    assert relative_error(ours, theirs) < FORWARD_RTOL


@pytest.mark.parametrize("scheduler", [
    functools.partial(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", solver_order=2),
    functools.partial(FlowMatchEulerDiscreteScheduler, stochastic_sampling=True),
], ids=["sde_dpmsolver", "flow_stochastic"])
def test_a_generator_gives_the_pipeline_s_noise_in_float64(scheduler):
    """diffusers' schedulers draw a step's noise as float32 from the generator (randn_tensor, on the generator's
    device) whatever the latents' dtype; so does denoise, so float64 latents get the same noise and image. The
    generator ends where diffusers' loop leaves it (which draws at the last step to zero noise too), with or
    without gradients, so the next image drawn from it is the pipeline's too."""
    scheduler = scheduler()
    unet, latents = unconditional_unet(torch.float64), inputs(torch.float64)[0]
    theirs_generator = torch.Generator().manual_seed(7)
    theirs = diffusers_loop(unet, scheduler, latents, 6, generator=theirs_generator)
    for grad in (None, "discrete"):
        generator = torch.Generator().manual_seed(7)
        ours = denoise(unet, latents, scheduler, num_inference_steps=6, generator=generator, grad=grad)
        assert ours.dtype == torch.float64
        assert relative_error(ours.detach(), theirs) < FORWARD_RTOL
        assert torch.equal(generator.get_state(), theirs_generator.get_state())


def test_forward_matches_flow_match_euler():
    """A flow-matching config: our DDIM step is exactly the flow Euler step; timestep = 1000 sigma."""
    unet = unconditional_unet()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    latents = inputs(torch.float32)[0]
    with torch.no_grad():
        ours = denoise(unet, latents, scheduler, num_inference_steps=6)
    theirs = diffusers_loop(unet, scheduler, latents, 6)
    assert relative_error(ours, theirs) < FORWARD_RTOL


@pytest.mark.filterwarnings("ignore:.*algorithm_type dpmsolver is deprecated:FutureWarning")
@pytest.mark.parametrize("scheduler", [
    lambda: DPMSolverMultistepScheduler(use_karras_sigmas=True, solver_order=3),
    lambda: DPMSolverMultistepScheduler(use_lu_lambdas=True, prediction_type="v_prediction"),
    lambda: DPMSolverMultistepScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=0.8),
    lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver", solver_type="heun", final_sigmas_type="sigma_min"),
    lambda: DPMSolverMultistepScheduler(solver_type="heun", euler_at_final=True, lower_order_final=False),
    lambda: DPMSolverMultistepScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                        timestep_spacing="trailing"),
    lambda: DEISMultistepScheduler(use_exponential_sigmas=True),
    lambda: DDIMScheduler(timestep_spacing="leading", steps_offset=0, set_alpha_to_one=False, clip_sample=False),
    lambda: DDIMScheduler(timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True, clip_sample=False),
    lambda: FlowMatchEulerDiscreteScheduler(shift=3.0, invert_sigmas=True),
    lambda: FlowMatchEulerDiscreteScheduler(shift_terminal=0.1, use_karras_sigmas=True),
    lambda: FlowMatchHeunDiscreteScheduler(shift=2.0),
], ids=["karras3", "lu_v", "thresholding", "dpmsolver_heun", "euler_at_final", "zero_snr", "deis_exponential",
        "ddim_leading", "ddim_leading_alpha_one", "flow_invert", "flow_terminal_karras", "flow_heun"])
def test_forward_matches_every_config(scheduler):
    """denoise takes every config the scheduler takes (the DDIM grid ending at timestep 0 included: its last
    step is the identity with set_alpha_to_one=False, a step to zero noise with True)."""
    pytest.importorskip("scipy")
    unet, scheduler = unconditional_unet(), scheduler()
    latents = inputs(torch.float32)[0]
    with torch.no_grad():
        ours = denoise(unet, latents, scheduler, num_inference_steps=6)
    theirs = diffusers_loop(unet, scheduler, latents, 6)
    assert relative_error(ours, theirs) < FORWARD_RTOL


DDIM = dict(clip_sample=False)


@pytest.mark.parametrize("config,steps", [
    (dict(timestep_spacing="trailing"), 7),  # lands at t - 142, the next timestep is t - 143 at some steps
    (dict(timestep_spacing="linspace"), 3),  # lands at t - 333, the next timestep is t - 499
    (dict(timestep_spacing="trailing", prediction_type="sample"), 7),
    (dict(timestep_spacing="linspace", prediction_type="v_prediction", set_alpha_to_one=False), 4),
    (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5), 6),  # x0 thresholded, eps not
    (dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=1.2, timestep_spacing="trailing"), 7),
    (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), 5),
    (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), 7),
], ids=["trailing", "linspace", "trailing_x0", "linspace_v", "thresholding", "thresholding_trailing",
        "zero_snr", "zero_snr_7"])
def test_forward_matches_ddim_where_it_lands_off_its_grid(config, steps):
    """DDIM's own steps: landing at t - T // N (not always the next timestep), x0 thresholded after eps is taken,
    the first step at zero terminal SNR (alpha = 0). Oracle: diffusers' DDIM loop in float64 (its coefficients
    float32); in float32 we are as close to it as diffusers' own float32 loop, or within FORWARD_RTOL (thresholded
    steps amplify rounding: diffusers' float32 loop is up to 1.4e-5 off its float64 one)."""
    scheduler = DDIMScheduler(**DDIM, **config)
    runs = {}
    for dtype in (torch.float64, torch.float32):
        unet, latents = unconditional_unet(dtype), 3 * inputs(dtype)[0]
        with torch.no_grad():
            ours = denoise(unet, latents, scheduler, num_inference_steps=steps)
        runs[dtype] = ours.double(), diffusers_loop(unet, scheduler, latents, steps).double()
    oracle = runs[torch.float64][1]
    assert relative_error(runs[torch.float64][0], oracle) < FORWARD_RTOL
    theirs_float32 = relative_error(runs[torch.float32][1], oracle)
    assert relative_error(runs[torch.float32][0], oracle) < max(FORWARD_RTOL, 2 * theirs_float32)


def test_discrete_gradients_equal_autograd_where_ddim_lands_off_its_grid():
    unet = unconditional_unet(torch.float64)
    scheduler = DDIMScheduler(**DDIM, timestep_spacing="trailing", thresholding=True, dynamic_thresholding_ratio=0.8,
                              sample_max_value=1.2)
    latents = inputs(torch.float64, batch=1)[0].requires_grad_()
    params = list(unet.parameters())
    grads = {}
    for grad in ("discrete", "autograd"):
        out = denoise(unet, 3 * latents, scheduler, num_inference_steps=7, grad=grad)
        grads[grad] = gradients(out, [latents] + params)
    assert relative_error(grads["discrete"][0], grads["autograd"][0]) < GRAD_RTOL
    assert relative_error(flat(grads["discrete"][1:], params), flat(grads["autograd"][1:], params)) < GRAD_RTOL
    with pytest.raises(ValueError, match="thresholded"):
        denoise(unet, latents, scheduler, num_inference_steps=7, grad="adjoint")


def transplanted_dpmsolver(scheduler, steps, timesteps=None, sigmas=None, **config):
    """diffusers' DPMSolverMultistep of `scheduler`'s config set to the given grid (its timesteps, and its sigmas
    when given: DPMSolverMultistep takes no sigmas=)."""
    reference = DPMSolverMultistepScheduler.from_config(scheduler.config, **config)
    reference.set_timesteps(steps if timesteps is None else None, timesteps=timesteps)
    if sigmas is not None:
        reference.sigmas = sigmas.clone()
    return reference


@pytest.mark.parametrize("make", [
    lambda: PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                          steps_offset=1),  # SD 1.x's: its timesteps repeat one, run once
    lambda: DDPMScheduler(),
    lambda: UniPCMultistepScheduler(),
    lambda: UniPCMultistepScheduler(use_karras_sigmas=True),
    lambda: UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),  # Wan
], ids=["pndm", "ddpm", "unipc", "unipc_karras", "unipc_flow"])
def test_other_schedulers_run_dpmsolver_on_their_own_grid(make):
    """DPM-Solver++(2M) at the scheduler's own timesteps and levels (its sigmas where it has them, else its
    alphas_cumprod, to sigma_min). Oracle: diffusers' DPMSolverMultistep on that grid."""
    unet, scheduler = unconditional_unet(), make()
    latents = inputs(torch.float32)[0]
    with torch.no_grad():
        ours = denoise(unet, latents, scheduler, num_inference_steps=5)
    own = type(scheduler).from_config(scheduler.config)
    own.set_timesteps(5)
    timesteps = list(dict.fromkeys(own.timesteps.tolist()))
    if hasattr(own, "sigmas"):
        reference = transplanted_dpmsolver(scheduler, 5, sigmas=own.sigmas)
        reference.timesteps = own.timesteps.clone()
    else:
        reference = transplanted_dpmsolver(scheduler, None, timesteps=timesteps, final_sigmas_type="sigma_min")
    assert relative_error(ours, stepped(unet, reference, latents)) < FORWARD_RTOL


def test_zero_terminal_snr_ddpm_starts_at_pure_noise():
    """DDPM at zero terminal SNR: the first level is alpha = 0 exactly (diffusers' DPM-Solver clamps it to
    2^-24); the v-prediction's first step is then DDIM from pure noise, x_1 = sigma_1 x_T + alpha_1 (-v)."""
    unet = unconditional_unet()
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    latents = inputs(torch.float32)[0]
    with torch.no_grad():
        one = denoise(unet, latents, scheduler, num_inference_steps=None, timesteps=[999, 0])
        v = unet(latents, 999).sample
    alpha = scheduler.alphas_cumprod[0].double().sqrt()
    want = (1 - alpha**2).sqrt() * latents.double() + alpha * -v.double()
    assert relative_error(one.double(), want) < FORWARD_RTOL


@pytest.mark.parametrize("make", [
    lambda: DPMSolverMultistepScheduler(), lambda: DPMSolverMultistepScheduler(rescale_betas_zero_snr=True),
    lambda: DDPMScheduler(), lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    lambda: FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
], ids=["dpmsolver", "zero_snr", "ddpm", "flow", "flow_inverted"])
def test_levels_off_the_grid_get_diffusers_timesteps(make):
    """grad="adjoint" with adjoint_steps evaluates the network between grid levels: there it gets the timestep
    diffusers' own level-to-timestep map gives (VP: DPMSolverMultistep's _sigma_to_t, log-interpolated over the
    training levels; flow: 1000 t), and at a grid level the grid's own timestep."""
    from adjointdeis.diffusers.pipeline import NetworkCall, setup_from_scheduler
    scheduler = make()
    setup = setup_from_scheduler(scheduler, 4)
    call = NetworkCall(unconditional_unet(), setup)
    x = torch.zeros(3, 1)
    grid = setup.levels[:-1]
    between = (grid[1:] * grid[:-1]).sqrt().to(torch.float32)  # off the grid
    got = call.timestep(x, between)
    sigma = setup.schedule.sigma(between.double()) / setup.schedule.alpha(between.double())  # VE level
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        level = between.double()
        want = 1000 * (1 - level if scheduler.config.invert_sigmas else level)
    else:
        reference = DPMSolverMultistepScheduler.from_config(scheduler.config)
        products = reference.alphas_cumprod.double()
        want = torch.tensor(reference._sigma_to_t(sigma.numpy(), np.log(((1 - products) / products).sqrt().numpy())))
    assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-3)
    assert torch.equal(call.timestep(x, grid.to(torch.float32)), setup.timesteps.to(torch.float32))


def test_forward_matches_custom_timesteps():
    unet, scheduler = unconditional_unet(), DPMSolverMultistepScheduler(solver_order=3)
    latents = inputs(torch.float32)[0]
    custom = [999, 800, 611, 400, 250, 120, 31]
    with torch.no_grad():
        ours = denoise(unet, latents, scheduler, num_inference_steps=None, timesteps=custom)
    reference = DPMSolverMultistepScheduler.from_config(scheduler.config)
    reference.set_timesteps(timesteps=custom)
    assert relative_error(ours, stepped(unet, reference, latents)) < FORWARD_RTOL


def test_scheduler_is_left_untouched():
    unet = unconditional_unet()
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(7)
    before = scheduler.timesteps.clone()
    with torch.no_grad():
        denoise(unet, inputs(torch.float32)[0], scheduler, num_inference_steps=3)
    assert torch.equal(scheduler.timesteps, before)


def test_bad_configurations_raise():
    unet = conditional_unet()
    latents, embeds, negative = inputs(torch.float32)
    with pytest.raises(ValueError, match="init_noise_sigma"):
        denoise(unet, latents, EulerDiscreteScheduler(), prompt_embeds=embeds, num_inference_steps=3)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        denoise(unet, latents, DPMSolverMultistepScheduler(), prompt_embeds=embeds, guidance_scale=5.0,
                num_inference_steps=3)
    with pytest.raises(ValueError, match="mu needs use_dynamic_shifting"):
        denoise(unet, latents, DPMSolverMultistepScheduler(), prompt_embeds=embeds, num_inference_steps=3, mu=0.5)
    with pytest.raises(ValueError, match="thresholding"):
        denoise(unet, latents, DPMSolverMultistepScheduler(thresholding=True, final_sigmas_type="sigma_min"),
                prompt_embeds=embeds, num_inference_steps=3, grad="adjoint")
    with pytest.raises(ValueError, match="solver_order"):
        denoise(unet, latents, DPMSolverMultistepScheduler(solver_order=3), prompt_embeds=embeds,
                num_inference_steps=3, solver="dpmsolver", order=4)
    with pytest.raises(ValueError, match="clip_sample"):
        denoise(unet, latents, DDIMScheduler(), prompt_embeds=embeds, num_inference_steps=3)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        denoise(unconditional_unet(), latents, DPMSolverMultistepScheduler(), prompt_embeds=embeds,
                num_inference_steps=3)


def test_our_scheduler_config_gives_the_same_loop():
    """A pipeline whose scheduler is FusedMultistepScheduler denoises as with the config it came from."""
    from adjointdeis.diffusers import FusedMultistepScheduler
    from adjointdeis.diffusers import denoise as exported

    assert exported is denoise
    unet = unconditional_unet()
    latents = inputs(torch.float32)[0]
    for theirs in (DPMSolverMultistepScheduler(solver_order=3, timestep_spacing="trailing"),
                   DEISMultistepScheduler(solver_order=2, algorithm_type="deis")):
        ours = FusedMultistepScheduler.from_config(theirs.config)
        with torch.no_grad():
            got = denoise(unet, latents, ours, num_inference_steps=6)
            want = denoise(unet, latents, theirs, num_inference_steps=6)
        assert relative_error(got, want) < 1e-6
