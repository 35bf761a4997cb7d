"""``denoise``: a diffusers pipeline's denoising loop through ``adjointdeis.sample``, with gradients.

diffusers runs its loop under ``torch.no_grad``; here the same loop (same UNet or transformer, same
scheduler configuration and grid, same guidance) is one ``sample`` call, so ``loss(latents).backward()``
reaches the initial latents, the prompt embeddings and the network's weights through our gradient modes.
It takes every config ``FusedMultistepScheduler`` takes (the grid comes from the same translation,
:mod:`adjointdeis.diffusers.config`), and the conventions of the pipelines that drive the network:
UNet pipelines (integer timesteps, batched classifier-free guidance), ``StableDiffusion3Pipeline``
(1000-scale float timesteps, pooled projections, batched CFG, ``mu`` only with dynamic shifting) and
``FluxPipeline`` (packed latents, the pipeline's ``sigmas`` and ``mu``, timesteps / 1000, text and image ids,
the guidance embedding, and "true CFG").
"""

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from numbers import Number

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .. import validation
from ..predictions import to_data_and_noise
from ..reference import opmath_dtype
from ..sampling import sample
from ..schedules import FlowSchedule, NoiseSchedule, _Interval
from ..thresholding import DynamicThreshold
from . import config as translation

_ENCODER_KEY = "encoder_hidden_states"
_ADDED_PREFIX = "added_cond_kwargs."
# The pipelines whose network call and grid arguments ``denoise`` reproduces, by network class.
_FLUX, _SD3 = "FluxTransformer2DModel", "SD3Transformer2DModel"


class VELevelSchedule(NoiseSchedule):
    """A VP schedule whose time is the VE noise level ``t = sigma/alpha``: ``alpha = 1/sqrt(1 + t^2)``.

    The variable of diffusers' DPM-Solver and DEIS grids, so that a grid of their levels (karras, exponential,
    beta, log-SNR, custom) is a grid of this schedule exactly; t = 0 is zero noise.
    """

    is_variance_preserving = True

    def __init__(self, t_min: float, t_max: float):
        self.t_min, self.t_max = t_min, t_max

    @property
    def time_domain(self) -> _Interval:
        return _Interval(0.0, math.inf, True, False)

    def _log_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * torch.log1p(t * t)

    def _alpha(self, t: Tensor) -> Tensor:
        return 1.0 / torch.sqrt(1.0 + t * t)

    def _sigma(self, t: Tensor) -> Tensor:
        return t / torch.sqrt(1.0 + t * t)

    def _log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(t) - 0.5 * torch.log1p(t * t)

    def _time_from_half_log_snr(self, lam: Tensor) -> Tensor:
        return torch.exp(-lam)

    def __repr__(self) -> str:
        return f"VELevelSchedule(t_min={self.t_min!r}, t_max={self.t_max!r})"


