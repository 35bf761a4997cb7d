"""The solver registry and the coefficient tables of its solvers (docs/math.md section 4).

Every supported step has the form ``x_next = a x + b0 m0 + b1 m1 + b2 m2 (+ b3 m3) + c noise`` with
``m0 = p x + q out`` the converted model output; a row of a multi-stage step may read the step's start state
in place of its last history term (:attr:`StepPlan.skip`). A :class:`StepPlan` holds one row per model
evaluation, computed once per grid in float64 on the host; the sampler then runs the same
fused op for every row and never syncs the host.

:data:`SOLVERS` maps a solver's name to a :class:`Solver`: its orders, default order, which orders have
an SDE variant, how many model evaluations a step takes, and its row builder, a function from a
:class:`PlanRequest` to the plan's :class:`Row` s. Adding a solver is one entry and one row builder.
"""

import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import validation
from .predictions import conversion

THIRD_ORDER_VARIANTS = ("published", "taylor")
# The two second-order DPM-Solver updates (diffusers' solver_type): midpoint and Heun weights of D1.
SECOND_ORDER_VARIANTS = ("midpoint", "heun")
HEUN_VARIABLES = ("rho", "flow")
# diffusers' lower_order_final: below this many steps the last two steps are taken at order <= 1 and <= 2.
LOWER_ORDER_FINAL_BELOW = 15


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
    """One row per model evaluation; immutable, so a cached plan can be shared.

    Attributes:
        rows: (S, 7) float64 values ``[a, b0, b1, b2, c, p, q]`` per row, as nested tuples, or (S, 8) with
            ``b3`` appended when a row reads three previous outputs.
        eval_index: (S,) index into the time grid of the time the model is evaluated at.
        num_history: per row, how many previous converted outputs it reads (0..3).
        noisy: per row, whether it draws standard normal noise.
        starts_step: per row, whether its input state is the grid state at ``eval_index``
            (False for Heun's corrector rows, whose input is the predicted state).
        skip: per row, whether it also reads the step's start state (the input of the latest row that starts a
            step) as one more operand after its history, weighted by the next ``b``; empty: no row does.
    """

    rows: tuple[tuple[float, ...], ...]
    eval_index: tuple[int, ...]
    num_history: tuple[int, ...]
    noisy: tuple[bool, ...]
    starts_step: tuple[bool, ...]
    skip: tuple[bool, ...] = ()

    def __len__(self) -> int:
        return len(self.eval_index)

    @property
    def coeffs(self) -> Tensor:
        """The rows as a new (S, 7) or (S, 8) float64 CPU tensor (the caller owns it)."""
        return torch.tensor(self.rows, dtype=torch.float64).reshape(len(self.rows), -1)

    def skips(self, row: int) -> bool:
        """Whether `row` reads the step's start state (see :attr:`skip`)."""
        return bool(self.skip) and self.skip[row]


@dataclass(frozen=True)
class PlanRequest:
    """What a row builder gets: the grid and the settings of one sampling run.

    Attributes:
        points: the N+1 grid points, noisiest first; the last may be (1, 0), "denoise to zero".
        order: the validated solver order.
        sde: stochastic rows (draw noise).
        lower_order_final: apply diffusers' rule (last two steps at order <= 1, <= 2 below
            :data:`LOWER_ORDER_FINAL_BELOW` steps), counting ``total_steps``.
        final_order_one: take the last step at order 1 (diffusers' ``euler_at_final``).
        total_steps: the steps of the whole run the lower-order rule counts (more than the grid's when
            the grid is the tail of a run, as a scheduler restarting at a begin index).
        third_order: DPM-Solver++(3M) variant, see :func:`_dpm_row`.
        heun_variable: the variables Heun integrates in, see :func:`_heun_euler`.
        second_order: the second-order DPM-Solver update, "midpoint" or "heun" (see :func:`_dpm_row`).
    """

    points: tuple[GridPoint, ...]
    order: int
    sde: bool = False
    lower_order_final: bool = True
    final_order_one: bool = False
    total_steps: int | None = None
    third_order: str = "published"
    heun_variable: str = "rho"
    second_order: str = "midpoint"

    @property
    def num_steps(self) -> int:
        return len(self.points) - 1


