"""The plans of k-diffusion's samplers: their updates as rows of the fused step (docs/math.md section 4.6).

Every k-diffusion sampler works in variance-exploding coordinates ``x = x0 + sigma eps`` with a denoiser
``D(x, sigma)``; each of its model evaluations becomes one row ``x_next = a x + sum_k b_k m_k + c noise``
with ``m0 = D`` (or ``m0 = (x - D)/sigma``, the Karras derivative, for the linear multistep methods). A
second stage that restarts from the step's start state reads it as one more operand
(:attr:`adjointdeis.solvers.StepPlan.skip`), so that noise injected at the midpoint (``dpmpp_sde``) needs
no inversion. The coefficients are computed once, on the host in float64, with k-diffusion's own
expressions (``t = -log sigma``, ``get_ancestral_step``); the arguments of each ``noise_sampler(sigma,
sigma_next)`` call are computed as k-diffusion computes them, on the caller's sigmas, so that a Brownian
tree queried at them returns k-diffusion's values.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .planning import SamplingPlan, SolverSettings
from .solvers import GridPoint, StepPlan

# Adams-Bashforth weights of iPNDM (ComfyUI's sample_ipndm), newest derivative first, by order.
IPNDM_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@dataclass(frozen=True)
class KRow:
    """One model evaluation of a k-diffusion sampler.

    Attributes:
        step: the step it belongs to; sigma: the noise level the model is evaluated at.
        a, b: ``x_next = a x + b0 m0 + b1 m1 + ...``: b weights m0, then `num_history` earlier outputs, then
            (with `skip`) the step's start state.
        c: the weight of the noise; noisy: whether the row draws noise (k-diffusion may draw with weight 0).
        noise_args: the ``(sigma, sigma_next)`` k-diffusion passes to its noise sampler for this draw; None for
            a plain ``randn_like`` draw (the churn of Euler, Heun and DPM-2).
        derivative: m0 is ``(x - D)/sigma`` instead of D.
        starts_step: whether the row's input is the step's start state.
    """

    step: int
    sigma: float
    a: float
    b: tuple[float, ...]
    c: float = 0.0
    noisy: bool = False
    noise_args: tuple[Tensor, Tensor] | None = None
    num_history: int = 0
    skip: bool = False
    derivative: bool = False
    starts_step: bool = True


@dataclass(frozen=True)
class KPlan:
    """A k-diffusion sampler's run: the plan, the noise-sampler arguments of its rows, what the callback reports.

    Attributes:
        plan: the :class:`SamplingPlan` ``run_plan`` runs.
        noise_args: per row, ``(sigma, sigma_next)`` tensors for the noise sampler, or None.
        sigma_hat: per step, the 0-d noise level the step's first evaluation uses (k-diffusion's callback).
        churn: the weight of the noise added to x before the first evaluation (Euler, Heun, DPM-2 churn).
        draws_churn: whether that first draw happens (k-diffusion draws it whenever churn is on).
    """

    plan: SamplingPlan
    noise_args: tuple[tuple[Tensor, Tensor] | None, ...]
    sigma_hat: tuple[Tensor, ...]
    churn: float = 0.0
    draws_churn: bool = False


def ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """k-diffusion's ``get_ancestral_step``: (sigma_down, sigma_up), 0-d tensors."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def _t(sigma: Tensor) -> Tensor:
    return sigma.log().neg()


def _sigma(t: Tensor) -> Tensor:
    return t.neg().exp()


def _euler(step: int, sigma: Tensor, target: Tensor) -> KRow:
    """``x + (x - D)/sigma (target - sigma)``."""
    dt = float(target - sigma)
    s = float(sigma)
    return KRow(step, s, 1 + dt / s, (-dt / s,))


def _first_stage(step: int, sigma: Tensor, a: float, b0: float) -> KRow:
    return KRow(step, float(sigma), a, (b0,))


def _with_noise(row: KRow, c: float, noise_args) -> KRow:
    return KRow(row.step, row.sigma, row.a, row.b, c, True, noise_args, row.num_history, row.skip, row.derivative,
                row.starts_step)