def _on(cache: dict, table: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """`table` on `device` in `dtype`, copied there once (a host-to-device copy from pageable memory may wait)."""
    key = (device, dtype)
    if key not in cache:
        cache[key] = table.to(device=device, dtype=dtype)
    return cache[key]


class NoiseScaleSchedule(NoiseSchedule):
    """A VP schedule whose time is its noise scale ``t = sigma``: ``alpha = sqrt(1 - t^2)``.

    The variable of the grids of other schedulers (DDIM, DDPM, PNDM, UniPC, ...): finite at every level, pure
    noise (t = 1, the last timestep of a zero-terminal-SNR schedule) included; t = 0 is zero noise.
    """

    is_variance_preserving = True

    def __init__(self, t_min: float, t_max: float):
        self.t_min, self.t_max = t_min, t_max

    @property
    def time_domain(self) -> _Interval:
        return _Interval(0.0, 1.0, True, True)

    def _log_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * torch.log1p(-t * t)

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.sqrt((1.0 - t) * (1.0 + t))

    def _sigma(self, t: Tensor) -> Tensor:
        return t

    def _log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(t)

    def _time_from_half_log_snr(self, lam: Tensor) -> Tensor:
        return torch.exp(-0.5 * torch.logaddexp(torch.zeros_like(lam), 2.0 * lam))

    def __repr__(self) -> str:
        return f"NoiseScaleSchedule(t_min={self.t_min!r}, t_max={self.t_max!r})"


@dataclass(frozen=True)
class OffGridTimesteps:
    """The network's timestep at a level off the sampling grid (the finer grid of ``grad="adjoint"`` with
    ``adjoint_steps``), as diffusers maps a level to a timestep: a flow time t to ``t T`` (``(1 - t) T`` with
    ``invert_sigmas``), a VP level to the training index interpolated in log level over the training timesteps'
    levels (``_sigma_to_t``).

    Attributes:
        scale: T, the training timesteps.
        table: (T,) float64 levels of the training timesteps 0..T-1, in the grid's variable (VP); None for flow.
        inverted: FlowMatch's ``invert_sigmas``.
    """

    scale: int
    table: Tensor | None = None
    inverted: bool = False
    copies: dict = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, level: Tensor) -> Tensor:
        """(batch,) float32 timesteps of levels `level` (batch,), on its device (no host sync)."""
        level = level.to(torch.float64)
        if self.table is None:
            return ((1 - level if self.inverted else level) * self.scale).to(torch.float32)
        logs = _on(self.copies, self.table.log(), level.device, torch.float64)
        u = level.clamp(min=float(self.table[0]), max=float(self.table[-1])).log()
        high = torch.searchsorted(logs, u).clamp(1, len(logs) - 1)
        low = high - 1
        weight = ((u - logs[low]) / (logs[high] - logs[low])).clamp(0, 1)
        return (low + weight).to(torch.float32)


@dataclass(frozen=True)
class DDIMRows:
    """diffusers' DDIM steps where a grid of their own levels cannot give them, as x0 predictions on another grid.

    ``DDIMScheduler.step`` evaluates the network at timestep tau_i, of noise level d_i, and lands at
    ``tau_i - T // N``, of level l_i: ``x_next = alpha_l x0 + sigma_l eps``, x0 thresholded after eps is taken
    from the network's output. With ``timestep_spacing`` "trailing" or "linspace", l_i need not be the next
    timestep's level, and the next step reads the state as if it lay at its own. ``denoise`` then samples the grid
    ``(d_0, l_0, ..., l_{N-1})`` with solver "ddim" on x0 predictions; row i, from g_i (``l_{i-1}``, ``g_0 = d_0``)
    to l_i, computes ``x_next = (sigma_l / sigma_g) x + B x0`` with ``B = alpha_l - sigma_l alpha_g / sigma_g``,
    so the network's output at row i becomes the x0 that makes this diffusers' step (:meth:`express`).

    Attributes:
        prediction: what the network predicts (our name).
        threshold: diffusers' thresholding of x0, or None.
        table: (N, 6) float64, per row ``alpha_d, sigma_d, alpha_l, sigma_l, sigma_l / sigma_g, B``.
    """

    prediction: str
    threshold: DynamicThreshold | None
    table: Tensor
    copies: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, evaluated: Tensor, grid: Tensor, prediction: str, threshold: DynamicThreshold | None) -> "DDIMRows":
        """From the noise scales (VP sigma) of the N evaluations and of the N+1 grid points."""
        alpha = lambda sigma: torch.sqrt((1 - sigma) * (1 + sigma))  # noqa: E731
        sigma_g, sigma_l = grid[:-1], grid[1:]
        skip = sigma_l / sigma_g
        table = torch.stack([alpha(evaluated), evaluated, alpha(sigma_l), sigma_l, skip,
                             alpha(sigma_l) - skip * alpha(sigma_g)], 1)
        return cls(prediction, threshold, table)

    def express(self, x: Tensor, out: Tensor, row: Tensor) -> Tensor:
        """The x0 that row `row` (batch,) needs for diffusers' step, from the network's output `out` at `x`."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        table = _on(self.copies, self.table, x.device, opmath_dtype(x.dtype))[row]
        alpha_d, sigma_d, alpha_l, sigma_l, skip, weight = (c.reshape(shape) for c in table.unbind(1))
        x0, eps = to_data_and_noise(out, x, alpha_d, sigma_d, self.prediction)
        if self.threshold is not None:
            x0 = self.threshold(x0)
        return ((alpha_l * x0 + sigma_l * eps - skip * x) / weight).to(out.dtype)


@dataclass(frozen=True)
class SamplingSetup:
    """What a diffusers scheduler configuration means for ``sample``.

    Attributes:
        schedule: the noise schedule, in the grid's own variable (flow t, or the VE level sigma/alpha).
        levels: (N+1,) float64 grid, noisiest first; the last is where the last step lands (0: zero noise).
        timesteps: (N,) the model timesteps diffusers passes at ``levels[:-1]`` (float64).
        prediction, solver, order, sde, lower_order_final, euler_at_final, second_order, threshold: as in
            ``sample``.
        output_sign: -1 when the network's output is the negated prediction (FlowMatch's ``invert_sigmas``).
        learned_variance: the network's output carries a variance in its second half of channels.
        ddim: DDIM's steps where its own grid cannot give them (:class:`DDIMRows`; `prediction` is then "x0"
            and `threshold` None), or None.
        off_grid: the network's timestep at a level off the grid (:class:`OffGridTimesteps`).
    """

    schedule: NoiseSchedule
    levels: Tensor
    timesteps: Tensor
    prediction: str
    solver: str
    order: int
    sde: bool
    lower_order_final: bool
    euler_at_final: bool
    second_order: str
    threshold: DynamicThreshold | None
    output_sign: float = 1.0
    learned_variance: bool = False
    ddim: DDIMRows | None = None
    off_grid: OffGridTimesteps | None = None

    def sample_kwargs(self) -> dict:
        """``sample``'s grid and solver arguments: N timesteps and zero noise, or the N+1 levels."""
        to_zero = bool(self.levels[-1] == 0)
        grid = dict(steps=len(self.levels) - 1, timesteps=self.levels[:-1] if to_zero else self.levels,
                    denoise_to_zero=to_zero)
        return dict(grid, prediction=self.prediction, solver=self.solver, order=self.order, sde=self.sde,
                    lower_order_final=self.lower_order_final, euler_at_final=self.euler_at_final,
                    second_order=self.second_order, threshold=self.threshold)