@dataclass(frozen=True)
class Row:
    """One model evaluation before its output conversion: ``x_next = a x + sum_k b_k m_k + c noise``.

    Attributes:
        index: grid index of the evaluation time.
        a, b, c: the step's weights; ``b`` weights (m0, m1, m2), at most 3 of them.
        target: what ``m0`` is: "x0", "eps" or "velocity" (eps - x0).
        num_history: previous converted outputs read (``len(b) - 1`` for a multistep row).
        starts_step: whether the row's input state is the grid state at `index`.
    """

    index: int
    a: float
    b: tuple[float, ...]
    c: float
    target: str
    num_history: int
    starts_step: bool = True


@dataclass(frozen=True)
class Solver:
    """A registry entry.

    Attributes:
        name: the key users pass (``solver=``).
        description: one line for messages and docs.
        orders: the orders it supports; default_order: the one used when none is given.
        sde_orders: the orders with a stochastic (``sde=True``) variant, empty if none.
        stages: model evaluations per step (the last step of a multi-stage solver takes one).
        rows: the row builder, ``PlanRequest -> list[Row]``.
        alias_of: the solver whose rows it builds, when it is another's special case.
    """

    name: str
    description: str
    orders: tuple[int, ...]
    default_order: int
    rows: Callable[[PlanRequest], list[Row]] = field(repr=False)
    sde_orders: tuple[int, ...] = ()
    stages: int = 1
    alias_of: str | None = None

    def evaluations(self, steps: int) -> int:
        """Model evaluations of a run of `steps` steps."""
        return steps if self.stages == 1 else self.stages * steps - (self.stages - 1)


def step_orders(request: PlanRequest) -> list[int]:
    """Order of each step of a multistep solver: warm-up from 1, lowered on the last steps as diffusers does.

    A zero-length step (two equal grid points: a repeated timestep, or a grid ending at its own last level) is
    first order, which makes it the identity, and the history restarts after it: the step that follows warms
    up from order 1 again (its previous output is at the same time, so no difference can be formed). A step that
    lands on zero noise is first order wherever it is (its log-SNR step is infinite; a grid can reach zero noise
    before its end, at a timestep whose alpha is 1, and stay there).
    """
    num_steps, points = request.num_steps, request.points
    counted = num_steps if request.total_steps is None else request.total_steps
    lower = request.lower_order_final and counted < LOWER_ORDER_FINAL_BELOW
    final_first_order = lower or request.final_order_one
    orders, since_restart = [], 0
    for i in range(num_steps):
        k = min(request.order, since_restart + 1)
        if i == num_steps - 1 and final_first_order or points[i + 1].sigma == 0.0:
            k = 1
        elif i == num_steps - 2 and lower:
            k = min(k, 2)
        since_restart += 1
        if points[i + 1] == points[i]:
            k, since_restart = 1, 0
        orders.append(k)
    return orders


def _multistep(step_row: Callable[[PlanRequest, int, int], tuple[float, list[float], float]],
               target: str) -> Callable[[PlanRequest], list[Row]]:
    """The row builder of a multistep solver: one row per step, of the order :func:`step_orders` gives.

    A noise-prediction (`target` "eps") ODE step from a point with alpha = 0 (a flow grid's t = 1) divides by
    alpha there; it is taken as its limit, the first-order step in data form (DDIM, ``x_t = sigma_t x_s/sigma_s +
    alpha_t x0-hat``), and the history restarts after it (an extrapolation over an infinite log-SNR interval adds
    nothing, as DPM-Solver++'s does at r = inf).
    """
    def rows(request: PlanRequest) -> list[Row]:
        out, start = [], 0
        for i, k in enumerate(step_orders(request)):
            s, t = request.points[i], request.points[i + 1]
            if target == "eps" and s.alpha == 0.0 and not request.sde:
                out.append(Row(i, t.sigma / s.sigma, (t.alpha,), 0.0, "x0", 0))
                start = i + 1
                continue
            k = min(k, i - start + 1)
            a, b, c = step_row(request, i, k)
            out.append(Row(i, a, tuple(b), c, target, k - 1))
        return out
    return rows