def churn_levels(sigmas: Tensor, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float,
                 window: Tensor | None = None) -> tuple[list[Tensor], list[float], bool]:
    """Karras et al.'s churn as k-diffusion applies it: per step sigma_hat, the weight of the noise added before
    its first evaluation, and whether any step churns (then k-diffusion draws one normal per step).

    Args:
        window: the caller's sigmas (their dtype), which ``s_tmin <= sigma <= s_tmax`` compares as k-diffusion does:
            in float32 for float32 sigmas, where 0.7 is the 0.7 the user typed; default `sigmas`.
    """
    n = len(sigmas) - 1
    window = sigmas if window is None else window
    hats, weights = [], []
    for i in range(n):
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= window[i] <= s_tmax else 0.0
        hat = sigmas[i] * (gamma + 1)
        hats.append(hat)
        weights.append(s_noise * float((hat**2 - sigmas[i] ** 2) ** 0.5) if gamma > 0 else 0.0)
    return hats, weights, any(w != 0 for w in weights)  # s_noise < 0 churns too


def karras_rows(kind: str, sigmas: Tensor, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float,
                window: Tensor | None = None) -> tuple[list[KRow], list[Tensor], float, bool]:
    """Rows of ``sample_euler``, ``sample_heun`` or ``sample_dpm_2`` (`kind`), with churn (`window`: see
    :func:`churn_levels`).

    The churn noise of step i+1 is added by step i's last row; step 0's before the run (returned weight).
    """
    hats, churn, churning = churn_levels(sigmas, s_churn, s_tmin, s_tmax, s_noise, window)
    rows, n = [], len(sigmas) - 1
    for i in range(n):
        hat, nxt = hats[i], sigmas[i + 1]
        if kind == "euler" or nxt == 0:
            stage = [_euler(i, hat, nxt)]
        elif kind == "heun":
            dt, h, s = float(nxt - hat), float(hat), float(nxt)
            stage = [_euler(i, hat, nxt),
                     KRow(i, s, dt / (2 * s), (-dt / (2 * s), -dt / (2 * h), 1 + dt / (2 * h)), num_history=1,
                          skip=True, starts_step=False)]
        else:
            mid = hat.log().lerp(nxt.log(), 0.5).exp()
            dt2, m = float(nxt - hat), float(mid)
            stage = [_euler(i, hat, mid), KRow(i, m, dt2 / m, (-dt2 / m, 1.0), skip=True, starts_step=False)]
        if churning and i + 1 < n:
            stage[-1] = _with_noise(stage[-1], churn[i + 1], None)
        rows += stage
    return rows, hats, churn[0], churning


def ancestral_rows(kind: str, sigmas: Tensor, device_sigmas: Tensor, eta: float, s_noise: float) -> list[KRow]:
    """Rows of ``sample_euler_ancestral``, ``sample_dpm_2_ancestral`` or ``sample_dpmpp_2s_ancestral``."""
    rows = []
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        down, up = ancestral_step(sigma, nxt, eta)
        args = (device_sigmas[i], device_sigmas[i + 1])
        if kind == "euler" or down == 0:
            stage = [_euler(i, sigma, down)]
            noisy = nxt > 0 and kind != "dpm_2"
        elif kind == "dpm_2":
            mid = sigma.log().lerp(down.log(), 0.5).exp()
            dt2, m = float(down - sigma), float(mid)
            stage = [_euler(i, sigma, mid), KRow(i, m, dt2 / m, (-dt2 / m, 1.0), skip=True, starts_step=False)]
            noisy = True
        else:
            t, t_next = _t(sigma), _t(down)
            h = t_next - t
            s = t + 0.5 * h
            stage = [_first_stage(i, sigma, float(_sigma(s) / _sigma(t)), float(-(-h * 0.5).expm1())),
                     KRow(i, float(_sigma(s)), 0.0, (float(-(-h).expm1()), float(_sigma(t_next) / _sigma(t))),
                          skip=True, starts_step=False)]
            noisy = nxt > 0
        if noisy:
            stage[-1] = _with_noise(stage[-1], s_noise * float(up), args)
        rows += stage
    return rows