def _family_config(scheduler) -> tuple[dict, str | None]:
    """The scheduler's config with its class name, and its family when it is one our scheduler reproduces."""
    config = dict(scheduler.config)
    name = type(scheduler).__name__
    references = {f.reference for f in translation.FAMILIES.values()} | set(translation.FUSED_CLASS_FAMILIES)
    if "family" in config or name in references:
        config.setdefault("_class_name", name)
        return config, translation.detect_family(config)
    return config, None


def setup_from_scheduler(scheduler, num_inference_steps: int | None, solver: str | None = None,
                         order: int | None = None, timesteps=None, sigmas=None,
                         mu: float | None = None) -> SamplingSetup:
    """Our schedule, grid and solver from a diffusers scheduler's configuration (the scheduler is not modified).

    DPMSolverMultistep, DEISMultistep, FlowMatchEuler, FlowMatchHeun and our schedulers: the grid of
    ``set_timesteps(num_inference_steps | timesteps | sigmas, mu)`` as ``FusedMultistepScheduler`` computes it,
    every config key honoured. Any other scheduler (DDIM, DDPM, PNDM, UniPC, ...): its own timesteps, taken from
    a fresh instance (a repeated one, PNDM's, once), at the levels its steps use (its ``sigmas`` where it has
    them, VE or flow; else its ``alphas_cumprod`` there, zero terminal SNR included), and the end at zero noise
    when it says so (``final_sigmas_type="zero"``, DDIM's ``set_alpha_to_one``) or else at its cleanest level (a
    last timestep there makes the last step the identity, as in DDIM). DDIM runs diffusers' DDIM steps (landing
    at ``t - T // N`` and thresholding as diffusers does, :class:`DDIMRows`), the others DPM-Solver++(2M).

    Args:
        scheduler: a diffusers scheduler whose latents start as standard normal noise (``init_noise_sigma == 1``).
        num_inference_steps, timesteps, sigmas, mu: as for the scheduler's ``set_timesteps``.
        solver, order: override the solver the configuration implies.

    Raises:
        ValueError naming the config key for a configuration it cannot reproduce, or for latents scaled by
        ``init_noise_sigma != 1``.
    """
    init_sigma = getattr(scheduler, "init_noise_sigma", 1.0)
    if float(init_sigma) != 1.0:
        raise ValueError(f"{type(scheduler).__name__} scales its latents by init_noise_sigma={float(init_sigma):g} "
                         "(variance-exploding coordinates); denoise expects standard normal latents: build a "
                         "DPMSolverMultistepScheduler.from_config(scheduler.config) instead")
    config, family = _family_config(scheduler)
    overrides = {k: v for k, v in (("solver", solver), ("solver_order", order)) if v is not None}
    if family is None:
        return _setup_from_own_timesteps(scheduler, config, num_inference_steps, overrides, timesteps)
    config.update(overrides)
    spec = translation.translate(config, family)
    if not translation.FAMILIES[family].flow:
        if mu is not None and not config.get("use_dynamic_shifting"):
            raise ValueError("denoise: mu needs use_dynamic_shifting=True in the scheduler config")
        given = [v for v in (num_inference_steps, timesteps, sigmas) if v is not None]
        if len(given) != 1:
            raise ValueError("denoise: pass exactly one of num_inference_steps, timesteps or sigmas for this scheduler")
    grid = translation.grid(config, spec, num_inference_steps, timesteps, sigmas, mu,
                            getattr(scheduler, "_shift", None))  # FlowMatch's set_shift
    levels = torch.tensor(grid.levels, dtype=torch.float64)
    count = config.get("num_train_timesteps", 1000)
    if spec.flow:
        off_grid = OffGridTimesteps(count, inverted=bool(config.get("invert_sigmas")))
    else:
        products = translation.alphas_cumprod(config, torch.float32)[1].to(torch.float64)
        off_grid = OffGridTimesteps(count, ((1 - products) / products).sqrt())
    return replace(_setup(spec, levels, grid.timesteps), off_grid=off_grid)