def _expm1_neg(h: float) -> float:
    return -1.0 if math.isinf(h) else math.expm1(-h)


def _dpm_first_order(s: GridPoint, t: GridPoint, h: float, data: bool, sde: bool) -> tuple[float, float, float]:
    """(a, w, c) of the first-order DPM-Solver step s -> t: ``x_t = a x_s + w m + c noise``.

    m is the data prediction (`data`, DPM-Solver++) or the noise prediction (DPM-Solver). The noise forms use
    ``sigma_t (e^h - 1) = alpha_t (rho_s - rho_t)``, exact and finite where the step lands on zero noise.
    A zero-length step is the identity, at zero noise too (where sigma_t / sigma_s is 0 / 0 and h is NaN).
    """
    if s == t:
        return 1.0, 0.0, 0.0
    if data and sde:
        return (t.sigma / s.sigma) * math.exp(-h), t.alpha * -_expm1_neg(2 * h), t.sigma * math.sqrt(-_expm1_neg(2 * h))
    if data:
        return t.sigma / s.sigma, t.alpha * -_expm1_neg(h), 0.0
    growth = t.alpha * (s.rho - t.rho)  # sigma_t (e^h - 1)
    if sde:
        return t.alpha / s.alpha, -2.0 * growth, t.alpha * math.sqrt((s.rho - t.rho) * (s.rho + t.rho))
    return t.alpha / s.alpha, -growth, 0.0


def _dpm_heun_weight(t: GridPoint, h: float, data: bool, sde: bool) -> float:
    """The weight of D1 in the "heun" second-order update and in every third-order update."""
    if data:
        return t.alpha * ((-_expm1_neg(2 * h)) / (-2 * h) + 1) if sde else t.alpha * (_expm1_neg(h) / h + 1)
    return -(2.0 if sde else 1.0) * t.sigma * (math.expm1(h) / h - 1)


def _dpm_row(request: PlanRequest, i: int, k: int, data: bool) -> tuple[float, list[float], float]:
    """DPM-Solver++ (`data`) or DPM-Solver (noise prediction) step i -> i+1 of order k, as weights of (m0, m1, m2).

    With ``D1 = (m0 - m1)/r0`` the second-order update adds D1 with the weight of its `second_order` form:
    "midpoint" half the first-order weight, "heun" :func:`_dpm_heun_weight` (diffusers' ``solver_type``).
    Order 3 ("3M") adds ``D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1)`` and ``D2 = (D1_0 - D1_1)/(r0 + r1)`` with
    diffusers' weights; the noise-prediction SDE has no third order. For the data-prediction ODE there are two
    variants. "published" is the update of the DPM-Solver++ paper and diffusers: its second-difference term
    D2 ~ h^2 x0''/2 carries the weight ``1/2 - (e^{-h} - 1 + h)/h^2 ~ h/6``, half of the Taylor weight
    ``integral_0^h e^{u-h} u^2 du / h^2 ~ h/3``, so its local error is O(h^3) and the method is globally second
    order. "taylor" uses the Taylor weight and is third order (docs/math.md section 4.3).
    """
    points, sde = request.points, request.sde
    s, t = points[i], points[i + 1]
    if not data and s.alpha == 0.0:
        raise ValueError("solver 'dpmsolver' with sde=True needs alpha > 0 at every evaluation time; start the grid "
                         "below t = 1")
    h = t.half_log_snr - s.half_log_snr
    a, w, c = _dpm_first_order(s, t, h, data, sde)
    if k == 1:
        return a, [w], c
    r0 = (s.half_log_snr - points[i - 1].half_log_snr) / h
    if k == 2:
        d1 = 0.5 * w if request.second_order == "midpoint" else _dpm_heun_weight(t, h, data, sde)
        return a, [w + d1 / r0, -d1 / r0], c
    r1 = (points[i - 1].half_log_snr - points[i - 2].half_log_snr) / h
    # D1_0, D1_1, D1, D2 as weights of (m0, m1, m2).
    d1_0 = (1 / r0, -1 / r0, 0.0)
    d1_1 = (0.0, 1 / r1, -1 / r1)
    d1 = [u + r0 / (r0 + r1) * (u - v) for u, v in zip(d1_0, d1_1)]
    d2 = [(u - v) / (r0 + r1) for u, v in zip(d1_0, d1_1)]
    if data and sde:
        d2_weight = t.alpha * ((-_expm1_neg(2 * h) - 2 * h) / (2 * h) ** 2 - 0.5)
    elif data:
        d2_weight = -t.alpha * ((math.expm1(-h) + h) / h**2 - 0.5)
        if request.third_order == "taylor":
            d2_weight *= 2.0
    else:
        d2_weight = -t.sigma * ((math.expm1(h) - h) / h**2 - 0.5)
    d1_weight = _dpm_heun_weight(t, h, data, sde)
    weights = [(w if j == 0 else 0.0) + d1_weight * d1[j] + d2_weight * d2[j] for j in range(3)]
    return a, weights, c


