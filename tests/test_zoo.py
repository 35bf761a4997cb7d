"""The shipped digits model: its weights load from the package (safetensors, no network), its samples are
recognised by the shipped classifier, and the training script reproduces weights of the same format."""

import json
import socket
import struct
import subprocess
import sys

import pytest
import torch

import adjointdeis as ad
from adjointdeis import zoo
from adjointdeis.metrics import class_accuracy
from adjointdeis.zoo.reflow import reflow


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: one intra-op thread is fastest, and spares a shared CPU the threads' spin-waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the zoo tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def safetensors_header(path):
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON): no pickle involved."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(size))


@pytest.mark.parametrize("name", ["digits.safetensors", "digits-classifier.safetensors", "digits-dsno.safetensors"])
def test_shipped_weights_are_small_safetensors_inside_the_package(name):
    path = zoo.WEIGHTS / name
    assert path.is_file(), f"{name} is not shipped in {zoo.WEIGHTS}"
    assert path.stat().st_size < 5 * 2**20
    header = safetensors_header(path)
    assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")


def test_load_digits_model_and_classifier_without_network(no_network):
    entry = zoo.load("digits")
    assert entry.prediction == "eps" and entry.shape == (1, 8, 8) and entry.num_classes == 10
    assert isinstance(entry.schedule, ad.NoiseSchedule)
    assert not entry.model.training
    params = sum(p.numel() for p in entry.model.parameters())
    assert 50_000 < params < 1_000_000
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        out = entry.model(x, torch.tensor([0.0, 500.0, 999.0]), torch.tensor([1, 5, 10]))
        logits = zoo.load_classifier()(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert logits.shape == (3, 10)
    with pytest.raises(ValueError, match="name must be one of"):
        zoo.load("faces")


def test_classifier_recognises_the_held_out_digits():
    from adjointdeis.zoo.data import load_digits_split

    _, _, test_x, test_y = load_digits_split()
    assert class_accuracy(zoo.load_classifier(), test_x, test_y) > 0.9


def test_samples_of_each_class_are_recognised_well_above_chance():
    """20-step DPM-Solver++(2M) samples, 8 per class: the classifier names most of them (chance is 10%)."""
    entry = zoo.load("digits")
    labels = torch.arange(80) % 10
    x_T = torch.randn(80, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = ad.sample(entry.model, x_T, entry.schedule, steps=20, solver="dpmpp", order=2, cond=labels)
    accuracy = class_accuracy(zoo.load_classifier(), images, labels)
    assert accuracy > 0.7, f"only {accuracy:.0%} of the samples are recognised as their class"
    logits = zoo.load_classifier()(images.clamp(-1, 1))
    per_class = (logits.argmax(1) == labels).view(8, 10).float().mean(0)
    assert (per_class >= 0.25).all(), f"some classes are rarely produced: {per_class.tolist()}"


def test_training_script_writes_loadable_weights_of_the_shipped_format(tmp_path, monkeypatch):
    result = subprocess.run([sys.executable, "-m", "adjointdeis.zoo.train", "--out", str(tmp_path), "--iters", "3",
                             "--classifier-iters", "3", "--seed", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("digits.safetensors", "digits-classifier.safetensors"):
        shipped, fresh = safetensors_header(zoo.WEIGHTS / name), safetensors_header(tmp_path / name)
        assert {k: (v["dtype"], v["shape"]) for k, v in fresh.items() if k != "__metadata__"} == \
               {k: (v["dtype"], v["shape"]) for k, v in shipped.items() if k != "__metadata__"}
    meta = safetensors_header(tmp_path / "digits.safetensors")["__metadata__"]
    assert meta["iters"] == "3" and meta["seed"] == "1" and meta["prediction"] == "eps"
    monkeypatch.setattr(zoo, "WEIGHTS", tmp_path)
    entry = zoo.load("digits")
    zoo.load_classifier()
    with torch.no_grad():
        x = ad.sample(entry.model, torch.randn(2, 1, 8, 8), entry.schedule, steps=2, cond=torch.tensor([3, 10]))
    assert torch.isfinite(x).all()


def test_dsno_student_samples_in_one_evaluation_are_recognised(no_network):
    entry = zoo.load("digits-dsno")
    assert entry.prediction == "trajectory" and entry.model.n_times == 4
    labels = torch.arange(80) % 10
    x_T = torch.randn(80, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    entry.model.backbone.register_forward_hook(lambda *args: calls.append(1))
    images = entry.model.sample(x_T, labels)
    assert len(calls) == 1 and images.shape == x_T.shape
    accuracy = class_accuracy(zoo.load_classifier(), images, labels)
    assert accuracy > 0.7, f"only {accuracy:.0%} of the DSNO samples are recognised as their class"


def test_distillation_script_writes_loadable_weights_of_the_shipped_format(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt.safetensors"
    result = subprocess.run([sys.executable, "-m", "adjointdeis.zoo.distill", "--out", str(tmp_path), "--iters", "2",
                             "--trajectories", "8", "--batch-size", "4", "--checkpoint", str(ckpt)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    name = "digits-dsno.safetensors"
    shipped, fresh = safetensors_header(zoo.WEIGHTS / name), safetensors_header(tmp_path / name)
    assert {k: (v["dtype"], v["shape"]) for k, v in fresh.items() if k != "__metadata__"} == \
           {k: (v["dtype"], v["shape"]) for k, v in shipped.items() if k != "__metadata__"}
    assert ckpt.is_file() and safetensors_header(ckpt)["__metadata__"]["iteration"] == "2"
    (tmp_path / "digits.safetensors").write_bytes((zoo.WEIGHTS / "digits.safetensors").read_bytes())
    monkeypatch.setattr(zoo, "WEIGHTS", tmp_path)
    trajectory = zoo.load("digits-dsno").model(torch.randn(2, 1, 8, 8), torch.tensor([3, 10]))
    assert trajectory.shape == (2, 4, 1, 8, 8) and torch.isfinite(trajectory).all()


FLOW_MODELS = ["digits-flow", "digits-flow-reflow"]


@pytest.mark.parametrize("name", FLOW_MODELS)
def test_flow_models_load_with_their_schedule_and_time_convention(name, no_network):
    """Flow models are called with the flow time t in (0, 1); the UNet inside sees 1000 t."""
    from adjointdeis.zoo.networks import DigitsUNet

    entry = zoo.load(name)
    assert entry.prediction == "flow" and entry.shape == (1, 8, 8) and entry.num_classes == 10
    assert isinstance(entry.schedule, ad.FlowSchedule)
    assert entry.schedule.t_max == 0.999 and entry.schedule.t_min == 0.001 and entry.schedule.shift == 1.0
    assert entry.spacing == "uniform" and entry.denoise_to_zero and not entry.model.training
    plain = DigitsUNet()
    plain.load_state_dict(entry.model.state_dict())
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0.001, 0.5, 0.999]), torch.tensor([1, 5, 10])
    with torch.no_grad():
        assert torch.equal(entry.model(x, t, y), plain(x, 1000 * t, y))
    header = safetensors_header(zoo.WEIGHTS / f"{name}.safetensors")
    assert header["__metadata__"]["prediction"] == "flow"
    assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")


@pytest.mark.parametrize("name", FLOW_MODELS)
def test_flow_model_heun_samples_are_recognised(name):
    """5 Heun steps (9 model evaluations), 8 samples per class: the classifier names most of them."""
    entry = zoo.load(name)
    labels = torch.arange(80) % 10
    x_T = torch.randn(80, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = ad.sample(entry.model, x_T, entry.schedule, steps=5, solver="heun", prediction="flow",
                           spacing=entry.spacing, denoise_to_zero=entry.denoise_to_zero, cond=labels)
    accuracy = class_accuracy(zoo.load_classifier(), images, labels)
    assert accuracy > 0.8, f"only {accuracy:.0%} of the samples are recognised as their class"


def test_reflow_straightens_few_step_sampling():
    """After ReFlow, one Euler step lands closer to what a fine solver makes from the same noise."""
    labels = torch.arange(40) % 10
    x_T = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    gaps = []
    for name in FLOW_MODELS:
        entry = zoo.load(name)
        run = lambda solver, steps: ad.sample(entry.model, x_T, entry.schedule, steps=steps, solver=solver,
                                              prediction="flow", spacing=entry.spacing, cond=labels,
                                              denoise_to_zero=entry.denoise_to_zero)
        with torch.no_grad():
            gaps.append((run("ddim", 1) - run("heun", 25)).pow(2).mean().item())
    assert gaps[1] < gaps[0] / 2, gaps


def test_reflow_tiny_run_fits_its_pairs_and_leaves_the_model_alone():
    from adjointdeis.zoo.reflow import reflow_pairs
    from adjointdeis.zoo.training import flow_loss

    entry = zoo.load("digits-flow")
    before = {k: v.clone() for k, v in entry.model.state_dict().items()}
    kwargs = dict(n_pairs=64, solver="ddim", steps=2, seed=3)
    tuned = reflow(entry, iters=20, lr=2e-3, progress=False, **kwargs)
    assert all(torch.equal(v, entry.model.state_dict()[k]) for k, v in before.items())
    assert isinstance(tuned, zoo.ZooModel) and tuned.model is not entry.model and not tuned.model.training
    assert tuned.schedule is entry.schedule and tuned.prediction == "flow" and tuned.spacing == entry.spacing
    assert tuned.denoise_to_zero == entry.denoise_to_zero
    x_T, x_0, labels = reflow_pairs(entry, progress=False, **kwargs)
    assert x_T.shape == x_0.shape == (64, 1, 8, 8) and torch.equal(labels, torch.arange(64) % 10)
    # The loss the fine-tuning minimises, on its own pairs, at the same times for both models.
    losses = []
    for model in (entry.model, tuned.model):
        with torch.no_grad():
            plain = lambda x, t, y: model(x, t / 1000, y)  # flow_loss feeds the UNet's 1000 t
            losses.append(flow_loss(plain, x_0, x_T, labels, torch.Generator().manual_seed(0)).item())
    assert losses[1] < 0.5 * losses[0], losses
    with torch.no_grad():
        out = tuned.model(x_T[:2], torch.tensor([0.5, 0.5]), labels[:2])
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_reflow_trains_on_the_time_input_its_model_samples_with(monkeypatch):
    from adjointdeis.zoo.networks import DigitsUNet, FlowDigitsUNet

    shipped = zoo.load("digits-flow")
    model = FlowDigitsUNet(time_scale=1.0)        # the same weights, fed t itself
    model.load_state_dict(shipped.model.state_dict())
    entry = zoo.ZooModel(model.eval(), shipped.schedule, "flow", shipped.shape, shipped.num_classes, shipped.spacing,
                         shipped.denoise_to_zero)
    seen, forward = [], DigitsUNet.forward
    monkeypatch.setattr(DigitsUNet, "forward", lambda self, x, t, y=None: seen.append(float(t.max())) or
                        forward(self, x, t, y))
    tuned = reflow(entry, n_pairs=8, iters=2, solver="ddim", steps=1, progress=False)
    assert tuned.model.time_scale == 1.0 and len(seen) > 2
    assert max(seen) <= 1.0, max(seen)            # sampling and training alike


def test_reflow_rejects_bad_arguments():
    with pytest.raises(ValueError, match="flow"):
        reflow(zoo.load("digits"), n_pairs=4, iters=1, progress=False)
    flow = zoo.load("digits-flow")
    with pytest.raises(ValueError, match="n_pairs"):
        reflow(flow, n_pairs=0, iters=1, progress=False)
    with pytest.raises(ValueError, match="iters"):
        reflow(flow, n_pairs=4, iters=0, progress=False)
    from adjointdeis.zoo.reflow import reflow_pairs
    with pytest.raises(ValueError, match="batch_size"):
        reflow_pairs(flow, n_pairs=4, batch_size=0, progress=False)


def test_training_script_writes_flow_and_reflow_weights(tmp_path, monkeypatch):
    from adjointdeis.zoo import train

    for extra in (["--kind", "flow", "--iters", "3"],
                  ["--kind", "reflow", "--iters", "2", "--pairs", "8", "--solver", "ddim", "--steps", "1"]):
        train.main(["--out", str(tmp_path), "--seed", "1", *extra])
    monkeypatch.setattr(zoo, "WEIGHTS", tmp_path)
    for name in FLOW_MODELS:
        meta = safetensors_header(tmp_path / f"{name}.safetensors")["__metadata__"]
        assert meta["prediction"] == "flow" and meta["seed"] == "1"
        entry = zoo.load(name)
        with torch.no_grad():
            x = ad.sample(entry.model, torch.randn(2, 1, 8, 8), entry.schedule, steps=2, solver="heun",
                          prediction="flow", cond=torch.tensor([3, 10]))
        assert torch.isfinite(x).all()
    assert safetensors_header(tmp_path / "digits-flow-reflow.safetensors")["__metadata__"]["reflow_pairs"] == "8"


def test_reflow_of_a_few_iterations_returns_an_average_of_its_iterates(monkeypatch):
    """An EMA is a convex combination of the training iterates: with fewer than 10 iterations (where reflow's
    rate 10 / iters was above 1, extrapolating past them) every weight must lie within the iterates' range."""
    iterates, step = [], torch.optim.AdamW.step

    def recorded(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        iterates.append(torch.cat([p.detach().flatten().clone() for p in self.param_groups[0]["params"]]))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", recorded)
    tuned = reflow(zoo.load("digits-flow"), n_pairs=16, iters=5, solver="ddim", steps=2, lr=5e-3, progress=False)
    weights = torch.cat([p.detach().flatten() for p in tuned.model.parameters()])
    iterates = torch.stack(iterates)
    assert len(iterates) == 5
    outside = torch.maximum(iterates.min(0).values - weights, weights - iterates.max(0).values)
    assert outside.max() <= 1e-7, float(outside.max())
    from adjointdeis.zoo.training import train_diffusion
    with pytest.raises(ValueError, match="ema_rate"):
        train_diffusion(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 1, 0, ema_rate=2.0, progress=False)


@pytest.mark.parametrize("script,argv,message", [
    ("train", ["--kind", "reflow"], "--kind reflow fine-tunes"),
    ("train", ["--seed", str(2**64)], "--seed must be an integer in [0, 2**64 - 1]"),
    ("distill", ["--lr", "nan"], "lr must be a finite number >= 0; got lr=nan"),
    ("distill", ["--batch-size", "0"], "batch_size must be a positive integer"),
])
def test_training_scripts_refuse_bad_arguments_in_one_line(tmp_path, capsys, script, argv, message):
    """These raised tracebacks (FileNotFoundError, an overflow, distill's ValueError) instead of a usage error."""
    import importlib

    main = importlib.import_module(f"adjointdeis.zoo.{script}").main
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
