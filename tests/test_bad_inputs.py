"""A battery of bad inputs across the public API, each run in a forked child process so that a crash counts.

A case passes when the call raises ``ValueError`` or ``TypeError`` (or a subclass) whose message names the bad
argument (the case's ``name``); anything else fails it: another exception, no exception, a hang or a dead child.
The compiled elementwise kernels called directly (``ops.multistep_step``, ``discrete_adjoint_step``,
``multi_tensor_axpy_``) check in C++, so that the sampling loop pays no Python check per step: their contract is a
``RuntimeError`` naming the argument. The CLI cases pass when the command exits with status 2 and one error line
on stderr (after argparse's usage, for its own errors), without a traceback.

``python tests/test_bad_inputs.py`` prints the outcome of every case (the battery's report); pytest runs each
case as a test.
"""

import contextlib
import io
import math
import multiprocessing
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import adjointdeis as ad
from adjointdeis import ops, reference, zoo
from adjointdeis.diffusers.config import schedule_from_config
from nets import ResidualBlock

TIMEOUT_S = 120.0
KERNEL = ("RuntimeError",)   # the compiled elementwise kernels' contract (see the module's docstring)


@dataclass(frozen=True)
class Case:
    """A bad call: `run()` must raise ValueError/TypeError naming `name` (for the CLI: exit 2, one line)."""

    id: str
    name: str
    run: Callable[[], object]
    cli: bool = False
    errors: tuple[str, ...] = ("ValueError", "TypeError")
    wired_later: str = ""


def model(x, t, cond=None):
    return 0.5 * x


def returns(value_of_x):
    return lambda x, t, cond=None: value_of_x(x)


def two_time(x, t, u, cond=None):
    return 0.5 * x


def x_T():
    return torch.randn(2, 3, generator=torch.Generator().manual_seed(0))


VP = ad.VPSchedule.linear()
EDM = ad.EDMSchedule()


def draw(**kwargs):
    return lambda: ad.sample(kwargs.pop("model", model), kwargs.pop("x_T", None) if "x_T" in kwargs else x_T(),
                             kwargs.pop("sched", VP), **{"steps": 2, **kwargs})


def scheduler(**config):
    from adjointdeis.diffusers import FusedMultistepScheduler

    return FusedMultistepScheduler(**config)


def stepped(model_output=None, sample=None, steps=3, variance_noise=None, **config):
    def run():
        s = scheduler(**config)
        s.set_timesteps(steps)
        x = torch.randn(2, 4, 3, 3) if sample is None else sample
        out = torch.randn(2, 4, 3, 3) if model_output is None else model_output
        return s.step(out, s.timesteps[0], x, variance_noise=variance_noise)
    return run


def set_timesteps(*args, **kwargs):
    def run():
        scheduler().set_timesteps(*args, **kwargs)
    return run


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    return UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


def denoised(latents=None, **kwargs):
    def run():
        from diffusers import DPMSolverMultistepScheduler

        from adjointdeis.diffusers import denoise

        x = torch.randn(1, 2, 8, 8) if latents is None else latents
        return denoise(tiny_unet(), x, DPMSolverMultistepScheduler(), **{"num_inference_steps": 2, "grad": None,
                                                                        **kwargs})
    return run


def ctm(**kwargs):
    return lambda: ad.sample_ctm(kwargs.pop("model", two_time), kwargs.pop("x_T", x_T()),
                                 kwargs.pop("sigmas", [80.0, 1.0, 0.0]), **kwargs)


def guided(**kwargs):
    return lambda: ad.guide(model, VP, kwargs.pop("loss_fn", lambda x: x.square().mean()), kwargs.pop("x_T", x_T()),
                            **{"optimize": "x_T", "steps": 2, "iters": 1, "progress": False, **kwargs})


class Backbone(torch.nn.Module):
    """A DSNO backbone: one residual block DSNO finds by its ``temporal_channels``."""

    def __init__(self):
        super().__init__()
        self.block = ResidualBlock()

    def forward(self, x, t, cond=None):
        return self.block(x)


def layer(*args, **kwargs):
    return lambda: ad.FourierTemporalConv(*args, **kwargs)


def conv_input(t=4, c=2):
    return torch.randn(1, t, c, 3, 3)


def step_operands(**change):
    x = torch.randn(2, 3)
    operands = dict(x=x, out=torch.randn(2, 3), history=[], coeffs=torch.zeros(7, dtype=torch.float64), noise=None)
    operands.update(change)
    return operands


