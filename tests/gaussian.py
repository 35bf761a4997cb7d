"""Closed-form oracle (docs/math.md section 6): Gaussian data N(mu, s^2) per dimension."""

import torch


class GaussianEps(torch.nn.Module):
    """The exact noise prediction eps*(x, t) for data ~ N(mu, diag(s^2)) under `schedule`.

    mu and s are parameters (shape (dim,)), so gradients with respect to them are exact too.
    With ``cond`` given, the mean is ``mu + cond`` (a conditioning with an exact effect).
    """

    def __init__(self, schedule, mu, s):
        super().__init__()
        self.schedule = schedule
        self.mu = torch.nn.Parameter(torch.as_tensor(mu, dtype=torch.float64))
        self.s = torch.nn.Parameter(torch.as_tensor(s, dtype=torch.float64))

    def coefficients(self, t, like):
        t = t.detach().to(torch.float64).cpu()
        shape = (-1,) + (1,) * (like.dim() - 1)
        alpha = self.schedule.alpha(t).view(shape).to(like.device)
        sigma = self.schedule.sigma(t).view(shape).to(like.device)
        return alpha, sigma

    def forward(self, x, t, cond=None):
        alpha, sigma = self.coefficients(t, x)
        mu = self.mu if cond is None else self.mu + cond
        eps = sigma * (x - alpha * mu) / (alpha**2 * self.s**2 + sigma**2)
        return eps.to(x.dtype)

    def flow_map(self, x, t_from, t_to, cond=None):
        """Exact PF-ODE solution from time t_from to t_to (python floats or 0-d tensors)."""
        sched = self.schedule
        t_from, t_to = (torch.as_tensor(v, dtype=torch.float64) for v in (t_from, t_to))
        mu = self.mu if cond is None else self.mu + cond

        def k(t):
            return torch.sqrt(sched.alpha(t) ** 2 * self.s**2 + sched.sigma(t) ** 2)

        return sched.alpha(t_to) * mu + (x - sched.alpha(t_from) * mu) * k(t_to) / k(t_from)


def per_dimension(dim, seed=0):
    """Different mu and s in every dimension, so that errors cannot cancel."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(dim, generator=g, dtype=torch.float64) * 2 - 1
    s = 0.1 + torch.rand(dim, generator=g, dtype=torch.float64) * 0.9
    return mu, s


class GaussianFlow(GaussianEps):
    """The exact flow-matching velocity ``v* = eps* - x0*`` (prediction "flow") for the same data.

    Computed directly from the posterior mean ``x0* = mu + alpha s^2 (x - alpha mu) / (alpha^2 s^2 + sigma^2)``,
    so it stays finite at alpha = 0 (t = 1 of the flow schedule), unlike a conversion from eps.
    """

    def forward(self, x, t, cond=None):
        alpha, sigma = self.coefficients(t, x)
        mu = self.mu if cond is None else self.mu + cond
        var = alpha**2 * self.s**2 + sigma**2
        x0 = mu + alpha * self.s**2 * (x - alpha * mu) / var
        eps = sigma * (x - alpha * mu) / var
        return (eps - x0).to(x.dtype)