def dpmpp_sde_rows(sigmas: Tensor, device_sigmas: Tensor, eta: float, s_noise: float, r: float) -> list[KRow]:
    """Rows of ``sample_dpmpp_sde``: two stages per step, noise injected at both."""
    rows = []
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        if nxt == 0:
            rows.append(_euler(i, sigma, nxt))
            continue
        t, t_next = _t(sigma), _t(nxt)
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        down, up = ancestral_step(_sigma(t), _sigma(s), eta)
        s_ = _t(down)
        first = _first_stage(i, sigma, float(_sigma(s_) / _sigma(t)), float(-(t - s_).expm1()))
        dt, dt_next = _t(device_sigmas[i]), _t(device_sigmas[i + 1])
        ds = dt + (dt_next - dt) * r
        rows.append(_with_noise(first, s_noise * float(up), (_sigma(dt), _sigma(ds))))
        down, up = ancestral_step(_sigma(t), _sigma(t_next), eta)
        t_next_ = _t(down)
        w = float(-(t - t_next_).expm1())
        second = KRow(i, float(_sigma(s)), 0.0, (w * fac, w * (1 - fac), float(_sigma(t_next_) / _sigma(t))),
                      num_history=1, skip=True, starts_step=False)
        rows.append(_with_noise(second, s_noise * float(up), (_sigma(dt), _sigma(dt_next))))
    return rows


def dpmpp_multistep_sde_rows(order: int, sigmas: Tensor, device_sigmas: Tensor, eta: float, s_noise: float,
                             solver_type: str = "midpoint") -> list[KRow]:
    """Rows of ``sample_dpmpp_2m_sde`` (`order` 2, `solver_type`) or ``sample_dpmpp_3m_sde`` (`order` 3)."""
    rows, hs = [], []
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        if nxt == 0:
            rows.append(KRow(i, float(sigma), 0.0, (1.0,)))
            continue
        h = float(_t(nxt) - _t(sigma))
        if order == 2:
            eta_h = eta * h
            a, w = float(nxt / sigma) * math.exp(-eta_h), -math.expm1(-h - eta_h)
            b = [w]
            if hs:
                r = hs[-1] / h
                d1 = (0.5 * w if solver_type == "midpoint" else w / (-h - eta_h) + 1) / r
                b = [w + d1, -d1]
        else:
            h_eta = h * (eta + 1)
            a, w = math.exp(-h_eta), -math.expm1(-h_eta)
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            b = [w]
            if len(hs) >= 2:
                r0, r1 = hs[-1] / h, hs[-2] / h
                d1_0, d1_1 = (1 / r0, -1 / r0, 0.0), (0.0, 1 / r1, -1 / r1)
                d1 = [u + (u - v) * r0 / (r0 + r1) for u, v in zip(d1_0, d1_1)]
                d2 = [(u - v) / (r0 + r1) for u, v in zip(d1_0, d1_1)]
                phi_3 = phi_2 / h_eta - 0.5
                b = [(w if j == 0 else 0.0) + phi_2 * d1[j] - phi_3 * d2[j] for j in range(3)]
            elif hs:
                r = hs[-1] / h
                b = [w + phi_2 / r, -phi_2 / r]
        row = KRow(i, float(sigma), a, tuple(b), num_history=len(b) - 1)
        if eta:
            noise = float(nxt) * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
            row = _with_noise(row, noise, (device_sigmas[i], device_sigmas[i + 1]))
        rows.append(row)
        hs.append(h)
    return rows


def _lagrange_integral(nodes: list[float], j: int, start: float, end: float) -> float:
    """The integral over [start, end] of the Lagrange basis polynomial of node j (exact, by its antiderivative)."""
    poly = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    antiderivative = poly.integ()
    return float(antiderivative(end) - antiderivative(start))