def cli(*argv):
    def run():
        from adjointdeis.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = main(list(argv))
            except SystemExit as exit_:
                status = exit_.code
        return status, err.getvalue()
    return run


CASES = [
    # sample: the arguments
    Case("sample-x_T-list", "x_T", draw(x_T=[[0.0, 1.0]])),
    Case("sample-x_T-int", "x_T", draw(x_T=torch.zeros(2, 3, dtype=torch.int64))),
    Case("sample-x_T-0d", "x_T", draw(x_T=torch.tensor(1.0))),
    Case("sample-steps-float", "steps", draw(steps=2.5)),
    Case("sample-steps-zero", "steps", draw(steps=0)),
    Case("sample-steps-str", "steps", draw(steps="10")),
    Case("sample-steps-bool", "steps", draw(steps=True)),
    Case("sample-solver", "solver", draw(solver="nope")),
    Case("sample-order-big", "order", draw(order=7)),
    Case("sample-order-float", "order", draw(order=1.5)),
    Case("sample-spacing", "spacing", draw(spacing="bad")),
    Case("sample-prediction", "prediction", draw(prediction="bad")),
    Case("sample-sched", "sched", draw(sched="vp")),
    Case("sample-timesteps-rising", "timesteps", draw(timesteps=torch.tensor([0.1, 0.5, 0.9]))),
    Case("sample-timesteps-nan", "timesteps", draw(timesteps=[0.9, math.nan, 0.1])),
    Case("sample-timesteps-length", "timesteps", draw(timesteps=[0.9, 0.5, 0.3, 0.1], steps=1)),
    Case("sample-timesteps-str", "timesteps", draw(timesteps="0.9 0.1")),
    Case("sample-grad", "grad", draw(grad="bad", x_T=x_T().requires_grad_())),
    Case("sample-third_order", "third_order", draw(solver="dpmpp", order=3, third_order="bad")),
    Case("sample-second_order", "second_order", draw(second_order="bad")),
    Case("sample-threshold", "threshold", draw(threshold=0.5)),
    Case("sample-noise-not-callable", "noise", draw(noise=3, sde=True)),
    Case("sample-noise-and-generator", "noise", draw(noise=lambda row, x: torch.randn_like(x),
                                                    generator=torch.Generator(), sde=True)),
    Case("sample-generator", "generator", draw(generator=3, sde=True)),
    Case("sample-callback", "callback", draw(callback=3)),
    Case("sample-parameters", "parameters", draw(parameters=[3.0])),
    Case("sample-adjoint_steps", "adjoint_steps", draw(grad="adjoint", adjoint_steps=0, x_T=x_T().requires_grad_())),
    Case("sample-adjoint_order", "order", draw(grad="adjoint", adjoint_order=5, x_T=x_T().requires_grad_())),
    Case("sample-sde-str", "sde", draw(sde="yes")),
    # sample: the model's output
    Case("model-int", "model", draw(model=returns(lambda x: torch.zeros(x.shape, dtype=torch.int64)))),
    Case("model-complex", "model", draw(model=returns(lambda x: torch.zeros(x.shape, dtype=torch.complex64)))),
    Case("model-bool", "model", draw(model=returns(lambda x: torch.zeros(x.shape, dtype=torch.bool)))),
    Case("model-numpy", "model", draw(model=returns(lambda x: np.zeros(x.shape)))),
    Case("model-list", "model", draw(model=returns(lambda x: x.tolist()))),
    Case("model-none", "model", draw(model=returns(lambda x: None))),
    Case("model-tuple", "model", draw(model=returns(lambda x: (x,)))),
    Case("model-broadcasts", "model", draw(model=returns(lambda x: x[:1]))),
    Case("model-wrong-shape", "model", draw(model=returns(lambda x: x.flatten()))),
    Case("model-not-callable", "model", draw(model=3)),
    # sample: conditioning and guidance
    Case("cond-structure", "uncond", draw(cond=torch.zeros(2, 1), uncond={"a": torch.zeros(2, 1)},
                                          guidance_scale=2.0)),
    Case("cond-keys", "uncond", draw(cond={"a": torch.zeros(2, 1)}, uncond={"b": torch.zeros(2, 1)},
                                     guidance_scale=2.0)),
    Case("cond-shapes", "uncond", draw(cond=torch.zeros(2, 1), uncond=torch.zeros(2, 5), guidance_scale=2.0)),
    Case("cond-list", "cond", draw(cond=[1, 2])),
    Case("uncond-without-guidance", "uncond", draw(cond=torch.zeros(2, 1), uncond=torch.zeros(2, 1))),
    Case("cond-batch", "cond", draw(cond=torch.zeros(5, 1), uncond=torch.zeros(5, 1), guidance_scale=2.0)),
    Case("uncond-batch", "uncond", draw(cond=torch.zeros(2, 1), uncond=torch.zeros(1, 1), guidance_scale=2.0)),
    Case("uncond-dict-batch", "uncond['a']", draw(cond={"a": torch.zeros(2, 1)}, uncond={"a": torch.zeros(1, 1)},
                                                  guidance_scale=2.0)),
    Case("guidance-not-broadcast", "guidance_scale", draw(cond=torch.zeros(2, 1), uncond=torch.zeros(2, 1),
                                                          guidance_scale=torch.ones(5))),
    Case("guidance-str", "guidance_scale", draw(cond=torch.zeros(2, 1), uncond=torch.zeros(2, 1),
                                                guidance_scale="2")),
    Case("guidance-nan", "guidance_scale", draw(cond=torch.zeros(2, 1), uncond=torch.zeros(2, 1),
                                                guidance_scale=math.nan)),
    Case("guidance-no-uncond", "guidance_scale", draw(cond=torch.zeros(2, 1), guidance_scale=2.0)),
    Case("guidance-int-tensor", "guidance_scale", draw(cond=torch.zeros(2, 1), uncond=torch.zeros(2, 1),
                                                       guidance_scale=torch.tensor([1, 2]))),
    # schedules
    Case("linear-beta_min", "beta_min", lambda: ad.VPSchedule.linear(beta_min=-1.0)),
    Case("linear-beta_max", "beta_max", lambda: ad.VPSchedule.linear(beta_max="x")),
    Case("linear-t-order", "t_min", lambda: ad.VPSchedule.linear(t_min=0.5, t_max=0.1)),
    Case("cosine-s", "s", lambda: ad.VPSchedule.cosine(s=-1.0)),
    Case("flow-shift-negative", "shift", lambda: ad.FlowSchedule(shift=-1.0)),
    Case("flow-shift-nan", "shift", lambda: ad.FlowSchedule(shift=math.nan)),
    Case("flow-t_max", "t_max", lambda: ad.FlowSchedule(t_max=2.0)),
    Case("edm-sigma_min", "sigma_min", lambda: ad.EDMSchedule(sigma_min=-1.0)),
    Case("edm-rho", "rho", lambda: ad.EDMSchedule(rho=0.0)),
    Case("edm-order", "sigma_min", lambda: ad.EDMSchedule(sigma_min=10.0, sigma_max=1.0)),
    Case("from_betas-above-1", "betas", lambda: ad.VPSchedule.from_betas([0.5, 1.5])),
    Case("from_betas-complex", "betas", lambda: ad.VPSchedule.from_betas(torch.ones(3, dtype=torch.complex64))),
    Case("from_alphas_cumprod", "alphas_cumprod", lambda: ad.VPSchedule.from_alphas_cumprod([1.0, 2.0])),
    Case("timesteps-steps-float", "steps", lambda: VP.timesteps(2.5)),
    Case("timesteps-spacing", "spacing", lambda: VP.timesteps(3, "bad")),
    Case("config-beta_start", "beta_start", lambda: schedule_from_config({"beta_start": -0.1})),
    Case("config-beta_end", "beta_end", lambda: schedule_from_config({"beta_end": 1.5})),
    Case("config-trained_betas", "trained_betas", lambda: schedule_from_config({"trained_betas": [0.5, 1.5, 2.0]})),
    Case("config-num_train_timesteps", "num_train_timesteps",
         lambda: schedule_from_config({"num_train_timesteps": 10.5})),
    Case("config-flow_shift", "flow_shift", lambda: schedule_from_config({"use_flow_sigmas": True, "flow_shift": -1})),
    Case("config-shift", "shift", lambda: schedule_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                                "shift": -1.0})),
    Case("config-not-mapping", "config", lambda: schedule_from_config("linear")),
    # the diffusers scheduler
    Case("scheduler-beta_start", "beta_start", lambda: scheduler(beta_start=-0.1)),
    Case("scheduler-beta_end", "beta_end", lambda: scheduler(beta_end=2.0)),
    Case("scheduler-trained_betas", "trained_betas", lambda: scheduler(trained_betas=[0.1, 1.5, 2.0],
                                                                       num_train_timesteps=3)),
    Case("scheduler-shift", "shift", lambda: scheduler(family="flow_euler", shift=-1.0)),
    Case("scheduler-flow_shift", "flow_shift", lambda: scheduler(use_flow_sigmas=True, flow_shift=-1.0)),
    Case("scheduler-solver_order", "solver_order", lambda: scheduler(solver_order=2.5)),
    Case("scheduler-num_train_timesteps", "num_train_timesteps", lambda: scheduler(num_train_timesteps=0)),
    Case("scheduler-ratio", "dynamic_thresholding_ratio", lambda: scheduler(thresholding=True,
                                                                            dynamic_thresholding_ratio=1.5)),
    Case("scheduler-sample_max_value", "sample_max_value", lambda: scheduler(thresholding=True, sample_max_value=-1)),
    Case("set_timesteps-float", "num_inference_steps", set_timesteps(2.5)),
    Case("set_timesteps-zero", "num_inference_steps", set_timesteps(0)),
    Case("set_timesteps-rising", "timesteps", set_timesteps(timesteps=[5, 10])),
    Case("step-broadcasts", "model_output", stepped(model_output=torch.randn(1, 4, 3, 3))),
    Case("step-int-output", "model_output", stepped(model_output=torch.zeros(2, 4, 3, 3, dtype=torch.int64))),
    Case("step-list-output", "model_output", stepped(model_output=[[0.0]])),
    Case("step-sample-list", "sample", stepped(sample=[[0.0]])),
    Case("step-sample-int", "sample", stepped(sample=torch.zeros(2, 4, 3, 3, dtype=torch.int64))),
    Case("step-variance_noise", "variance_noise", stepped(variance_noise=torch.randn(5), algorithm_type="sde-dpmsolver++")),
    # denoise
    Case("denoise-latents-int", "latents", denoised(latents=torch.zeros(1, 2, 8, 8, dtype=torch.int64))),
    Case("denoise-steps-float", "num_inference_steps", denoised(num_inference_steps=2.5)),
    Case("denoise-steps-zero", "num_inference_steps", denoised(num_inference_steps=0)),
    Case("denoise-scheduler", "scheduler", lambda: __import__("adjointdeis.diffusers", fromlist=["denoise"]).denoise(
        tiny_unet(), torch.randn(1, 2, 8, 8), "dpmsolver")),
    # sample_ctm
    Case("ctm-gamma", "gamma", ctm(gamma=2.0)),
    Case("ctm-sigmas", "sigmas", ctm(sigmas=[0.0, 1.0, 80.0])),
    Case("ctm-output", "output", ctm(output="bad")),
    Case("ctm-model-int", "model", ctm(model=lambda x, t, u, c=None: torch.zeros(x.shape, dtype=torch.int64))),
    Case("ctm-model-complex", "model", ctm(model=lambda x, t, u, c=None: torch.zeros(x.shape, dtype=torch.complex64))),
    Case("ctm-x_T-int", "x_T", ctm(x_T=torch.zeros(2, 3, dtype=torch.int64))),
    Case("ctm-progress-str", "progress", ctm(progress="no")),
    Case("ctm-check_finite-none", "check_finite", ctm(check_finite=None)),
    Case("ctm-score_from_ctm-model", "model", lambda: ad.score_from_ctm(3)),
    # guide
    Case("guide-iters-float", "iters", guided(iters=2.5)),
    Case("guide-lr-negative", "lr", guided(lr=-1.0)),
    Case("guide-lr-str", "lr", guided(lr="a")),
    Case("guide-optimize", "optimize", guided(optimize="bad")),
    Case("guide-loss-vector", "loss_fn", guided(loss_fn=lambda x: x.flatten())),
    Case("guide-steps", "steps", guided(steps=0)),
    Case("guide-loss_fn-int", "loss_fn", guided(loss_fn=3)),
    Case("guide-loss-int", "loss_fn", guided(loss_fn=lambda x: torch.tensor(1))),
    Case("guide-loss-detached", "loss_fn", guided(loss_fn=lambda x: x.square().mean().detach())),
    Case("guide-x_T-int", "x_T", guided(x_T=torch.zeros(2, 3, dtype=torch.int64))),
    Case("guide-x_T-list", "x_T", guided(x_T=[[0.0, 1.0]])),
    Case("guide-optimize-int", "optimize", guided(optimize=3)),
    Case("guide-progress-str", "progress", guided(progress="yes")),
    Case("guide-noise-int", "noise", guided(optimize="noise", sde=True, noise=3)),
    # DSNO and its layer
    Case("layer-in_channels-float", "in_channels", layer(2.5, 2, 4, 2)),
    Case("layer-modes-big", "modes", layer(2, 2, 4, 10)),
    Case("layer-modes-float", "modes", layer(2, 2, 4, 2.0)),
    Case("layer-n_times-str", "n_times", layer(2, 2, "4", 2)),
    Case("layer-x-dims", "x", lambda: ad.FourierTemporalConv(2, 2, 4, 2)(torch.randn(4, 2, 3, 3))),
    Case("layer-x-int", "x", lambda: ad.FourierTemporalConv(2, 2, 4, 2)(torch.zeros(1, 4, 2, 3, 3, dtype=torch.int64))),
    Case("dsno-times-one", "times", lambda: ad.dsno.DSNO(Backbone(), [1.0])),
    Case("dsno-modes-zero", "modes", lambda: ad.dsno.DSNO(Backbone(), [3.0, 2.0, 1.0, 0.5], modes=0)),
    Case("dsno-modes-float", "modes", lambda: ad.dsno.DSNO(Backbone(), [3.0, 2.0, 1.0, 0.5], modes=1.5)),
    Case("dsno-times-float", "times", lambda: ad.dsno.DSNO(Backbone(), 4.5, schedule=VP)),
    Case("dsno-noise-3d", "noise", lambda: ad.dsno.DSNO(Backbone(), [3.0, 2.0, 1.0, 0.5])(torch.randn(2, 3, 3))),
    # the ops and their twins
    Case("op-step-out-dtype", "out", lambda: ops.multistep_step(**step_operands(out=torch.randn(2, 3).double())),
         errors=KERNEL),
    Case("op-step-coeffs", "coeffs", lambda: ops.multistep_step(**step_operands(coeffs=torch.zeros(3))),
         errors=KERNEL),
    Case("op-step-history", "history", lambda: ops.multistep_step(**step_operands(history=[torch.randn(5)])),
         errors=KERNEL),
    Case("op-spectral-modes", "modes", lambda: ops.fourier_spectral_conv(conv_input(), torch.zeros(6, 6), 9, True,
                                                                         None, False)),
    Case("op-spectral-mixing", "mixing", lambda: ops.fourier_spectral_conv(conv_input(), torch.zeros(5, 6), 2, True,
                                                                           None, False)),
    Case("op-channel-kernel", "kernel", lambda: ops.fourier_channel_conv(conv_input(), torch.zeros(3, 3, 2), True,
                                                                         None, False)),
    Case("op-conv-modes", "modes", lambda: ops.fourier_temporal_conv(conv_input(), torch.zeros(3, 2, 2,
                                                                                               dtype=torch.complex64), 0)),
    Case("op-axpy", "updates", lambda: ops.multi_tensor_axpy_([torch.zeros(3)], [], torch.ones(1, dtype=torch.float64)),
         errors=KERNEL),
    Case("ref-step-out-dtype", "out", lambda: reference.multistep_step(**step_operands(out=torch.randn(2, 3).double()))),
    Case("ref-axpy", "updates", lambda: reference.multi_tensor_axpy_([torch.zeros(3)], [],
                                                                     torch.ones(1, dtype=torch.float64))),
    Case("ref-spectral-modes", "modes", lambda: reference.fourier_spectral_conv(conv_input(), torch.zeros(6, 6), 9,
                                                                                True, None, False)),
    Case("ref-spectral-mixing", "mixing", lambda: reference.fourier_spectral_conv(conv_input(), torch.zeros(5, 6), 2,
                                                                                  True, None, False)),
    Case("ref-channel-kernel", "kernel", lambda: reference.fourier_channel_conv(conv_input(), torch.zeros(3, 3, 2),
                                                                                True, None, False)),
    Case("ref-tap-modes", "modes", lambda: reference.fourier_tap_synthesis(torch.zeros(2, 2, dtype=torch.complex64),
                                                                           4, 5)),
    Case("ref-mixing-real-weight", "weight", lambda: reference.fourier_mode_mixing(torch.zeros(2, 2, 2), 4, 2)),
    Case("ref-step-x-list", "x", lambda: reference.multistep_step(**step_operands(x=[[0.0]]))),
    # the zoo
    Case("zoo-name", "name", lambda: zoo.load("nope")),
    Case("zoo-name-int", "name", lambda: zoo.load(3)),
    Case("zoo-device", "device", lambda: zoo.load("digits", device="nodevice")),
    # the CLI
    Case("cli-steps", "--steps", cli("sample", "--steps", "0"), cli=True),
    Case("cli-order", "order", cli("sample", "--order", "9", "--n", "1", "--steps", "1"), cli=True),
    Case("cli-guidance-nan", "--guidance", cli("sample", "--guidance", "nan", "--n", "1", "--steps", "1",
                                               "--out", "/tmp/adjointdeis-bad-inputs.png"), cli=True),
    Case("cli-class", "--class", cli("sample", "--class", "12"), cli=True),
    Case("cli-out", "--out", cli("sample", "--out", "grid.txt"), cli=True),
    Case("cli-n-float", "--n", cli("sample", "--n", "2.5"), cli=True),
    Case("cli-lr", "--lr", cli("guide", "--lr", "-1"), cli=True),
    Case("cli-spacing-flow", "spacing", cli("sample", "--model", "digits-flow", "--spacing", "linspace", "--n", "1",
                                              "--steps", "1", "--out", "/tmp/adjointdeis-bad-inputs.png"), cli=True),
    Case("cli-times", "time domain", cli("diagnose", "--times", "-5", "--n", "2", "--probes", "2", "--points", "3"),
         cli=True),
    Case("cli-radius", "--radius", cli("diagnose", "--radius", "nan"), cli=True),
    Case("cli-json", "--json", cli("bench", "--json", "out.txt"), cli=True),
    Case("cli-lr-nan", "--lr", cli("guide", "--lr", "nan"), cli=True),
]


