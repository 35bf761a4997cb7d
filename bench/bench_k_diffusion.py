"""FD-digits against NFE for the k-diffusion samplers (``adjointdeis.k_diffusion``) on the shipped digits model.

Usage: python bench/bench_k_diffusion.py [--samples N] [--nfe 5 10 20] [--seed S] [--threads T]

The shipped eps-prediction digits model (``adjointdeis.zoo``, a discrete VP schedule) is wrapped as a k-diffusion
denoiser in VE coordinates: ``D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma))``, with t the time of
half log-SNR ``-log sigma`` on the model's schedule. Every cell samples the same n class-conditional x_T (labels
i mod 10), scaled to ``sigma_max`` of the schedule, on a Karras grid (rho = 7) from sigma_max to sigma_min then 0;
the stochastic samplers draw their noise from one seeded generator per cell. A sampler with two model
evaluations per step takes N = (NFE + 1) // 2 steps (2N - 1 evaluations: the step to 0 takes one); the printed
NFE is the evaluations actually used. FD-digits: the Fréchet distance between the shipped classifier's features of
the samples and of the 297 held-out digits (``adjointdeis.demo.fd_digits``; not FID).
"""

import argparse
import math
import pathlib
import sys
import time

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from adjointdeis import k_diffusion as kd  # noqa: E402
from adjointdeis.demo import class_noise, fd_digits, load_kit  # noqa: E402
from adjointdeis.benchmarks import cpu_name  # noqa: E402

# name: (sampler, options, model evaluations per step, stochastic)
SAMPLERS = {
    "euler": (kd.sample_euler, {}, 1, False),
    "euler_ancestral": (kd.sample_euler_ancestral, {}, 1, True),
    "heun": (kd.sample_heun, {}, 2, False),
    "dpm_2": (kd.sample_dpm_2, {}, 2, False),
    "dpm_2_ancestral": (kd.sample_dpm_2_ancestral, {}, 2, True),
    "lms": (kd.sample_lms, {}, 1, False),
    "dpmpp_2s_ancestral": (kd.sample_dpmpp_2s_ancestral, {}, 2, True),
    "dpmpp_sde": (kd.sample_dpmpp_sde, {}, 2, True),
    "dpmpp_2m": (kd.sample_dpmpp_2m, {}, 1, False),
    "dpmpp_2m_sde": (kd.sample_dpmpp_2m_sde, {}, 1, True),
    "dpmpp_2m_sde heun": (kd.sample_dpmpp_2m_sde, {"solver_type": "heun"}, 1, True),
    "dpmpp_3m_sde": (kd.sample_dpmpp_3m_sde, {}, 1, True),
    "ipndm": (kd.sample_ipndm, {}, 1, False),
    "res_multistep": (kd.sample_res_multistep, {}, 1, False),
}
CHUNK = 250


class VEDenoiser(torch.nn.Module):
    """The digits model as a k-diffusion denoiser ``D(x, sigma, cond)`` in VE coordinates."""

    def __init__(self, kit):
        super().__init__()
        self.model, self.schedule = kit.model, kit.schedule

    def forward(self, x, sigma, cond):
        t = self.schedule.model_time(self.schedule.time_from_half_log_snr(-sigma.to(torch.float64).log()))
        s = sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return x - s * self.model(x / (1 + s**2).sqrt(), t.to(x.dtype), cond)


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kit = load_kit("digits")
    denoiser = VEDenoiser(kit)
    sched = kit.schedule
    to_ve = lambda t: float(sched.sigma(torch.tensor(t, dtype=torch.float64)) / sched.alpha(  # noqa: E731
        torch.tensor(t, dtype=torch.float64)))
    sigma_min, sigma_max = to_ve(sched.t_min) + 1e-3, to_ve(sched.t_max) * (1 - 1e-6)
    x_T, labels = class_noise(kit, args.samples, args.seed)
    x_T = x_T * math.sqrt(1 + sigma_max**2)
    cells = [(name, nfe) for name in SAMPLERS for nfe in args.nfe]
    table, start = {}, time.perf_counter()
    for name, nfe in tqdm(cells, desc="FD cells", disable=None):
        sampler, options, stages, stochastic = SAMPLERS[name]
        steps = nfe if stages == 1 else (nfe + 1) // 2
        sigmas = karras(steps, sigma_min, sigma_max)
        generator = torch.Generator().manual_seed(args.seed + 1) if stochastic else None
        extra = {"generator": generator} if stochastic else {}
        with torch.no_grad():
            images = torch.cat([sampler(denoiser, x_T[i:i + CHUNK], sigmas, extra_args={"cond": labels[i:i + CHUNK]},
                                        disable=True, **options, **extra) for i in range(0, len(x_T), CHUNK)])
        used = steps if stages == 1 else 2 * steps - 1
        table[name, nfe] = (fd_digits(kit, images.clamp(-1, 1)), used)
    print(f"FD-digits against NFE, {args.samples} class-conditional samples per cell, Karras grid (rho 7, sigma "
          f"{sigma_min:.3g}..{sigma_max:.4g}, then 0); lower is better, not FID. {cpu_name()}, "
          f"{args.threads} thread(s), {time.perf_counter() - start:.0f} s in all")
    print("| sampler | NFE/step | " + " | ".join(f"NFE {k}" for k in args.nfe) + " |")
    print("|---|---|" + "---|" * len(args.nfe))
    for name, (_, _, stages, _) in SAMPLERS.items():
        cells = [table[name, k] for k in args.nfe]
        text = [f"{fd:.2f}" if used == k else f"{fd:.2f} ({used})" for (fd, used), k in zip(cells, args.nfe)]
        print(f"| {name} | {stages} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main()
