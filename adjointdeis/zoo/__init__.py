"""Pretrained models shipped inside the package (safetensors, loaded without pickle).

    entry = ad.zoo.load("digits")        # entry.model(x, t, cond), entry.schedule, entry.prediction
    student = ad.zoo.load("digits-dsno")  # student.model(noise, cond) -> trajectory; prediction "trajectory"

Models: "digits" (eps prediction, discrete VP schedule), "digits-flow" (rectified flow: prediction
"flow" on a :class:`FlowSchedule`), "digits-flow-reflow" (one round of
:func:`adjointdeis.zoo.reflow.reflow` on it) and
"digits-dsno" (the DSNO student distilled from "digits": one network evaluation per sample).
"""

import json
import pathlib
from dataclasses import dataclass

import torch

from .. import validation
from ..dsno import DSNO
from ..schedules import FlowSchedule, NoiseSchedule, VPSchedule
from .networks import DigitClassifier, DigitsUNet, FlowDigitsUNet

WEIGHTS = pathlib.Path(__file__).with_name("weights")
MODELS = ("digits", "digits-flow", "digits-flow-reflow", "digits-dsno")


@dataclass
class ZooModel:
    """A shipped model with what is needed to sample from it.

    Attributes:
        model: ``model(x, t, cond)``; x (batch, 1, 8, 8), t (batch,) the schedule's model time
            (training timesteps 0-999 for "digits", the flow time in (0, 1) for the flow models),
            cond (batch,) int64 class labels (10 = unconditional) or (batch, 64) embeddings.
            For "digits-dsno" (prediction "trajectory"): a :class:`~adjointdeis.dsno.DSNO`,
            ``model(noise, cond)`` -> (batch, T, 1, 8, 8), the last point the sample.
        schedule: the schedule it was trained on (the teacher's, for "digits-dsno").
        prediction: "eps", "flow" or "trajectory".
        shape: the shape of one sample.
        num_classes: number of classes (the unconditional label is ``num_classes``).
        spacing: the time grid it samples best with ("logsnr"; "uniform" in t for the flow models).
        denoise_to_zero: whether its samplers' last step lands on zero noise (True for the flow models,
            as diffusers' flow schedulers: on a uniform grid in t the last step to ``t_min`` is a long
            jump in log-SNR that multistep solvers extrapolate badly; a step to zero is first order).
    """

    model: torch.nn.Module
    schedule: NoiseSchedule
    prediction: str
    shape: tuple[int, ...]
    num_classes: int
    spacing: str = "logsnr"
    denoise_to_zero: bool = False


def read_weights(path: pathlib.Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, read without pickle.

    Raises:
        FileNotFoundError naming the file when it is missing; ValueError naming it when it is not a safetensors
        file (a pickled ``.pt`` file, say: never unpickled).
    """
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} is not in this installation of adjointdeis ({path.parent})")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a safetensors file ({error}); weights are read without pickle") from None


def flow_entry(model: FlowDigitsUNet, meta: dict) -> ZooModel:
    """A flow model's entry from its safetensors metadata (shift, t_min, t_max, spacing, denoise_to_zero)."""
    schedule = FlowSchedule(float(meta.get("shift", 1.0)), float(meta.get("t_min", 1e-3)),
                            float(meta.get("t_max", 1 - 1e-3)))
    return ZooModel(model, schedule, "flow", (1, 8, 8), model.num_classes, meta.get("spacing", "uniform"),
                    meta.get("denoise_to_zero", "true") == "true")


def load(name: str = "digits", device: str | torch.device = "cpu") -> ZooModel:
    """Loads a shipped model in eval mode.

    Args:
        name: one of ``MODELS``.
        device: where to put the model.

    Raises:
        ValueError naming name or device for an unknown model or device.
    """
    validation.choice(name, "name", MODELS)
    device = validation.device(device, "device")
    if name == "digits-dsno":
        return _load_dsno(device)
    state, meta = read_weights(WEIGHTS / f"{name}.safetensors")
    if meta.get("prediction") == "flow":
        model = FlowDigitsUNet(float(meta.get("time_scale", 1000.0)))
        model.load_state_dict(state)
        return flow_entry(model.eval().to(device), meta)
    model = DigitsUNet()
    model.load_state_dict(state)
    return ZooModel(model.eval().to(device), _vp_schedule(meta), meta["prediction"], model.sample_shape,
                    model.num_classes)


def _vp_schedule(meta: dict) -> VPSchedule:
    """The discrete VP schedule of a model's safetensors metadata (linear betas)."""
    beta_start, beta_end = json.loads(meta["betas"])
    betas = torch.linspace(beta_start, beta_end, int(meta["num_train_timesteps"]), dtype=torch.float64)
    return VPSchedule.from_betas(betas)


def _load_dsno(device) -> ZooModel:
    from safetensors import safe_open

    state, meta = read_weights(WEIGHTS / "digits-dsno.safetensors")
    with safe_open(str(WEIGHTS / f"{meta['teacher']}.safetensors"), framework="pt") as f:
        teacher_meta = f.metadata()   # the teacher's schedule, without loading its tensors
    student = DSNO(DigitsUNet(), state["times"], int(meta["modes"]))
    student.load_state_dict(state)
    return ZooModel(student.eval().to(device), _vp_schedule(teacher_meta), "trajectory", DigitsUNet.sample_shape,
                    student.backbone.num_classes)


def load_classifier(device: str | torch.device = "cpu") -> DigitClassifier:
    """The digit classifier the metrics use (trained by the same script), in eval mode."""
    device = validation.device(device, "device")
    state, _ = read_weights(WEIGHTS / "digits-classifier.safetensors")
    net = DigitClassifier()
    net.load_state_dict(state)
    return net.eval().to(device)
