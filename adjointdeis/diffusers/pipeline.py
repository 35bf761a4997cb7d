"""``denoise``: a diffusers pipeline's denoising loop through ``adjointdeis.sample``, with gradients.

diffusers runs its loop under ``torch.no_grad``; here the same loop (same UNet or transformer, same
scheduler configuration, same classifier-free guidance) is one ``sample`` call, so ``loss(latents).backward()``
reaches the initial latents, the prompt embeddings and the network's weights through our gradient modes.
"""

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Number

import torch
from torch import Tensor

from ..sampling import sample
from ..schedules import NoiseSchedule, VPSchedule
from . import config as translation

# Config keys whose truthy value changes the grid or the update in a way ``sample`` does not model.
UNSUPPORTED_CONFIG = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                      "thresholding", "use_dynamic_shifting", "invert_sigmas", "shift_terminal", "euler_at_final",
                      "stochastic_sampling")

_ENCODER_KEY = "encoder_hidden_states"
_ADDED_PREFIX = "added_cond_kwargs."


@dataclass(frozen=True)
class SamplingSetup:
    """What a diffusers scheduler configuration means for ``sample``.

    Attributes:
        schedule: the noise schedule (discrete VP or flow).
        timesteps: (N+1,) float64 grid, noisiest first, in the schedule's time.
        time_scale: factor from the schedule's time to the network's timestep (1 for VP, the
            number of training steps for flow models).
        prediction, solver, order, sde, lower_order_final, denoise_to_zero: as in ``sample``.
    """

    schedule: NoiseSchedule
    timesteps: Tensor
    time_scale: float
    prediction: str
    solver: str
    order: int | None
    sde: bool
    lower_order_final: bool
    denoise_to_zero: bool

    def sample_kwargs(self) -> dict:
        return dict(timesteps=self.timesteps, prediction=self.prediction, solver=self.solver, order=self.order,
                    sde=self.sde, lower_order_final=self.lower_order_final, denoise_to_zero=self.denoise_to_zero)


def _default_solver(scheduler, config) -> tuple[str, int | None]:
    """(solver, order) that reproduce the scheduler's own algorithm, where we have it."""
    algorithm = str(config.get("algorithm_type", ""))
    if "solver" in config:
        return config["solver"] or ("deis" if algorithm == "deis" else "dpmpp"), config.get("solver_order")
    name = type(scheduler).__name__
    if name.startswith("DPMSolverMultistep"):
        solver, _ = translation.algorithm(algorithm)
        order = config.get("solver_order", 2)
        translation.check_solver_type(config.get("solver_type", "midpoint"), solver, order)
        return solver, order
    if name.startswith("DEISMultistep"):
        return "deis", config.get("solver_order", 2)
    if name.startswith("DDIM") or name.startswith("FlowMatchEuler"):
        return "ddim", 1
    return "dpmpp", 2