def _renoise_rows(request: PlanRequest) -> list[Row]:
    """Every step re-noises the data prediction: ``x_t = alpha_t x0-hat + sigma_t noise`` (fresh noise)."""
    return [Row(i, 0.0, (t.alpha,), t.sigma, "x0", 0) for i, t in enumerate(request.points[1:])]


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


def _deis_row(request: PlanRequest, i: int, k: int) -> tuple[float, list[float], float]:
    """DEIS (log-rho Adams-Bashforth) step i -> i+1 of order k, weights of eps (m0, m1, m2)."""
    points = request.points
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


def _heun_rows(request: PlanRequest) -> list[Row]:
    """EDM's Heun: an Euler predictor and a trapezoidal corrector per step, the last step Euler (2N - 1 rows)."""
    points, num_steps = request.points, request.num_steps
    rows = []
    for i in range(num_steps):
        a, euler, target = _heun_euler(points[i], points[i + 1], request.heun_variable)
        rows.append(Row(i, a, (euler,), 0.0, target, 0))
        if i < num_steps - 1:
            rows.append(Row(i + 1, 1.0, (euler / 2, -euler / 2), 0.0, target, 1, starts_step=False))
    return rows


def _alias(name: str, of: Solver, order: int, description: str) -> Solver:
    """An entry that is `of` at one fixed order (its rows, and its SDE variant if `of` has one there)."""
    return Solver(name, description, (order,), order, of.rows, tuple(o for o in of.sde_orders if o == order),
                  of.stages, of.name)


_DPMPP = Solver("dpmpp", "DPM-Solver++ (multistep, data prediction)", (1, 2, 3), 2,
                _multistep(functools.partial(_dpm_row, data=True), "x0"), sde_orders=(1, 2, 3))
SOLVERS: dict[str, Solver] = {s.name: s for s in (
    _alias("ddim", _DPMPP, 1, "DDIM: DPM-Solver++ of order 1"),
    Solver("deis", "DEIS (log-rho Adams-Bashforth of the noise prediction)", (1, 2, 3), 2,
           _multistep(_deis_row, "eps")),
    _DPMPP,
    Solver("dpmsolver", "DPM-Solver (multistep, noise prediction)", (1, 2, 3), 2,
           _multistep(functools.partial(_dpm_row, data=False), "eps"), sde_orders=(1, 2)),
    Solver("heun", "EDM's second-order Heun, the last step Euler", (2,), 2, _heun_rows, stages=2),
    Solver("renoise", "re-noise the data prediction every step (FlowMatchEuler's stochastic_sampling)", (1,), 1,
           _renoise_rows),
)}


def check_solver(solver: str) -> Solver:
    """The registry entry of `solver`.

    Raises:
        ValueError naming `solver` when it is unknown.
    """
    if not validation.known(solver, SOLVERS):
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[solver]


def sde_solvers() -> str:
    """The solvers with an SDE variant, as a phrase ("solver 'dpmpp' (orders 1, 2) and 'ddim'"); aliases last."""
    entries = sorted((e for e in SOLVERS.values() if e.sde_orders), key=lambda e: e.alias_of is not None)
    names = [f"{e.name!r}" + (f" (orders {', '.join(map(str, e.sde_orders))})" if len(e.orders) > 1 else "")
             for e in entries]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return "solver " + listed


