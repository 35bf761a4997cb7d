"""Property-based fuzzing of the public entry points: malformed arguments give a clear error or a correct result.

Each test draws one argument of an entry point to corrupt and a value for it (of any kind: None, bools, integers,
floats with NaN and infinities, strings, lists, tensors of every dtype and odd shapes) and asserts that the call
either raises ``ValueError`` / ``TypeError`` whose message names the argument, or returns a correct result: a
tensor of the expected shape, finite wherever the inputs were finite (never NaN out of finite input), and for the
ops equal to their pure-PyTorch twins. The bad-input battery (tests/test_bad_inputs.py) pins the known cases;
these look for the unknown ones. Examples are derandomised so that CI runs the same ones every time
(``ADJOINTDEIS_FUZZ_EXAMPLES=500`` runs that many random ones instead).
"""

import contextlib
import io
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import adjointdeis as ad
from adjointdeis import ops, reference
from nets import ResidualBlock

# CI runs 40 derandomised examples per test (8 for the slow ones); ADJOINTDEIS_FUZZ_EXAMPLES=N runs N random ones.
EXAMPLES = int(os.environ.get("ADJOINTDEIS_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 40, deadline=None, derandomize=not EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.too_slow])
FEW = settings(FUZZ, max_examples=max(8, EXAMPLES // 5))

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
          torch.complex64, torch.uint8]


@st.composite
def tensors(draw, shapes=None):
    """Tensors of every dtype and of small odd shapes (0-d, empty, wrong rank), finite values."""
    shape = draw(shapes if shapes is not None else st.lists(st.integers(0, 4), min_size=0, max_size=4))
    dtype = draw(st.sampled_from(DTYPES))
    values = torch.linspace(-1, 1, max(1, math.prod(shape)), dtype=torch.float64)[:math.prod(shape)]
    return values.reshape(shape).to(dtype)


def values(tensor_shapes=None):
    """A value of any kind, finite floats bounded so that overflow is not the question."""
    finite = st.floats(-1e3, 1e3, allow_nan=False)
    return st.one_of(st.none(), st.booleans(), st.integers(-3, 40), finite, st.sampled_from([math.nan, math.inf,
                     -math.inf]), st.text(max_size=4), st.lists(finite, max_size=4), st.complex_numbers(max_magnitude=2),
                     tensors(tensor_shapes))


@pytest.fixture(autouse=True, scope="module")
def keep_the_device_table_memo():
    """The fuzzed runs build hundreds of plans; leave the run loop's bounded memos (tables, row views) as they were
    found."""
    from adjointdeis import planning

    memos = planning._DEVICE_TABLES, planning._ROW_VIEWS
    kept = [dict(memo) for memo in memos]
    yield
    for memo, entries in zip(memos, kept):
        memo.clear()
        memo.update(entries)


def finite_inputs(*inputs) -> bool:
    """Whether every number and tensor among the inputs is finite (then the result must be finite too)."""
    for value in inputs:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if isinstance(value, (list, tuple)) and not finite_inputs(*value):
            return False
    return True


def clear_error_or(call, name: str | tuple[str, ...], check):
    """Runs `call`: a ValueError/TypeError must name `name` (one of the names); a result goes to `check`."""
    try:
        result = call()
    except (ValueError, TypeError) as error:
        names = (name,) if isinstance(name, str) else name
        assert any(n in str(error) for n in names), f"the error does not name {name!r}: {type(error).__name__}: {error}"
        return None
    check(result)
    return result


def finite_tensor(shape, finite: bool = True):
    def check(result):
        assert isinstance(result, torch.Tensor) and tuple(result.shape) == tuple(shape), result
        if finite:
            assert torch.isfinite(result).all(), "NaN or Inf out of finite input"
    return check


def model(x, t, cond=None):
    return 0.5 * x + (0.0 if cond is None else 0.1 * cond.mean())


X_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
SAMPLE_ARGS = ["steps", "solver", "order", "spacing", "prediction", "timesteps", "sde", "third_order",
               "second_order", "denoise_to_zero", "guidance_scale", "uncond", "cond", "threshold", "adjoint_steps"]


CHOICES = ["dpmpp", "ddim", "deis", "heun", "dpmsolver", "renoise", "eps", "x0", "v", "flow", "logsnr", "karras",
           "taylor", "midpoint"]


@FUZZ
@given(name=st.sampled_from(SAMPLE_ARGS), value=st.one_of(values(), st.sampled_from(CHOICES)))
def test_sample(name, value):
    kwargs = dict(steps=3)
    if name in ("guidance_scale", "uncond", "cond"):
        kwargs.update(cond=torch.ones(2, 1, dtype=torch.float64), uncond=torch.zeros(2, 1, dtype=torch.float64),
                      guidance_scale=2.0)
    if name == "adjoint_steps":
        kwargs.update(grad="adjoint")
    kwargs[name] = value
    x = X_T.clone().requires_grad_(name == "adjoint_steps")
    clear_error_or(lambda: ad.sample(model, x, ad.VPSchedule.linear(), **kwargs), name,
                   finite_tensor(X_T.shape, finite_inputs(value)))


@FUZZ
@given(out=values(st.sampled_from([(2, 3), (1, 3), (2, 1), (3,), (2, 3, 1), ()])))
def test_sample_model_output(out):
    def returns(x, t):
        return out.to(x.device) if isinstance(out, torch.Tensor) else out

    clear_error_or(lambda: ad.sample(returns, X_T, ad.VPSchedule.linear(), steps=2), "model",
                   finite_tensor(X_T.shape))


SCHEDULES = {
    "linear": (ad.VPSchedule.linear, ["beta_min", "beta_max", "t_min", "t_max"]),
    "cosine": (ad.VPSchedule.cosine, ["s", "t_min", "t_max"]),
    "flow": (ad.FlowSchedule, ["shift", "t_min", "t_max"]),
    "edm": (ad.EDMSchedule, ["sigma_min", "sigma_max", "rho"]),
}


@FUZZ
@given(kind=st.sampled_from(sorted(SCHEDULES)), data=st.data(), value=values())
def test_schedules(kind, data, value):
    build, names = SCHEDULES[kind]
    name = data.draw(st.sampled_from(names))

    def check(sched):
        ts = sched.timesteps(4, "uniform")
        assert torch.isfinite(ts).all() and bool((ts[1:] < ts[:-1]).all())
        assert torch.isfinite(sched.alpha(ts)).all() and torch.isfinite(sched.sigma(ts)).all()
        assert torch.isfinite(sched.half_log_snr(ts[1:-1])).all()

    clear_error_or(lambda: build(**{name: value}), name, check)


@FUZZ
@given(steps=values(), spacing=st.sampled_from(["uniform", "logsnr", "quadratic", "karras", "linspace", "bad"]))
def test_schedule_timesteps(steps, spacing):
    sched = ad.VPSchedule.from_betas(torch.linspace(1e-4, 0.02, 50, dtype=torch.float64))
    valid_count = isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1
    name = "spacing" if valid_count and spacing == "bad" else "steps"

    def check(ts):
        assert torch.isfinite(ts).all() and bool((ts[1:] < ts[:-1]).all())

    clear_error_or(lambda: sched.timesteps(steps, spacing), name, check)


CONFIG_KEYS = {"beta_start": {}, "beta_end": {}, "num_train_timesteps": {}, "solver_order": {}, "steps_offset": {},
               "trained_betas": {}, "shift": {"family": "flow_euler"}, "flow_shift": {"use_flow_sigmas": True},
               "dynamic_thresholding_ratio": {"thresholding": True}, "sample_max_value": {"thresholding": True},
               "timestep_spacing": {}, "prediction_type": {}, "algorithm_type": {}}


@FUZZ
@given(key=st.sampled_from(sorted(CONFIG_KEYS)), value=values())
def test_diffusers_scheduler_config(key, value):
    pytest.importorskip("diffusers")
    from adjointdeis.diffusers import FusedMultistepScheduler

    if key == "num_train_timesteps" and isinstance(value, int) and not isinstance(value, bool):
        value = min(value, 40)
    config = {**CONFIG_KEYS[key], key: value}
    if key == "trained_betas" and (isinstance(value, list) or getattr(value, "ndim", 0) == 1) and len(value) >= 2:
        config["num_train_timesteps"] = len(value)

    def check(scheduler):
        scheduler.set_timesteps(3)
        x = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            x = scheduler.step(0.1 * x, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.isfinite(x).all()

    try:
        clear_error_or(lambda: FusedMultistepScheduler(**config), key, check)
    except (ValueError, TypeError) as error:   # from set_timesteps on a scheduler that was built
        assert "set_timesteps" in str(error) or "num_train_timesteps" in str(error), error


@FUZZ
@given(name=st.sampled_from(["model_output", "sample", "variance_noise"]),
       value=values(st.sampled_from([(2, 4, 3, 3), (1, 4, 3, 3), (2, 4, 1, 1), (4, 3, 3), (2, 8, 3, 3), ()])))
def test_diffusers_scheduler_step(name, value):
    pytest.importorskip("diffusers")
    from adjointdeis.diffusers import FusedMultistepScheduler

    scheduler = FusedMultistepScheduler(algorithm_type="sde-dpmsolver++")
    scheduler.set_timesteps(3)
    arguments = dict(model_output=torch.randn(2, 4, 3, 3), sample=torch.randn(2, 4, 3, 3),
                     variance_noise=torch.randn(2, 4, 3, 3))
    arguments[name] = value
    clear_error_or(lambda: scheduler.step(timestep=scheduler.timesteps[0], **arguments).prev_sample, name,
                   finite_tensor((2, 4, 3, 3)))


def two_time(x, t, u, cond=None):
    return 0.9 * x


@FUZZ
@given(name=st.sampled_from(["gamma", "sigmas", "output", "x_T"]), value=values())
def test_sample_ctm(name, value):
    kwargs = dict(x_T=torch.randn(2, 3), sigmas=[10.0, 1.0, 0.0], gamma=0.5, output="g")
    kwargs[name] = value
    shape = (2, 3) if name != "x_T" or not isinstance(value, torch.Tensor) else tuple(value.shape)
    clear_error_or(lambda: ad.sample_ctm(two_time, generator=torch.Generator().manual_seed(0), **kwargs), name,
                   finite_tensor(shape, finite_inputs(value)))


@FUZZ
@given(name=st.sampled_from(["in_channels", "out_channels", "n_times", "modes", "activation", "residual",
                             "channelwise"]), value=values())
def test_fourier_temporal_conv_layer(name, value):
    kwargs = dict(in_channels=2, out_channels=2, n_times=4, modes=2)
    kwargs[name] = value

    def check(layer):
        x = torch.randn(1, layer.n_times, layer.in_channels, 2, 2)
        finite_tensor((1, layer.n_times, layer.out_channels, 2, 2))(layer(x))

    clear_error_or(lambda: ad.FourierTemporalConv(**kwargs), name, check)


class Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ResidualBlock()

    def forward(self, x, t, cond=None):
        return self.block(x) * (1 + t.to(x.dtype)[:, None, None, None] * 0.01)


@FUZZ
@given(name=st.sampled_from(["times", "modes", "noise"]), value=values())
def test_dsno(name, value):
    if name == "noise" and isinstance(value, torch.Tensor) and value.is_floating_point():
        # The backbone's dtype and channels: another one is the backbone's own error.
        value = value.float()
        assume(value.dim() != 4 or (value.shape[1] == 2 and min(value.shape[2:]) > 0))
    kwargs = dict(times=[3.0, 2.0, 1.0, 0.5], modes=2)
    noise = torch.randn(2, 2, 3, 3)
    if name == "noise":
        student = ad.dsno.DSNO(Backbone(), **kwargs)
        shape = (value.shape[0], 4, *value.shape[1:]) if isinstance(value, torch.Tensor) and value.dim() == 4 else None
        clear_error_or(lambda: student(value), "noise", finite_tensor(shape))
        return
    kwargs[name] = value

    def check(student):
        finite_tensor((2, student.n_times, 2, 3, 3))(student(noise))

    clear_error_or(lambda: ad.dsno.DSNO(Backbone(), schedule=ad.VPSchedule.linear(), **kwargs), name, check)


@FUZZ
@given(name=st.sampled_from(["x", "weight", "modes", "negative_slope"]), value=values(
    st.sampled_from([(1, 4, 2, 2, 2), (1, 4, 3, 2, 2), (3, 2, 2), (2, 2, 2), (4, 2), (1, 1, 2, 2, 2), ()])),
    channelwise=st.booleans())
def test_fourier_ops_and_twins(name, value, channelwise):
    weight = torch.randn(3, 2, dtype=torch.complex64) if channelwise else torch.randn(3, 2, 2, dtype=torch.complex64)
    kwargs = dict(x=torch.randn(1, 4, 2, 2, 2), weight=weight, modes=2, negative_slope=0.01)
    kwargs[name] = value
    op = ops.fourier_temporal_conv_channelwise if channelwise else ops.fourier_temporal_conv
    twin = reference.fourier_temporal_conv_channelwise if channelwise else reference.fourier_temporal_conv
    got = clear_error_or(lambda: op(**kwargs), name, lambda y: None)
    want = clear_error_or(lambda: twin(**kwargs), name, lambda y: None)
    assert (got is None) == (want is None), "the op and its twin disagree on whether the input is valid"
    if got is not None:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.isfinite(got).all()


@FUZZ
@given(name=st.sampled_from(["x", "mixing", "modes"]), value=values(
    st.sampled_from([(1, 4, 2, 2, 2), (6, 6), (5, 6), (6, 5), (10, 10), (1, 4, 3, 2, 2), ()])))
def test_fourier_spectral_op_and_twin(name, value):
    kwargs = dict(x=torch.randn(1, 4, 2, 2, 2), mixing=torch.randn(6, 6), modes=2)
    kwargs[name] = value
    names = (name, "mixing")   # another valid modes makes the mixing the wrong size
    got = clear_error_or(lambda: ops.fourier_spectral_conv(residual=False, negative_slope=None, save_mask=False,
                                                           **kwargs)[0], names, lambda y: None)
    want = clear_error_or(lambda: reference.fourier_spectral_conv(residual=False, negative_slope=None,
                                                                  save_mask=False, **kwargs)[0], names, lambda y: None)
    assert (got is None) == (want is None), "the op and its twin disagree on whether the input is valid"
    if got is not None:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@FUZZ
@given(name=st.sampled_from(["out", "noise", "history"]), value=values(st.sampled_from([(2, 3), (1, 3), (3,), (2, 1),
                                                                                        (4, 3), ()])))
def test_multistep_step_twin(name, value):
    kwargs = dict(x=torch.randn(2, 3), out=torch.randn(2, 3), history=[torch.randn(2, 3)],
                  coeffs=torch.tensor([0.5, 0.2, 0.1, 0.0, 0.3, 1.0, 0.5], dtype=torch.float64), noise=None)
    kwargs[name] = [value] if name == "history" else value
    def check(result):   # a valid operand broadcasts with x's shape, maybe to a larger one
        operand = value if isinstance(value, torch.Tensor) else x
        finite_tensor(torch.broadcast_shapes((2, 3), tuple(operand.shape)))(result)

    x = kwargs["x"]
    clear_error_or(lambda: reference.multistep_step(**kwargs)[0], name, check)


@FEW
@given(name=st.sampled_from(["steps", "iters", "lr", "optimize", "clip_grad", "tol"]),
       value=st.one_of(st.none(), st.integers(-2, 3), st.floats(-1, 1, allow_nan=False),
                       st.sampled_from([math.nan, math.inf, "x_T", "cond", "bad"])))
def test_guide(name, value):
    kwargs = dict(steps=2, iters=2, lr=0.05, optimize="x_T")
    kwargs[name] = value
    clear_error_or(lambda: ad.guide(model, ad.VPSchedule.linear(), lambda x: x.square().mean(), X_T, progress=False,
                                    **kwargs).sample, name, finite_tensor(X_T.shape, finite_inputs(value)))


@FEW
@given(name=st.sampled_from(["name", "device"]), value=st.one_of(st.text(max_size=6), st.integers(-1, 2),
                                                                 st.none(), st.sampled_from(["digits", "cpu"])))
def test_zoo_load(name, value):
    from adjointdeis import zoo

    kwargs = {"name": "digits", "device": "cpu", name: value}
    clear_error_or(lambda: zoo.load(**kwargs), name, lambda loaded: None)


@FEW
@given(option=st.sampled_from(["--steps", "--class", "--guidance", "--n", "--order", "--spacing", "--seed"]),
       text=st.one_of(st.sampled_from(["0", "-1", "nan", "inf", "2.5", "x", "", "1", "karras", "linspace"]),
                      st.text(alphabet="0123456789.-e", max_size=4)))
def test_cli_sample(option, text, tmp_path_factory):
    from adjointdeis.cli import main

    out = tmp_path_factory.mktemp("cli") / "grid.png"
    argv = ["sample", "--n", "1", "--steps", "1", "--out", str(out), option, text]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code
    lines = [line for line in err.getvalue().splitlines() if not line.startswith(("W1", "I1"))]
    assert "Traceback" not in err.getvalue()
    if status == 0:
        assert out.is_file()
    else:
        assert status == 2 and lines and "error:" in lines[-1], err.getvalue()
