"""The demo's model: Gaussian data, whose probability-flow ODE has a closed-form solution."""

import torch

from .sampling import sample
from .schedules import VPSchedule

_SOLVERS = [("ddim", 1), ("deis", 2), ("deis", 3), ("dpmpp", 2), ("dpmpp", 3), ("heun", 2)]


class GaussianDenoiser(torch.nn.Module):
    """Exact noise prediction for data ~ N(mu, diag(s^2)): eps = sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2)."""

    def __init__(self, schedule, mu, s):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s

    def forward(self, x, t):
        t = t.to(torch.float64).cpu()
        alpha = self.schedule.alpha(t).to(x)[:, None]
        sigma = self.schedule.sigma(t).to(x)[:, None]
        return sigma * (x - alpha * self.mu) / (alpha**2 * self.s**2 + sigma**2)

    def exact(self, x_T, t_from, t_to):
        def k(t):
            return torch.sqrt(self.schedule.alpha(t) ** 2 * self.s**2 + self.schedule.sigma(t) ** 2)
        a = self.schedule.alpha
        return a(t_to) * self.mu + (x_T - a(t_from) * self.mu) * k(t_to) / k(t_from)


def gaussian_accuracy_table(steps=(5, 10, 20, 50), dim=256, batch=256, seed=0) -> str:
    """A table of the max error of each solver against the exact ODE solution, per step count."""
    g = torch.Generator().manual_seed(seed)
    sched = VPSchedule.linear()
    mu = torch.rand(dim, generator=g, dtype=torch.float64) * 2 - 1
    s = 0.1 + 0.9 * torch.rand(dim, generator=g, dtype=torch.float64)
    model = GaussianDenoiser(sched, mu, s)
    x_T = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    lines = ["max |x - exact| on N(mu, s^2) data, VP linear schedule, logSNR grid",
             f"{'solver':<10}" + "".join(f"{f'N={n}':>11}" for n in steps)]
    for solver, order in _SOLVERS:
        row = f"{solver}-{order:<5}"
        for n in steps:
            ts = sched.timesteps(n)
            x = sample(model, x_T, sched, steps=n, solver=solver, order=order)
            row += f"{(x - model.exact(x_T, ts[0], ts[-1])).abs().max().item():>11.2e}"
        lines.append(row)
    return "\n".join(lines)
