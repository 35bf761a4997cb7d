"""FluxPipeline and StableDiffusion3Pipeline with our scheduler and through ``denoise`` (issue 14).

The pipelines are built offline from configs: diffusers' small random-weight transformers and VAEs of its fast
tests (one layer, 16 x 16 images), no text encoders (the prompt embeddings are passed directly). With their
shipped scheduler configs (FLUX.1-dev: dynamic shifting; FLUX.1-schnell: shift 1; SD3/SD3.5: shift 3) and
diffusers' test defaults, the one-line swap gives FlowMatchEulerDiscreteScheduler's images and latents to 1e-4,
``denoise`` gives the pipeline's ``output_type="latent"``, and its gradients equal plain autograd through a
hand-written loop with FlowMatchEulerDiscreteScheduler (float64 network; the scheduler itself computes in float32).
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers", reason="FluxPipeline and StableDiffusion3Pipeline need transformers")

from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,  # noqa: E402
                       FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline)

from adjointdeis.diffusers import FusedMultistepScheduler, denoise  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*torchvision.*")]
SIZE = 16
SHIFTED = dict(num_train_timesteps=1000, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
               max_image_seq_len=4096)
CONFIGS = {
    ("flux", "test-default"): {},
    ("flux", "FLUX.1-dev"): dict(SHIFTED, shift=3.0, use_dynamic_shifting=True),
    ("flux", "FLUX.1-schnell"): dict(SHIFTED, shift=1.0, use_dynamic_shifting=False),
    ("sd3", "test-default"): {},
    ("sd3", "SD3/SD3.5"): dict(num_train_timesteps=1000, shift=3.0),
}


def vae(latent_channels):
    torch.manual_seed(0)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def pipeline(kind, scheduler, guidance_embeds=False, dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "flux":
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                             guidance_embeds=guidance_embeds)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae(1), text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=transformer.to(dtype))
    else:
        transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                            joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
        pipe = StableDiffusion3Pipeline(scheduler=scheduler, vae=vae(4), text_encoder=None, tokenizer=None,
                                        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
                                        transformer=transformer.to(dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(kind, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    pooled = 32 if kind == "flux" else 64
    out = dict(prompt_embeds=torch.randn(1, 12, 32, generator=g),
               pooled_prompt_embeds=torch.randn(1, pooled, generator=g),
               negative_prompt_embeds=torch.randn(1, 12, 32, generator=g),
               negative_pooled_prompt_embeds=torch.randn(1, pooled, generator=g))
    if kind == "flux":
        out = {k: v for k, v in out.items() if not k.startswith("negative")}
    return {k: v.to(dtype) for k, v in out.items()}


def run(pipe, kind, steps, output_type, **extra):
    kwargs = dict(num_inference_steps=steps, height=SIZE, width=SIZE, output_type=output_type,
                  generator=torch.Generator().manual_seed(0), guidance_scale=3.5 if kind == "flux" else 5.0,
                  **embeddings(kind), **extra)
    with torch.no_grad():
        return torch.as_tensor(pipe(**kwargs).images)


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("steps", [2, 8])
@pytest.mark.parametrize("kind,name", list(CONFIGS))
def test_one_line_swap_gives_flow_match_euler_images(kind, name, steps):
    config = FlowMatchEulerDiscreteScheduler(**CONFIGS[kind, name]).config
    for output_type in ("latent", "pt"):
        want = run(pipeline(kind, FlowMatchEulerDiscreteScheduler.from_config(config)), kind, steps, output_type)
        pipe = pipeline(kind, FlowMatchEulerDiscreteScheduler.from_config(config))
        pipe.scheduler = FusedMultistepScheduler.from_config(pipe.scheduler.config)
        got = run(pipe, kind, steps, output_type)
        if output_type == "pt":
            assert (got - want).abs().max().item() < 1e-4, name
        else:
            assert relative(got, want) < 1e-4, name


def test_one_line_swap_gives_flow_match_heun_images():
    """SD3 with FlowMatchHeun (FLUX cannot take it, in diffusers: its set_timesteps has no sigmas)."""
    config = FlowMatchHeunDiscreteScheduler(shift=3.0).config
    want = run(pipeline("sd3", FlowMatchHeunDiscreteScheduler.from_config(config)), "sd3", 4, "latent")
    got = run(pipeline("sd3", FusedMultistepScheduler.from_config(config)), "sd3", 4, "latent")
    assert relative(got, want) < 1e-4


def test_a_better_solver_on_the_pipeline_grid():
    """DPM-Solver++(2M) on FLUX.1-dev's own grid: finite and close to Euler's latents (a different solver)."""
    config = FlowMatchEulerDiscreteScheduler(**CONFIGS["flux", "FLUX.1-dev"]).config
    euler = run(pipeline("flux", FusedMultistepScheduler.from_config(config)), "flux", 8, "latent")
    dpmpp = run(pipeline("flux", FusedMultistepScheduler.from_config(config, solver="dpmpp")), "flux", 8, "latent")
    assert torch.isfinite(dpmpp).all() and 0 < relative(dpmpp, euler) < 0.1


def flux_latents(pipe, dtype=torch.float32):
    latents = torch.randn(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).to(dtype)
    return pipe._pack_latents(latents, 1, 1, SIZE, SIZE)


def sd3_latents(dtype=torch.float32):
    return torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("guidance_embeds", [False, True])
@pytest.mark.parametrize("name", ["test-default", "FLUX.1-dev", "FLUX.1-schnell"])
def test_denoise_matches_flux_pipeline(name, guidance_embeds):
    pipe = pipeline("flux", FlowMatchEulerDiscreteScheduler(**CONFIGS["flux", name]), guidance_embeds)
    emb = embeddings("flux")
    latents = flux_latents(pipe)
    want = run(pipe, "flux", 8, "latent", latents=latents)
    with torch.no_grad():
        got = denoise(pipe, latents, pipe.scheduler, prompt_embeds=emb["prompt_embeds"], guidance_scale=3.5,
                      added_cond_kwargs={"pooled_projections": emb["pooled_prompt_embeds"]}, num_inference_steps=8)
    assert relative(got, want) < 1e-5


def test_denoise_matches_flux_true_cfg():
    """FLUX's "true CFG": the negative branch as a second call in the pipeline, batched here."""
    pipe = pipeline("flux", FlowMatchEulerDiscreteScheduler(**CONFIGS["flux", "FLUX.1-dev"]), guidance_embeds=True)
    emb = embeddings("flux")
    g = torch.Generator().manual_seed(2)
    negative, negative_pooled = torch.randn(1, 12, 32, generator=g), torch.randn(1, 32, generator=g)
    latents = flux_latents(pipe)
    want = run(pipe, "flux", 4, "latent", latents=latents, true_cfg_scale=2.0, negative_prompt_embeds=negative,
               negative_pooled_prompt_embeds=negative_pooled)
    with torch.no_grad():
        got = denoise(pipe, latents, pipe.scheduler, prompt_embeds=emb["prompt_embeds"],
                      negative_prompt_embeds=negative, true_cfg_scale=2.0, num_inference_steps=4,
                      added_cond_kwargs={"pooled_projections": emb["pooled_prompt_embeds"]},
                      negative_added_cond_kwargs={"pooled_projections": negative_pooled})
    assert relative(got, want) < 1e-5


