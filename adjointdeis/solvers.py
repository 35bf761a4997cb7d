"""Coefficient tables of the multistep samplers (MATH.md sections 2 and 4).

Every supported step has the form ``x_next = a x + b0 m0 + b1 m1 + b2 m2 + c noise`` with
``m0 = p x + q out`` the converted model output. A :class:`StepPlan` holds one row per model
evaluation, computed once per grid in float64 on the host; the sampler then runs the same
fused op for every row and never syncs the host.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .reference import STEP_COEFFS

SOLVERS = ("ddim", "deis", "dpmpp", "heun")
PREDICTIONS = ("eps", "x0", "v", "flow")
_ORDERS = {"ddim": (1,), "deis": (1, 2, 3), "dpmpp": (1, 2, 3), "heun": (2,)}
_DEFAULT_ORDER = {"ddim": 1, "deis": 2, "dpmpp": 2, "heun": 2}
THIRD_ORDER_VARIANTS = ("published", "taylor")
HEUN_VARIABLES = ("rho", "flow")


@dataclass(frozen=True)
class GridPoint:
    """alpha, sigma and half log-SNR of one grid time, in float64."""

    alpha: float
    sigma: float

    @property
    def half_log_snr(self) -> float:
        if self.sigma == 0.0:
            return math.inf
        if self.alpha == 0.0:
            return -math.inf
        return math.log(self.alpha) - math.log(self.sigma)

    @property
    def rho(self) -> float:
        """sigma / alpha, the VE noise level (the time variable of DEIS and Heun)."""
        return math.inf if self.alpha == 0.0 else self.sigma / self.alpha


@dataclass(frozen=True)
class StepPlan:
    """One row per model evaluation.

    Attributes:
        coeffs: (S, 7) float64 rows ``[a, b0, b1, b2, c, p, q]``.
        eval_index: (S,) index into the time grid of the time the model is evaluated at.
        num_history: per row, how many previous converted outputs it reads (0..2).
        noisy: per row, whether it draws standard normal noise.
        starts_step: per row, whether its input state is the grid state at ``eval_index``
            (False for Heun's corrector rows, whose input is the predicted state).
    """

    coeffs: Tensor
    eval_index: list[int]
    num_history: list[int]
    noisy: list[bool]
    starts_step: list[bool]

    def __len__(self) -> int:
        return len(self.eval_index)


def resolve_order(solver: str, order: int | None, sde: bool) -> int:
    """Validates solver/order/sde and returns the order to use.

    Raises:
        ValueError naming `solver`, `order` or `sde`.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    order = _DEFAULT_ORDER[solver] if order is None else order
    if order not in _ORDERS[solver]:
        raise ValueError(f"solver {solver!r} supports order {'/'.join(map(str, _ORDERS[solver]))}, got {order}")
    if sde and not (solver in ("ddim", "dpmpp") and order <= 2):
        raise ValueError(f"sde=True is available for solver 'dpmpp' (orders 1, 2) and 'ddim', not {solver!r} order {order}")
    return order


def conversion(prediction: str, target: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(p, q) such that the `target` quantity ("x0" or "eps") is ``p x + q out``.

    Args:
        prediction: what the model outputs: "eps", "x0", "v" (alpha eps - sigma x0) or
            "flow" (eps - x0).
        target: "x0", "eps" or "velocity" (``eps - x0``).
        alpha, sigma: the schedule at the evaluation time (sigma > 0).

    Raises:
        ValueError for an unknown prediction or a conversion that divides by zero.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    if target == "velocity":  # eps - x0, the flow-matching target
        (pe, qe), (px, qx) = (conversion(prediction, k, alpha, sigma) for k in ("eps", "x0"))
        return pe - px, qe - qx
    if prediction == ("eps" if target == "eps" else "x0"):
        return 0.0, 1.0
    if prediction == "v":
        norm = alpha * alpha + sigma * sigma
        return (alpha / norm, -sigma / norm) if target == "x0" else (sigma / norm, alpha / norm)
    if prediction == "flow":
        norm = alpha + sigma
        return (1.0 / norm, -sigma / norm) if target == "x0" else (1.0 / norm, alpha / norm)
    divisor = alpha if prediction == "eps" else sigma
    if divisor == 0.0:
        raise ValueError(
            f"cannot convert a {prediction!r} prediction to {target!r} where "
            f"{'alpha' if prediction == 'eps' else 'sigma'} is 0; start the grid below t = 1")
    if prediction == "eps":
        return 1.0 / alpha, -sigma / alpha
    return 1.0 / sigma, -alpha / sigma


def step_orders(num_steps: int, order: int, lower_order_final: bool, final_is_zero: bool) -> list[int]:
    """Order of each step: warm-up from 1, lowered on the last steps as diffusers does."""
    orders = []
    for i in range(num_steps):
        k = min(order, i + 1)
        if i == num_steps - 1 and ((lower_order_final and num_steps < 15) or final_is_zero):
            k = 1
        elif i == num_steps - 2 and lower_order_final and num_steps < 15:
            k = min(k, 2)
        orders.append(k)
    return orders


def _expm1_neg(h: float) -> float:
    return -1.0 if math.isinf(h) else math.expm1(-h)


def _dpmpp_row(points, i, k, sde, third_order="published"):
    """DPM-Solver++ step i -> i+1 of order k (data prediction), as weights of (m0, m1, m2).

    Order 3 ("3M") has two variants. "published" is the update of the DPM-Solver++ paper and
    diffusers: its second-difference term D2 ~ h^2 x0''/2 carries the weight
    ``1/2 - (e^{-h} - 1 + h)/h^2 ~ h/6``, half of the Taylor weight
    ``integral_0^h e^{u-h} u^2 du / h^2 ~ h/3``, so its local error is O(h^3) and the method is
    globally second order. "taylor" uses the Taylor weight and is third order.
    """
    s, t = points[i], points[i + 1]
    h = t.half_log_snr - s.half_log_snr
    phi1 = -_expm1_neg(h)  # 1 - e^{-h}
    if sde:
        a = (t.sigma / s.sigma) * math.exp(-h)
        d_weight = t.alpha * (-_expm1_neg(2 * h))
        c = t.sigma * math.sqrt(-_expm1_neg(2 * h))
    else:
        a, d_weight, c = t.sigma / s.sigma, t.alpha * phi1, 0.0
    if k == 1:
        return a, [d_weight], c
    r0 = (s.half_log_snr - points[i - 1].half_log_snr) / h
    if k == 2:
        return a, [d_weight * (1 + 0.5 / r0), -d_weight * 0.5 / r0], c
    r1 = (points[i - 1].half_log_snr - points[i - 2].half_log_snr) / h
    # D1_0, D1_1, D1, D2 as weights of (m0, m1, m2).
    d1_0 = (1 / r0, -1 / r0, 0.0)
    d1_1 = (0.0, 1 / r1, -1 / r1)
    d1 = [u + r0 / (r0 + r1) * (u - v) for u, v in zip(d1_0, d1_1)]
    d2 = [(u - v) / (r0 + r1) for u, v in zip(d1_0, d1_1)]
    em = math.expm1(-h)
    d2_weight = -t.alpha * ((em + h) / h**2 - 0.5)
    if third_order == "taylor":
        d2_weight *= 2.0
    d1_weight = t.alpha * (em / h + 1)
    w = [(d_weight if j == 0 else 0.0) + d1_weight * d1[j] + d2_weight * d2[j] for j in range(3)]
    return a, w, c


def _exp_moment(n: int, h: float) -> float:
    """J_n = integral_0^{-h} e^v v^n dv, stably for small h."""
    if abs(h) < 0.5:
        total, term_fact = 0.0, 1.0
        for j in range(40):
            if j:
                term_fact *= j
            total += (-h) ** (n + j + 1) / ((n + j + 1) * term_fact)
        return total
    moment = math.expm1(-h)
    for m in range(1, n + 1):
        moment = math.exp(-h) * (-h) ** m - m * moment
    return moment


def _deis_row(points, i, k):
    """DEIS (log-rho Adams-Bashforth) step i -> i+1 of order k, weights of eps (m0, m1, m2)."""
    s, t = points[i], points[i + 1]
    if not math.isfinite(s.rho):
        raise ValueError("solver 'deis' needs alpha > 0 at every evaluation time; start the grid below t = 1")
    a = t.alpha / s.alpha
    if t.rho == 0.0:
        if k != 1:
            raise AssertionError("a step to zero noise is first order")
        return a, [t.alpha * (t.rho - s.rho)], 0.0
    h = math.log(s.rho) - math.log(t.rho)  # = lambda_t - lambda_s
    # Lagrange basis in v = log(rho) - log(rho_s) over the nodes of m0, m1, m2.
    nodes = [math.log(points[i - j].rho) - math.log(s.rho) for j in range(k)]
    moments = [_exp_moment(n, h) for n in range(k)]
    weights = []
    for j in range(k):
        poly = [1.0]  # coefficients of prod_{l != j} (v - v_l) / (v_j - v_l), lowest first
        for l in range(k):
            if l == j:
                continue
            scale = nodes[j] - nodes[l]
            poly = [((poly[n - 1] if n else 0.0) - nodes[l] * (poly[n] if n < len(poly) else 0.0)) / scale
                    for n in range(len(poly) + 1)]
        weights.append(t.alpha * s.rho * sum(cf * mo for cf, mo in zip(poly, moments)))
    return a, weights, 0.0


def _heun_euler(s: GridPoint, t: GridPoint, variable: str) -> tuple[float, float, str]:
    """(a, b, target) of the Euler step s -> t in Heun's variables: ``x_t = a x_s + b m`` with m the
    `target` quantity at s.

    "rho": EDM's ``d(x/alpha)/d rho = eps``, ``rho = sigma/alpha``. "flow": the rectified-flow ODE
    ``d(x/c)/d tau = eps - x0`` with ``c = alpha + sigma``, ``tau = sigma/c`` (for the flow schedule
    c = 1 and tau = t: the plain ``dx/dt = v``).
    """
    if variable == "flow":
        cs, ct = s.alpha + s.sigma, t.alpha + t.sigma
        return ct / cs, ct * (t.sigma / ct - s.sigma / cs), "velocity"
    if not math.isfinite(s.rho):
        raise ValueError("solver 'heun' needs alpha > 0 at every evaluation time; start the grid below t = 1")
    return t.alpha / s.alpha, t.alpha * (t.rho - s.rho), "eps"


def build_plan(points: list[GridPoint], solver: str, order: int, prediction: str, *,
               sde: bool = False, lower_order_final: bool = True, third_order: str = "published",
               heun_variable: str = "rho") -> StepPlan:
    """Coefficient table for sampling along `points` (noisiest first).

    Args:
        points: N+1 grid points (alpha, sigma); the last may be (1, 0), "denoise to zero".
        solver, order: as validated by :func:`resolve_order`.
        prediction: what the model outputs ("eps" | "x0" | "v" | "flow").
        sde: stochastic DPM-Solver++ (rows draw noise).
        lower_order_final: lower the order on the last steps when N < 15, as diffusers.
        third_order: DPM-Solver++(3M) variant, "published" (diffusers-identical, globally
            second order) or "taylor" (third order); see :func:`_dpmpp_row`.
        heun_variable: the variables Heun integrates in: "rho" (EDM: ``x/alpha`` against
            ``sigma/alpha``) or "flow" (``x/(alpha+sigma)`` against ``sigma/(alpha+sigma)``; for the
            flow schedule the plain ``dx/dt = eps - x0``, which also starts from t = 1).

    Returns:
        A :class:`StepPlan` with N rows (2N - 1 for Heun: last step Euler).
    """
    if third_order not in THIRD_ORDER_VARIANTS:
        raise ValueError(f"third_order must be one of {', '.join(THIRD_ORDER_VARIANTS)}, got {third_order!r}")
    if heun_variable not in HEUN_VARIABLES:
        raise ValueError(f"heun_variable must be one of {', '.join(HEUN_VARIABLES)}, got {heun_variable!r}")
    num_steps = len(points) - 1
    final_is_zero = points[-1].sigma == 0.0
    rows, eval_index, num_history, noisy, starts_step = [], [], [], [], []

    def add(index, a, b, c, target, nh, starts=True):
        p, q = conversion(prediction, target, points[index].alpha, points[index].sigma)
        b = list(b) + [0.0] * (3 - len(b))
        rows.append([a, *b, c, p, q])
        eval_index.append(index)
        num_history.append(nh)
        noisy.append(c != 0.0)
        starts_step.append(starts)

    if solver == "heun":
        for i in range(num_steps):
            a, euler, target = _heun_euler(points[i], points[i + 1], heun_variable)
            add(i, a, [euler], 0.0, target, 0)
            if i < num_steps - 1:
                add(i + 1, 1.0, [euler / 2, -euler / 2], 0.0, target, 1, starts=False)
    else:
        orders = step_orders(num_steps, order, lower_order_final, final_is_zero)
        for i, k in enumerate(orders):
            if solver == "deis":
                a, b, c = _deis_row(points, i, k)
                add(i, a, b, c, "eps", k - 1)
            else:
                a, b, c = _dpmpp_row(points, i, k, sde, third_order)
                add(i, a, b, c, "x0", k - 1)
    coeffs = torch.tensor(rows, dtype=torch.float64).reshape(-1, len(STEP_COEFFS))
    if not torch.isfinite(coeffs).all():
        raise ValueError("the time grid produced non-finite step coefficients; check its endpoints")
    return StepPlan(coeffs, eval_index, num_history, noisy, starts_step)