def setup_from_scheduler(scheduler, num_inference_steps: int, solver: str | None = None,
                         order: int | None = None) -> SamplingSetup:
    """Our schedule, grid and solver from a diffusers scheduler's configuration.

    The grid is the one the scheduler's own ``set_timesteps(num_inference_steps)`` produces, taken
    from a fresh instance built with ``from_config`` (the given scheduler is not modified): the
    integer timesteps followed by 0 for VP schedules, the sigmas for flow schedules.

    Args:
        scheduler: a diffusers scheduler (``SchedulerMixin, ConfigMixin``) whose latents start as
            standard normal noise (``init_noise_sigma == 1``).
        num_inference_steps: N.
        solver, order: override the solver the scheduler's class implies (DPMSolverMultistep:
            "dpmpp" of its ``solver_order``; DEIS: "deis"; DDIM and FlowMatchEuler: "ddim";
            others: "dpmpp" order 2).

    Raises:
        ValueError naming the config key for a configuration ``sample`` cannot reproduce
        (Karras/exponential/beta/Lu sigmas, thresholding, dynamic shifting, an unknown
        prediction_type, latents scaled by ``init_noise_sigma != 1``).
    """
    config = scheduler.config
    for key in UNSUPPORTED_CONFIG:
        if config.get(key):
            raise ValueError(f"scheduler config {key}={config[key]!r} is not supported by denoise; "
                             f"build the scheduler with {key} off")
    init_sigma = getattr(scheduler, "init_noise_sigma", 1.0)
    if float(init_sigma) != 1.0:
        raise ValueError(f"{type(scheduler).__name__} scales its latents by init_noise_sigma={float(init_sigma):g} "
                         "(variance-exploding coordinates); denoise expects standard normal latents: build a "
                         "DPMSolverMultistepScheduler.from_config(scheduler.config) instead")
    flow = translation.is_flow_matching(config)
    prediction = translation.prediction(config)
    sde = str(config.get("algorithm_type", "")).startswith("sde")
    if solver is None:
        solver, default_order = _default_solver(scheduler, config)
        order = default_order if order is None else order
    elif order is None and solver in ("dpmpp", "deis"):
        order = config.get("solver_order")
    fresh = type(scheduler).from_config(config)
    fresh.set_timesteps(num_inference_steps)
    if flow:
        grid = fresh.sigmas.to(torch.float64).clone()
        denoise_to_zero = bool(grid[-1] == 0)
        if denoise_to_zero:
            grid[-1] = grid[-2] / 2
        schedule = translation.flow_schedule(config)
        time_scale = float(config.get("num_train_timesteps", 1000))
    else:
        # The noise levels the scheduler itself uses (diffusers' float32 values), else the config's.
        if hasattr(fresh, "alphas_cumprod"):
            schedule = VPSchedule.from_alphas_cumprod(fresh.alphas_cumprod)
        else:
            schedule = translation.vp_schedule(config)
        grid = torch.cat([fresh.timesteps.to(torch.float64).cpu(), torch.zeros(1, dtype=torch.float64)])
        final = config.get("final_sigmas_type") or "sigma_min"
        if final not in translation.FINAL_SIGMAS_TYPES:
            raise translation.config_error("final_sigmas_type", final, translation.FINAL_SIGMAS_TYPES)
        denoise_to_zero = final == "zero" or bool(config.get("set_alpha_to_one", False))
        time_scale = 1.0
    return SamplingSetup(schedule=schedule, timesteps=grid, time_scale=time_scale,
                         prediction=prediction, solver=solver, order=order, sde=sde,
                         lower_order_final=bool(config.get("lower_order_final", True)),
                         denoise_to_zero=denoise_to_zero)


def _network(pipe_or_unet) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        net = getattr(pipe_or_unet, name, None)
        if isinstance(net, torch.nn.Module):
            return net
    if isinstance(pipe_or_unet, torch.nn.Module):
        return pipe_or_unet
    raise TypeError(f"expected a diffusers pipeline with .unet or .transformer, or the network itself; "
                    f"got {type(pipe_or_unet).__name__}")


class NetworkCall:
    """``model(x, t[, cond])`` over a diffusers UNet or transformer, for ``sample``.

    cond is a dict: ``"encoder_hidden_states"`` and the added conditioning keys prefixed by
    ``"added_cond_kwargs."``; a network whose forward takes ``added_cond_kwargs`` (SDXL UNets)
    receives them as that dict, any other (transformers: ``pooled_projections``) as keywords.
    """

    def __init__(self, net: torch.nn.Module, time_scale: float, model_kwargs: Mapping | None = None):
        self.net, self.time_scale = net, time_scale
        self.model_kwargs = dict(model_kwargs or {})
        params = inspect.signature(net.forward).parameters
        self.takes_added_dict = "added_cond_kwargs" in params
        self.takes_encoder = _ENCODER_KEY in params

    def __call__(self, x: Tensor, t: Tensor, cond: Mapping | None = None) -> Tensor:
        kwargs = dict(self.model_kwargs)
        if cond is not None:
            added = {k[len(_ADDED_PREFIX):]: v for k, v in cond.items() if k.startswith(_ADDED_PREFIX)}
            if _ENCODER_KEY in cond:
                kwargs[_ENCODER_KEY] = cond[_ENCODER_KEY]
            if added and self.takes_added_dict:
                kwargs["added_cond_kwargs"] = added
            else:
                kwargs.update(added)
        timestep = t * self.time_scale if self.time_scale != 1.0 else t
        return self.net(x, timestep=timestep, return_dict=False, **kwargs)[0]


def _conditioning(prompt_embeds, added_cond_kwargs):
    if prompt_embeds is None and not added_cond_kwargs:
        return None
    cond = {} if prompt_embeds is None else {_ENCODER_KEY: prompt_embeds}
    for key, value in (added_cond_kwargs or {}).items():
        cond[_ADDED_PREFIX + key] = value
    return cond


def _guided(guidance_scale) -> bool:
    """diffusers' ``do_classifier_free_guidance``: a scale above 1 (any tensor scale counts)."""
    if guidance_scale is None:
        return False
    return isinstance(guidance_scale, Tensor) or (isinstance(guidance_scale, Number) and guidance_scale > 1)