def sd3_conditioning(emb):
    return dict(prompt_embeds=emb["prompt_embeds"], negative_prompt_embeds=emb["negative_prompt_embeds"],
                added_cond_kwargs={"pooled_projections": emb["pooled_prompt_embeds"]},
                negative_added_cond_kwargs={"pooled_projections": emb["negative_pooled_prompt_embeds"]})


@pytest.mark.parametrize("name", ["test-default", "SD3/SD3.5"])
def test_denoise_matches_sd3_pipeline(name):
    pipe = pipeline("sd3", FlowMatchEulerDiscreteScheduler(**CONFIGS["sd3", name]))
    latents = sd3_latents()
    want = run(pipe, "sd3", 8, "latent", latents=latents)
    with torch.no_grad():
        got = denoise(pipe, latents, pipe.scheduler, guidance_scale=5.0, num_inference_steps=8,
                      **sd3_conditioning(embeddings("sd3")))
    assert relative(got, want) < 1e-5


def hand_loop(call, scheduler_config, sigmas, mu, steps, latents):
    """The pipeline's loop with FlowMatchEulerDiscreteScheduler, differentiable (plain autograd)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps, sigmas=sigmas, mu=mu)
    x = latents
    for t in scheduler.timesteps:
        x = scheduler.step(call(x, t), t, x).prev_sample.to(latents.dtype)
    return x


def check_gradients(got, want, leaves):
    weights = torch.linspace(-1, 1, want.numel(), dtype=want.dtype).view_as(want)
    ours = torch.autograd.grad((got * weights).square().sum(), leaves)
    theirs = torch.autograd.grad((want * weights).square().sum(), leaves)
    assert relative(got.detach(), want.detach()) < 1e-6
    for g, w in zip(ours, theirs):
        assert relative(g, w) < 1e-5


def test_flux_gradients_equal_autograd_through_the_pipeline_loop():
    """grad="discrete" through FLUX.1-dev (guidance embedding), float64, to the latents, the prompt embeddings, the
    pooled projections and the transformer's parameters."""
    steps = 3
    config = FlowMatchEulerDiscreteScheduler(**CONFIGS["flux", "FLUX.1-dev"]).config
    pipe = pipeline("flux", FlowMatchEulerDiscreteScheduler.from_config(config), True, torch.float64)
    emb = embeddings("flux", torch.float64)
    latents = flux_latents(pipe, torch.float64).requires_grad_()
    embeds, pooled = emb["prompt_embeds"].requires_grad_(), emb["pooled_prompt_embeds"].requires_grad_()
    params = [p for p in pipe.transformer.parameters()][:4]
    got = denoise(pipe, latents, pipe.scheduler, prompt_embeds=embeds, added_cond_kwargs={"pooled_projections": pooled},
                  guidance_scale=3.5, num_inference_steps=steps, grad="discrete", parameters=params)
    img_ids = pipe._prepare_latent_image_ids(1, SIZE // 2, SIZE // 2, "cpu", torch.float64)
    txt_ids = torch.zeros(12, 3, dtype=torch.float64)
    guidance = torch.full([1], 3.5, dtype=torch.float32)

    def call(x, t):
        return pipe.transformer(hidden_states=x, timestep=t.expand(1).to(x.dtype) / 1000, guidance=guidance,
                                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                                img_ids=img_ids, joint_attention_kwargs={}, return_dict=False)[0]

    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    mu = calculate_shift(latents.shape[1], 256, 4096, 0.5, 1.15)
    want = hand_loop(call, config, np.linspace(1.0, 1 / steps, steps), mu, None, latents)
    check_gradients(got, want, [latents, embeds, pooled, *params])


def test_sd3_gradients_equal_autograd_through_the_pipeline_loop():
    """grad="discrete" through SD3 (shift 3) with batched CFG, float64, to the latents, both embeddings and the
    transformer's parameters; grad="adjoint" refuses the grid's zero-noise end, naming it."""
    steps = 3
    config = FlowMatchEulerDiscreteScheduler(**CONFIGS["sd3", "SD3/SD3.5"]).config
    pipe = pipeline("sd3", FlowMatchEulerDiscreteScheduler.from_config(config), dtype=torch.float64)
    emb = {k: v.requires_grad_() for k, v in embeddings("sd3", torch.float64).items()}
    latents = sd3_latents(torch.float64).requires_grad_()
    params = [p for p in pipe.transformer.parameters()][-4:]
    got = denoise(pipe, latents, pipe.scheduler, guidance_scale=5.0, num_inference_steps=steps, grad="discrete",
                  parameters=params, **sd3_conditioning(emb))

    def call(x, t):
        both = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2),
                                encoder_hidden_states=torch.cat([emb["negative_prompt_embeds"], emb["prompt_embeds"]]),
                                pooled_projections=torch.cat([emb["negative_pooled_prompt_embeds"],
                                                              emb["pooled_prompt_embeds"]]), return_dict=False)[0]
        uncond, cond = both.chunk(2)
        return uncond + 5.0 * (cond - uncond)

    want = hand_loop(call, config, None, None, steps, latents)
    check_gradients(got, want, [latents, *emb.values(), *params])


