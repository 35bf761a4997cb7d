"""The discrete adjoint never touches the user's module: threads sharing one model, compiled, tied and
escaping parameters, hooks and buffers."""

import threading

import pytest
import torch
from torch import nn

import adjointdeis as ad
from nets import TinyConvNet

THREADS = 8


def case(seed):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=g)
    cond = torch.randn(2, 4, dtype=torch.float64, generator=g)
    weight = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=g)
    return x_T, cond, weight


def discrete_gradients(net, seed, **kwargs):
    """dL/dx_T and dL/dtheta of one SDE run, through ``torch.autograd.grad`` (nothing written to ``.grad``)."""
    x_T, cond, weight = case(seed)
    x_T.requires_grad_()
    x = ad.sample(net, x_T, ad.VPSchedule.linear(), steps=5, order=2, sde=True, cond=cond, grad="discrete",
                  generator=torch.Generator().manual_seed(seed), **kwargs)
    return torch.autograd.grad((weight * x).sum(), [x_T, *net.parameters()])


def test_threads_sharing_one_model_get_sequential_gradients_and_leave_it_intact():
    torch.manual_seed(0)
    net = TinyConvNet().double()
    originals = list(net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sequential = [discrete_gradients(net, seed) for seed in range(THREADS)]
    results, errors = [None] * THREADS, []
    start = threading.Barrier(THREADS)

    def work(seed):
        try:
            start.wait()
            for _ in range(3):
                results[seed] = discrete_gradients(net, seed)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, sequential):
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    now = list(net.parameters())
    assert len(now) == len(originals) and all(p is q for p, q in zip(now, originals))
    assert all(type(p) is nn.Parameter and p.grad is None for p in now)
    # A later single-threaded backward fills the originals' .grad, and the optimiser built before trains them.
    x_T, cond, weight = case(0)
    x = ad.sample(net, x_T, ad.VPSchedule.linear(), steps=5, cond=cond, grad="discrete")
    (weight * x).sum().backward()
    assert all(p.grad is not None for p in originals)
    before = [p.detach().clone() for p in originals]
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(originals, before))


class Tied(nn.Module):
    """A model with a tied weight, a buffer written in its forward, a hook, and a submodule its forward does not
    reach, or (`escaping`) reaches through a plain list, outside ``_modules``."""

    def __init__(self, escaping=False):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))
        self.c = nn.Linear(8, 8)
        self.hidden = [self.c] if escaping else []
        self.hook_seen = []
        self.a.register_forward_hook(lambda m, i, o: self.hook_seen.append(m))

    def forward(self, x, t):
        self.calls += 1
        h = torch.tanh(self.a(x.flatten(1)) + t[:, None])
        for layer in self.hidden:
            h = h + layer(h)
        return self.b(h).view_as(x)


@pytest.mark.parametrize("escaping", [False, True])
def test_tied_buffers_hooks_and_escaping_parameters(escaping):
    """Tied weights get one gradient, buffers are the user's, hooks fire, and a parameter the forward reaches
    outside ``_modules`` still gets its gradient, one it does not reach none; all as autograd's, the module
    untouched."""
    torch.manual_seed(1)
    net = Tied(escaping).double()
    params = list(net.parameters())
    names = dict(net.named_parameters())
    x_T = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    grads = {}
    for mode in ("autograd", "discrete"):
        x = ad.sample(net, x_T, ad.VPSchedule.linear(), steps=4, grad=mode, parameters=params)
        grads[mode] = torch.autograd.grad((weight * x).sum(), [x_T, *params], allow_unused=True)
    assert (grads["autograd"][-1] is None) is not escaping
    for g, w in zip(grads["discrete"], grads["autograd"]):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert dict(net.named_parameters()) == names and net.b.weight is net.a.weight
    # autograd's run and discrete's: the backward pass's re-runs leave a train-mode module's buffers as the
    # forward pass left them
    assert float(net.calls) == 4 + 4
    # hooks fire in discrete's 3 re-runs too (the forward pass's graph of the last row pulled back), 4 when a
    # parameter escapes the aliases (that graph is then dropped)
    assert len(net.hook_seen) == 11 + escaping and all(type(m) is nn.Linear for m in net.hook_seen)


def test_compiled_module():
    """A ``torch.compile``'d model: the same gradients as its eager original, its parameters untouched, compiled
    once."""
    torch.manual_seed(2)
    net = TinyConvNet().double()
    compiled = torch.compile(net)
    originals = list(compiled.parameters())
    want = discrete_gradients(net, 0)
    got = discrete_gradients(compiled, 0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    discrete_gradients(compiled, 1)  # a new shadow copy per backward pass: no recompilation
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert all(p is q and type(p) is nn.Parameter for p, q in zip(compiled.parameters(), originals))