def resolve_order(solver: str, order: int | None, sde: bool) -> int:
    """Validates solver/order/sde against the registry and returns the order to use.

    Raises:
        ValueError naming `solver`, `order` or `sde`.
    """
    entry = check_solver(solver)
    order = entry.default_order if order is None else order
    if not isinstance(order, (bool, float)) and hasattr(order, "__index__"):
        order = operator.index(order)   # a NumPy integer: its int
    if isinstance(order, bool) or not isinstance(order, int) or order not in entry.orders:
        raise ValueError(f"solver {solver!r} supports order {'/'.join(map(str, entry.orders))}, got {order}")
    if sde and order not in entry.sde_orders:
        raise ValueError(f"sde=True is available for {sde_solvers()}, not {solver!r} order {order}")
    return order


def build_plan(points, solver: str, order: int, prediction: str, *, sde: bool = False,
               lower_order_final: bool = True, third_order: str = "published", heun_variable: str = "rho",
               final_order_one: bool = False, total_steps: int | None = None,
               second_order: str = "midpoint") -> StepPlan:
    """Coefficient table for sampling along `points` (noisiest first).

    Args:
        points: N+1 grid points (alpha, sigma); the last may be (1, 0), "denoise to zero".
        solver, order: as validated by :func:`resolve_order`.
        prediction: what the model outputs (a key of :data:`adjointdeis.predictions.PREDICTIONS`).
        sde, lower_order_final, final_order_one, total_steps: see :class:`PlanRequest`.
        third_order: DPM-Solver++(3M) variant, "published" (diffusers-identical, globally
            second order) or "taylor" (third order; the DPM-Solver++ ODE only); see :func:`_dpm_row`.
        second_order: the second-order DPM-Solver / DPM-Solver++ update, "midpoint" or "heun"
            (diffusers' ``solver_type``); see :func:`_dpm_row`.
        heun_variable: the variables Heun integrates in: "rho" (EDM: ``x/alpha`` against
            ``sigma/alpha``) or "flow" (``x/(alpha+sigma)`` against ``sigma/(alpha+sigma)``; for the
            flow schedule the plain ``dx/dt = eps - x0``, which also starts from t = 1).

    Returns:
        A :class:`StepPlan` with N rows (2N - 1 for Heun: last step Euler).

    Raises:
        ValueError for an unknown solver, third_order, second_order or heun_variable, "taylor" for a
        solver other than the DPM-Solver++ ODE, or a grid that gives non-finite coefficients.
    """
    entry = check_solver(solver)
    if third_order not in THIRD_ORDER_VARIANTS:
        raise ValueError(f"third_order must be one of {', '.join(THIRD_ORDER_VARIANTS)}, got {third_order!r}")
    if heun_variable not in HEUN_VARIABLES:
        raise ValueError(f"heun_variable must be one of {', '.join(HEUN_VARIABLES)}, got {heun_variable!r}")
    if second_order not in SECOND_ORDER_VARIANTS:
        raise ValueError(f"second_order must be one of {', '.join(SECOND_ORDER_VARIANTS)}, got {second_order!r}")
    if third_order == "taylor" and order == 3 and (sde or (entry.alias_of or entry.name) != "dpmpp"):
        raise ValueError("third_order='taylor' is derived for the DPM-Solver++ ODE (solver 'dpmpp', sde=False) only")
    points = tuple(points)
    request = PlanRequest(points, order, sde, lower_order_final, final_order_one, total_steps, third_order,
                          heun_variable, second_order)
    table = []
    rows = entry.rows(request)
    for row in rows:
        point = points[row.index]
        p, q = conversion(prediction, row.target, point.alpha, point.sigma)
        table.append((row.a, *row.b, *([0.0] * (3 - len(row.b))), row.c, p, q))
    if not all(math.isfinite(v) for values in table for v in values):
        raise ValueError("the time grid produced non-finite step coefficients; check its endpoints")
    return StepPlan(tuple(table), tuple(r.index for r in rows), tuple(r.num_history for r in rows),
                    tuple(r.c != 0.0 for r in rows), tuple(r.starts_step for r in rows))