def lms_rows(sigmas: Tensor, order: int) -> list[KRow]:
    """Rows of ``sample_lms``: Adams-Bashforth in sigma on ``d = (x - D)/sigma``, warm-up from order 1."""
    values = sigmas.tolist()
    rows = []
    for i in range(len(values) - 1):
        k = min(i + 1, order)
        nodes = [values[i - m] for m in range(k)]
        b = tuple(_lagrange_integral(nodes, j, values[i], values[i + 1]) for j in range(k))
        rows.append(KRow(i, values[i], 1.0, b, num_history=k - 1, derivative=True))
    return rows


def ipndm_rows(sigmas: Tensor, max_order: int) -> list[KRow]:
    """Rows of ComfyUI's ``sample_ipndm``: fixed Adams-Bashforth weights in sigma, the step to 0 returns D."""
    values = sigmas.tolist()
    rows = []
    for i in range(len(values) - 1):
        if values[i + 1] == 0:
            rows.append(KRow(i, values[i], 0.0, (1.0,)))
            continue
        weights = IPNDM_WEIGHTS[min(max_order, i + 1)]
        dt = values[i + 1] - values[i]
        rows.append(KRow(i, values[i], 1.0, tuple(dt * w for w in weights), num_history=len(weights) - 1,
                         derivative=True))
    return rows


def res_multistep_rows(sigmas: Tensor, device_sigmas: Tensor, eta: float, s_noise: float) -> list[KRow]:
    """Rows of ComfyUI's ``res_multistep`` (RES second-order multistep, arXiv:2308.02157) without CFG++."""
    rows, old_down = [], None
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        down, up = ancestral_step(sigma, nxt, eta)
        if down == 0 or old_down is None:
            row = _euler(i, sigma, down)
        else:
            t, t_old, t_next, t_prev = _t(sigma), _t(old_down), _t(down), _t(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi_1 = torch.expm1(-h) / -h
            phi_2 = (phi_1 - 1.0) / -h
            b1 = float(torch.nan_to_num(phi_1 - phi_2 / c2, nan=0.0))
            b2 = float(torch.nan_to_num(phi_2 / c2, nan=0.0))
            row = KRow(i, float(sigma), float(_sigma(h)), (float(h) * b1, float(h) * b2), num_history=1)
        if nxt > 0:
            row = _with_noise(row, s_noise * float(up), (device_sigmas[i], device_sigmas[i + 1]))
        rows.append(row)
        old_down = down
    return rows


def assemble(name: str, rows: list[KRow], sigmas: Tensor, sigma_hat: list[Tensor], churn: float = 0.0,
             draws_churn: bool = False) -> KPlan:
    """The :class:`KPlan` of `rows` on the grid `sigmas` ((N+1,) float64 CPU), as ``run_plan`` runs it.

    Raises:
        ValueError when the grid gives non-finite coefficients.
    """
    wide = any(len(r.b) > 3 for r in rows)
    table = []
    for r in rows:
        b = list(r.b) + [0.0] * ((4 if wide else 3) - len(r.b))
        p, q = (1 / r.sigma, -1 / r.sigma) if r.derivative else (0.0, 1.0)
        table.append((r.a, *b[:3], r.c, p, q, *b[3:]))
    if not all(math.isfinite(v) for values in table for v in values):
        raise ValueError(f"sample_{name}: sigmas give non-finite step coefficients; check its values")
    steps = StepPlan(tuple(table), tuple(r.step for r in rows), tuple(r.num_history for r in rows),
                     tuple(r.noisy for r in rows), tuple(r.starts_step for r in rows), tuple(r.skip for r in rows))
    grid = tuple(sigmas.tolist())
    plan = SamplingPlan(grid, tuple(GridPoint(1.0, s) for s in grid), grid, steps, tuple(r.sigma for r in rows),
                        SolverSettings(f"k-diffusion {name}", 1, "x0"))
    return KPlan(plan, tuple(r.noise_args for r in rows), tuple(sigma_hat), churn, draws_churn)