def _setup(spec: translation.SchedulerSpec, levels: Tensor, timesteps: Tensor,
           schedule: type[NoiseSchedule] = VELevelSchedule) -> SamplingSetup:
    """The setup of a grid: its schedule in the grid's variable (`schedule`, or flow t for a flow spec), with t_min
    below the cleanest non-zero level."""
    t_min, t_max = 0.5 * float(levels[levels > 0].min()), float(levels[0])
    schedule = FlowSchedule(t_min=t_min, t_max=t_max) if spec.flow else schedule(t_min, t_max)
    return SamplingSetup(schedule, levels, timesteps.to(torch.float64), spec.prediction, spec.solver, spec.order,
                         spec.sde, spec.lower_order_final, spec.euler_at_final, spec.second_order, spec.threshold,
                         spec.output_sign, spec.learned_variance)


def _setup_from_own_timesteps(scheduler, config: dict, steps: int | None, overrides: dict, timesteps) -> SamplingSetup:
    name = type(scheduler).__name__
    is_ddim = name.startswith("DDIM")
    if is_ddim and config.get("clip_sample"):
        raise ValueError("scheduler config: clip_sample=True (DDIM clamps x0 to clip_sample_range) is not supported "
                         "by denoise; set clip_sample=False (or thresholding=True, which is)")
    fresh = type(scheduler).from_config(config)
    if timesteps is not None:
        fresh.set_timesteps(timesteps=timesteps)
    else:
        fresh.set_timesteps(steps)
    if not hasattr(fresh, "alphas_cumprod"):
        raise ValueError(f"denoise: {name} has no alphas_cumprod; use a DPM-Solver, DEIS or "
                         "FlowMatch scheduler (or FusedMultistepScheduler.from_config of this config)")
    final = config.get("final_sigmas_type") or "sigma_min"
    if final not in translation.FINAL_SIGMAS_TYPES:
        raise translation.config_error("final_sigmas_type", final, translation.FINAL_SIGMAS_TYPES)
    spec = translation.translate({**config, "solver": "ddim" if is_ddim else "dpmpp", "solver_order": 2,
                                  "algorithm_type": None, "solver_type": None, "final_sigmas_type": final,
                                  **overrides}, "dpmsolver")
    model_times = fresh.timesteps.cpu()
    sigmas = getattr(fresh, "sigmas", None)
    noise = torch.sqrt(1 - fresh.alphas_cumprod.cpu().to(torch.float32).to(torch.float64))  # VP sigma per timestep
    off_grid = OffGridTimesteps(len(noise), None if spec.flow else noise)
    if isinstance(sigmas, Tensor) and len(sigmas) == len(model_times) + 1:  # the levels its steps use, end included
        levels = sigmas.cpu().to(torch.float64)
        if not spec.flow:
            levels = levels / torch.sqrt(1 + levels * levels)  # VE sigma/alpha -> VP sigma
    elif spec.flow:
        raise ValueError(f"scheduler config: use_flow_sigmas=True, but {name} has no flow sigmas to run")
    else:
        to_zero = final == "zero" or bool(config.get("set_alpha_to_one", False))
        end = torch.zeros(1, dtype=torch.float64) if to_zero else noise[:1]
        if is_ddim:
            return replace(_ddim_setup(spec, noise, model_times.to(torch.int64), end,
                                       config["num_train_timesteps"] // fresh.num_inference_steps), off_grid=off_grid)
        levels = torch.cat([noise[model_times.to(torch.int64)], end])
    kept = torch.cat([torch.ones(1, dtype=torch.bool), model_times[1:] != model_times[:-1]])  # PNDM repeats one
    levels = torch.cat([levels[:-1][kept], levels[-1:]])
    return replace(_setup(spec, levels, model_times[kept], NoiseScaleSchedule), off_grid=off_grid)


def _ddim_setup(spec: translation.SchedulerSpec, noise: Tensor, model_times: Tensor, end: Tensor,
                stride: int) -> SamplingSetup:
    """DDIM's setup: its grid where every step lands on the next timestep and nothing is thresholded, else the
    landing grid with :class:`DDIMRows`."""
    prev = model_times - stride
    landing = torch.where(prev >= 0, noise[prev.clamp(min=0)], end)
    evaluated = noise[model_times]
    grid = torch.cat([evaluated[:1], landing])
    setup = _setup(spec, grid, model_times, NoiseScaleSchedule)
    if torch.equal(prev[:-1], model_times[1:]) and spec.threshold is None:
        return setup
    return replace(setup, prediction="x0", threshold=None,
                   ddim=DDIMRows.of(evaluated, grid, spec.prediction, spec.threshold))


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

    ``t`` is a grid level; the network gets diffusers' timestep there (looked up on the device by exact
    equality, so nothing is read back), scaled as its pipeline scales it (FLUX: cast to the latents' dtype and
    divided by 1000). cond is a dict: ``"encoder_hidden_states"`` and the added conditioning keys prefixed by
    ``"added_cond_kwargs."``; a network whose forward takes ``added_cond_kwargs`` (SDXL UNets) receives them as
    that dict, any other (transformers: ``pooled_projections``) as keywords.
    """

    def __init__(self, net: torch.nn.Module, setup: SamplingSetup, model_kwargs: Mapping | None = None):
        self.net = net
        self.levels = setup.levels[:-1]
        self.timesteps = setup.timesteps
        self.ddim, self.off_grid = setup.ddim, setup.off_grid
        self.sign, self.learned_variance = setup.output_sign, setup.learned_variance
        self.flux = type(net).__name__ == _FLUX
        self.model_kwargs = dict(model_kwargs or {})
        params = inspect.signature(net.forward).parameters
        self.takes_added_dict = "added_cond_kwargs" in params
        self.takes_encoder = _ENCODER_KEY in params
        self.copies: dict[str, dict] = {"levels": {}, "timesteps": {}}

    def _hits(self, t: Tensor) -> Tensor:
        return t[:, None] == _on(self.copies["levels"], self.levels, t.device, t.dtype)[None]

    def row(self, t: Tensor) -> Tensor:
        """The grid index of grid levels `t` (batch,)."""
        return self._hits(t).to(torch.int64).argmax(1)

    def timestep(self, x: Tensor, t: Tensor) -> Tensor:
        """The network's timestep for levels `t` (batch,): diffusers' at a grid level, else :attr:`off_grid`'s."""
        hits = self._hits(t)
        timesteps = _on(self.copies["timesteps"], self.timesteps, t.device, torch.float32)
        timestep = timesteps[hits.to(torch.int64).argmax(1)]
        if self.off_grid is not None:
            timestep = torch.where(hits.any(1), timestep, self.off_grid(t))
        return timestep.to(x.dtype) / 1000 if self.flux else timestep

    def __call__(self, x: Tensor, t: Tensor, cond: Mapping | None = None, net: torch.nn.Module | None = None) -> Tensor:
        """The prediction at x, levels t (batch,); `net`: the network to call instead of :attr:`net` (its shadow
        copy, :class:`NetworkModule`)."""
        kwargs = dict(self.model_kwargs)
        if cond is not None:
            added = {k[len(_ADDED_PREFIX):]: v for k, v in cond.items() if k.startswith(_ADDED_PREFIX)}
            if _ENCODER_KEY in cond:
                kwargs[_ENCODER_KEY] = cond[_ENCODER_KEY]
            if added and self.takes_added_dict:
                kwargs["added_cond_kwargs"] = added
            else:
                kwargs.update(added)
        net = self.net if net is None else net
        out = net(x, timestep=self.timestep(x, t), return_dict=False, **kwargs)[0]
        if self.learned_variance and out.shape[1] != x.shape[1]:
            out = out[:, :x.shape[1]]
        out = -out if self.sign < 0 else out
        return out if self.ddim is None else self.ddim.express(x, out, self.row(t))


class NetworkModule(torch.nn.Module):
    """A :class:`NetworkCall` as a module with its network as the submodule ``net``: ``sample`` then treats it as it
    treats a module (grad="discrete" and "adjoint" re-run a shadow of it in the reverse pass and keep the network's
    train-mode buffers, BatchNorm running statistics; its parameter gradients accumulate in place), so the reverse
    pass changes nothing in the user's network."""

    def __init__(self, call: NetworkCall):
        super().__init__()
        self.net, self.call = call.net, call

    def forward(self, x: Tensor, t: Tensor, cond: Mapping | None = None) -> Tensor:
        return self.call(x, t, cond, net=self.net)


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


def _pipeline_grid(net, scheduler, latents: Tensor, steps: int | None, sigmas, mu):
    """The ``sigmas`` and ``mu`` the network's pipeline passes to ``set_timesteps`` (unless given)."""
    config = scheduler.config
    name = type(net).__name__
    if name == _FLUX:
        if sigmas is None and steps is not None and not config.get("use_flow_sigmas"):
            sigmas = np.linspace(1.0, 1 / steps, steps)
        if mu is None:
            mu = _calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256),
                                  config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                  config.get("max_shift", 1.15))
        return (None if sigmas is not None else steps), sigmas, mu
    if name == _SD3 and mu is None and config.get("use_dynamic_shifting"):
        patch = net.config.patch_size
        mu = _calculate_shift((latents.shape[2] // patch) * (latents.shape[3] // patch),
                              config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                              config.get("base_shift", 0.5), config.get("max_shift", 1.16))
    return (None if sigmas is not None else steps), sigmas, mu


def _calculate_shift(seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """The pipelines' resolution-dependent shift: linear in the image sequence length."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + (base_shift - m * base_seq_len)


def _flux_kwargs(net, latents: Tensor, prompt_embeds: Tensor | None, guidance_scale, height: int | None,
                 width: int | None) -> dict:
    """FluxPipeline's constant transformer arguments: text and image ids, and the guidance embedding's input."""
    seq = latents.shape[1]
    rows, cols = (math.isqrt(seq),) * 2 if height is None or width is None else (height, width)
    if rows * cols != seq:
        raise ValueError(f"denoise: FLUX image ids of {rows} x {cols} tokens for latents of {seq} tokens; pass "
                         "height= and width= (the packed latents' rows and columns)")
    ids = torch.zeros(rows, cols, 3, dtype=latents.dtype, device=latents.device)
    ids[..., 1] += torch.arange(rows, device=latents.device)[:, None]
    ids[..., 2] += torch.arange(cols, device=latents.device)[None, :]
    text = 0 if prompt_embeds is None else prompt_embeds.shape[1]
    kwargs = dict(img_ids=ids.reshape(rows * cols, 3),
                  txt_ids=torch.zeros(text, 3, dtype=latents.dtype, device=latents.device), joint_attention_kwargs={})
    if net.config.guidance_embeds:
        scale = 3.5 if guidance_scale is None else guidance_scale
        # FluxPipeline expands it to the batch; one value broadcasts the same, also over a guided batch.
        kwargs["guidance"] = torch.full([1], scale, dtype=torch.float32, device=latents.device)
    return kwargs


def denoise(pipe_or_unet, latents: Tensor, scheduler, prompt_embeds: Tensor | None = None,
            negative_prompt_embeds: Tensor | None = None, guidance_scale: float | Tensor | None = None,
            num_inference_steps: int | None = 50, grad: str | None = "discrete",
            added_cond_kwargs: Mapping[str, Tensor] | None = None,
            negative_added_cond_kwargs: Mapping[str, Tensor] | None = None, solver: str | None = None,
            order: int | None = None, generator: torch.Generator | None = None,
            model_kwargs: Mapping | None = None, progress: bool = False, *, sigmas=None, timesteps=None,
            mu: float | None = None, true_cfg_scale: float | None = None, height: int | None = None,
            width: int | None = None, **sample_kwargs) -> Tensor:
    """A diffusers pipeline's denoising loop, differentiable in the latents, the embeddings and the weights.

    Equivalent to the pipeline's loop (``for t in scheduler.timesteps: noise_pred = net(...);
    latents = scheduler.step(...)``) with its guidance, run as one ``adjointdeis.sample`` call and attached to
    autograd per `grad`. It returns the final latents (not decoded): the pipeline's ``output_type="latent"``.

    Args:
        pipe_or_unet: a pipeline (its ``.unet`` or ``.transformer`` is used) or the network itself
            (``UNet2DConditionModel``, ``UNet2DModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ...).
        latents: the initial standard normal latents as ``pipe.prepare_latents`` returns them: (batch, C, H, W);
            FLUX's packed (batch, tokens, 4C).
        scheduler: the diffusers scheduler whose configuration defines the schedule, the grid and the solver
            (not modified); see :func:`setup_from_scheduler`.
        prompt_embeds: (batch, seq, dim) text embeddings, the ``encoder_hidden_states``; None for an
            unconditional network (``UNet2DModel``).
        negative_prompt_embeds: (batch, seq, dim) embeddings of the unconditional branch; needed when
            classifier-free guidance is on.
        guidance_scale: classifier-free guidance scale w (``uncond + w (cond - uncond)``, both branches in one
            batched call); as in diffusers, on for w > 1 (or any tensor). For FLUX it is the guidance
            embedding's input, as in FluxPipeline (default 3.5); its CFG is `true_cfg_scale`.
        num_inference_steps: N.
        grad: "discrete" (exact gradient, one network re-run per step), "adjoint" (AdjointDEIS),
            "autograd" or None; see ``adjointdeis.sample``.
        added_cond_kwargs: extra conditioning tensors, batch-leading (SDXL ``text_embeds``, ``time_ids``; SD3
            and FLUX ``pooled_projections``); they receive gradients like the embeddings.
        negative_added_cond_kwargs: the unconditional branch's; defaults to `added_cond_kwargs`.
        solver, order: override the solver implied by the scheduler (DPM-Solver++ on FlowMatch's grid, ...).
        generator: noise for stochastic configs (SDE algorithms, FlowMatch's ``stochastic_sampling``), drawn as
            diffusers' schedulers draw it (float32, on the generator's device: :class:`SchedulerNoise`); it ends
            where diffusers' loop leaves it.
        model_kwargs: constant keyword arguments for every network call (``cross_attention_kwargs``...).
        progress: show a progress bar.
        sigmas, timesteps, mu: the arguments of the scheduler's ``set_timesteps``; by default what the pipeline
            passes (FLUX: ``sigmas = linspace(1, 1/N, N)`` and ``mu`` from the packed sequence length; SD3: ``mu``
            with dynamic shifting).
        true_cfg_scale: FLUX's true classifier-free guidance with `negative_prompt_embeds` (> 1 turns it on).
        height, width: FLUX only: the latent grid in tokens (rows, columns) for the image ids; default square.
        **sample_kwargs: passed to ``adjointdeis.sample`` (``adjoint_order``, ``adjoint_form``, ``parameters``,
            ``check_finite``...); they override what the scheduler implies.

    Returns:
        The denoised latents, shaped and typed like `latents`, attached to autograd.

    Raises:
        ValueError for a scheduler configuration that cannot be reproduced (naming the key), guidance without
        negative_prompt_embeds, or embeddings given to a network that takes none.
    """
    net = _network(pipe_or_unet)
    validation.floating(latents, "latents", min_dim=1)
    validation.instance(getattr(scheduler, "config", None), "scheduler.config", Mapping,
                        "the config of a diffusers scheduler (pass pipe.scheduler)")
    if num_inference_steps is not None:
        validation.count(num_inference_steps, "num_inference_steps")
    steps, sigmas, mu = _pipeline_grid(net, scheduler, latents, num_inference_steps, sigmas, mu)
    if timesteps is not None:
        steps = None if sigmas is None else steps
    setup = setup_from_scheduler(scheduler, steps, solver, order, timesteps=timesteps, sigmas=sigmas, mu=mu)
    extra = dict(model_kwargs or {})
    cfg_scale = guidance_scale
    if type(net).__name__ == _FLUX:
        extra = {**_flux_kwargs(net, latents, prompt_embeds, guidance_scale, height, width), **extra}
        cfg_scale = true_cfg_scale
    if setup.ddim is not None and grad == "adjoint":
        raise ValueError("grad='adjoint' integrates the probability-flow ODE's adjoint, which these DDIM steps "
                         "(thresholded, or landing off the next timestep: timestep_spacing) do not solve: use "
                         "grad='discrete'")
    call = NetworkCall(net, setup, extra)
    if prompt_embeds is not None and not call.takes_encoder:
        raise ValueError(f"{type(net).__name__} takes no encoder_hidden_states; pass prompt_embeds=None")
    cond = _conditioning(prompt_embeds, added_cond_kwargs)
    uncond, scale = None, None
    if _guided(cfg_scale):
        if negative_prompt_embeds is None and prompt_embeds is not None:
            raise ValueError("classifier-free guidance needs negative_prompt_embeds (the unconditional branch)")
        negative_added = added_cond_kwargs if negative_added_cond_kwargs is None else negative_added_cond_kwargs
        uncond = _conditioning(negative_prompt_embeds, negative_added)
        if cond is None or uncond is None:
            raise ValueError("classifier-free guidance needs conditioning for both branches")
        scale = cfg_scale
    parameters = sample_kwargs.pop("parameters", None)
    if parameters is None:
        parameters = [p for p in net.parameters() if p.requires_grad]
    if generator is not None:
        validation.instance(generator, "generator", torch.Generator, "a torch.Generator")
        if "noise" in sample_kwargs:
            raise ValueError("denoise: pass the noise either as noise= or drawn from generator=, not both")
        sample_kwargs["noise"] = drawn = SchedulerNoise(generator)
    options = {**setup.sample_kwargs(), **sample_kwargs}
    # a module over the network (but DDP's, which sample must see itself to reach its wrapped module and group)
    model = call if isinstance(net, torch.nn.parallel.DistributedDataParallel) else NetworkModule(call)
    x = sample(model, latents, setup.schedule, cond=cond, uncond=uncond, guidance_scale=scale, grad=grad,
               parameters=parameters, progress=progress, **options)
    if generator is not None and (drawn.count or options["sde"] or options["solver"] == "renoise"):
        drawn.catch_up(len(setup.timesteps), latents)  # diffusers draws at every step, even one to zero noise
    return x


class SchedulerNoise:
    """``sample``'s ``noise(row, x)`` drawn as diffusers' schedulers draw a step's noise: float32 standard normal
    from `generator` (``randn_tensor``: on the generator's device, so a CPU generator serves CUDA latents), cast to
    x's dtype and device; the same generator then gives the pipeline's noise for every latents dtype.

    Attributes:
        count: how many draws it made.
    """

    def __init__(self, generator: torch.Generator):
        self.generator, self.count = generator, 0

    def __call__(self, row: int, x: Tensor) -> Tensor:
        self.count += 1
        return randn_tensor(x.shape, generator=self.generator, device=x.device, dtype=torch.float32).to(x.dtype)

    def catch_up(self, draws: int, x: Tensor) -> None:
        """Draws (and drops) what it takes to have made `draws` draws shaped like x: the generator then stands
        where a diffusers loop leaves it (its scheduler draws at every step, also where the noise is unused)."""
        while self.count < draws:
            self(self.count, x)