def _child(case: Case, conn) -> None:
    torch.set_num_threads(1)
    try:
        result = case.run()
    except BaseException as error:  # noqa: BLE001 - the outcome is what is being classified
        conn.send(("raised", [c.__name__ for c in type(error).__mro__], str(error)))
    else:
        if case.cli:
            conn.send(("exited", result[0], result[1]))
        else:
            conn.send(("returned", type(result).__name__, ""))
    conn.close()


def outcome(case: Case) -> tuple[bool, str]:
    """Runs `case` in a forked child; returns (good, what happened)."""
    parent, child = multiprocessing.get_context("fork").Pipe(duplex=False)
    process = multiprocessing.get_context("fork").Process(target=_child, args=(case, child))
    process.start()
    child.close()
    message = parent.recv() if parent.poll(TIMEOUT_S) else None
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    if message is None:
        return False, f"no answer (exit code {process.exitcode}: a crash or a hang)"
    kind, first, second = message
    if case.cli:
        if kind != "exited":
            return False, f"{first} escaped the CLI: {second}"
        # argparse's own errors print the usage first; torch may log a warning line (W1202 08:02:20 ...) on import
        lines = [line for line in second.strip().splitlines() if not re.match(r"[WI]\d{4} ", line)]
        good = first == 2 and bool(lines) and "Traceback" not in second and case.name in lines[-1] and (
            len(lines) == 1 or lines[0].startswith("usage:"))
        return good, f"exit {first}, stderr {second.strip()!r}"
    if kind == "returned":
        return False, f"no error (returned a {first})"
    good = bool(set(first) & set(case.errors)) and case.name in second
    return good, f"{first[0]}: {second}"


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=c.wired_later))
                                  if c.wired_later else c for c in CASES], ids=[c.id for c in CASES])
def test_bad_input_gets_a_clear_error(case):
    good, what = outcome(case)
    assert good, f"{case.id} (expected a ValueError/TypeError naming {case.name!r}): {what}"


def test_the_battery_covers_the_public_api():
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)


if __name__ == "__main__":
    bad = 0
    for case in CASES:
        good, what = outcome(case)
        bad += not good
        print(f"{'good' if good else 'BAD '}  {case.id:32s} {what[:150]!r}")
    print(f"{len(CASES) - bad} of {len(CASES)} cases give a clear error; {bad} do not")
    sys.exit(1 if bad else 0)