def denoise(pipe_or_unet, latents: Tensor, scheduler, prompt_embeds: Tensor | None = None,
            negative_prompt_embeds: Tensor | None = None, guidance_scale: float | Tensor | None = None,
            num_inference_steps: int = 50, grad: str | None = "discrete",
            added_cond_kwargs: Mapping[str, Tensor] | None = None,
            negative_added_cond_kwargs: Mapping[str, Tensor] | None = None, solver: str | None = None,
            order: int | None = None, generator: torch.Generator | None = None,
            model_kwargs: Mapping | None = None, progress: bool = False, **sample_kwargs) -> Tensor:
    """A diffusers pipeline's denoising loop, differentiable in the latents, the embeddings and the weights.

    Equivalent to the pipeline's loop (``for t in scheduler.timesteps: noise_pred = unet(...);
    latents = scheduler.step(...)``) with classifier-free guidance, run as one ``adjointdeis.sample``
    call and attached to autograd per `grad`. It returns the final latents (not decoded).

    Args:
        pipe_or_unet: a pipeline (its ``.unet`` or ``.transformer`` is used) or the network itself
            (``UNet2DConditionModel``, ``UNet2DModel``, a diffusers transformer).
        latents: (batch, C, H, W) initial standard normal latents (what ``pipe.prepare_latents``
            returns for schedulers with ``init_noise_sigma == 1``).
        scheduler: the diffusers scheduler whose configuration (betas / alphas_cumprod,
            prediction_type, timestep_spacing, steps_offset, final_sigmas_type, flow settings)
            defines the schedule and grid; it is not modified. See :func:`setup_from_scheduler`.
        prompt_embeds: (batch, seq, dim) text embeddings, the ``encoder_hidden_states``; None for
            an unconditional network (``UNet2DModel``).
        negative_prompt_embeds: (batch, seq, dim) embeddings of the unconditional branch; needed
            when guidance is on.
        guidance_scale: classifier-free guidance scale w (``uncond + w (cond - uncond)``, both
            branches in one batched call); as in diffusers, guidance is on for w > 1 (or any tensor).
        num_inference_steps: N.
        grad: "discrete" (exact gradient, one network re-run per step), "adjoint" (AdjointDEIS),
            "autograd" or None; see ``adjointdeis.sample``.
        added_cond_kwargs: extra conditioning tensors, batch-leading (SDXL ``text_embeds``,
            ``time_ids``; SD3 ``pooled_projections``); they receive gradients like the embeddings.
        negative_added_cond_kwargs: the unconditional branch's; defaults to `added_cond_kwargs`.
        solver, order: override the solver implied by the scheduler (see :func:`setup_from_scheduler`).
        generator: noise for SDE configs (``algorithm_type="sde-dpmsolver++"``).
        model_kwargs: constant keyword arguments for every network call (``cross_attention_kwargs``...).
        progress: show a progress bar.
        **sample_kwargs: passed to ``adjointdeis.sample`` (``adjoint_order``, ``adjoint_form``,
            ``parameters``, ``check_finite``...); they override what the scheduler implies
            (``sde``, ``lower_order_final``, ``denoise_to_zero``).

    Returns:
        (batch, C, H, W) the denoised latents, latents' dtype, attached to autograd.

    Raises:
        ValueError for a scheduler configuration that cannot be reproduced (naming the key),
        guidance without negative_prompt_embeds, or embeddings given to a network that takes none.
    """
    net = _network(pipe_or_unet)
    setup = setup_from_scheduler(scheduler, num_inference_steps, solver, order)
    call = NetworkCall(net, setup.time_scale, model_kwargs)
    if prompt_embeds is not None and not call.takes_encoder:
        raise ValueError(f"{type(net).__name__} takes no encoder_hidden_states; pass prompt_embeds=None")
    cond = _conditioning(prompt_embeds, added_cond_kwargs)
    uncond, scale = None, None
    if _guided(guidance_scale):
        if negative_prompt_embeds is None and prompt_embeds is not None:
            raise ValueError("guidance_scale > 1 needs negative_prompt_embeds (the unconditional branch)")
        negative_added = added_cond_kwargs if negative_added_cond_kwargs is None else negative_added_cond_kwargs
        uncond = _conditioning(negative_prompt_embeds, negative_added)
        if cond is None or uncond is None:
            raise ValueError("guidance_scale > 1 needs conditioning for both branches")
        scale = guidance_scale
    parameters = sample_kwargs.pop("parameters", None)
    if parameters is None:
        parameters = [p for p in net.parameters() if p.requires_grad]
    options = {**setup.sample_kwargs(), **sample_kwargs}
    return sample(call, latents, setup.schedule, steps=num_inference_steps, cond=cond, uncond=uncond,
                  guidance_scale=scale, grad=grad, generator=generator, parameters=parameters, progress=progress,
                  **options)
