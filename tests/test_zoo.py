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
    with pytest.raises(ValueError, match="unknown zoo model"):
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