def test_adjoint_gradients_through_sd3():
    """grad="adjoint" on SD3's grid (from t = 1 to zero noise): the x0 form, 2M, its own finer grid after the first
    step; near the discrete gradient of the same run (they converge to the same continuous gradient: see
    tests/test_flow.py::test_adjoint_from_pure_noise_to_zero_noise for the exact oracle). The eps form refuses t = 1."""
    config = FlowMatchEulerDiscreteScheduler(**CONFIGS["sd3", "SD3/SD3.5"]).config
    pipe = pipeline("sd3", FlowMatchEulerDiscreteScheduler.from_config(config), dtype=torch.float64)
    emb = embeddings("sd3", torch.float64)
    grads = {}
    for grad, options in (("discrete", {}), ("adjoint", dict(adjoint_form="x0", adjoint_order=2, adjoint_steps=16))):
        latents = sd3_latents(torch.float64).requires_grad_()
        out = denoise(pipe, latents, pipe.scheduler, guidance_scale=5.0, num_inference_steps=4, grad=grad,
                      parameters=[], **sd3_conditioning(emb), **options)
        grads[grad] = torch.autograd.grad(out.square().sum(), latents)[0]
    cosine = torch.nn.functional.cosine_similarity(grads["adjoint"].flatten(), grads["discrete"].flatten(), dim=0)
    assert torch.isfinite(grads["adjoint"]).all() and cosine > 0.9, cosine
    with pytest.raises(ValueError, match="adjoint_form='x0'"):
        denoise(pipe, sd3_latents(torch.float64).requires_grad_(), pipe.scheduler, guidance_scale=5.0,
                num_inference_steps=4, grad="adjoint", **sd3_conditioning(emb))
