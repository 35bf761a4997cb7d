"""DistributedDataParallel and FSDP2: parameter gradients through sampling are averaged across ranks as DDP and
FSDP would."""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _init(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _rank_main(rank, init_file, results_dir):
    _init(rank, init_file)
    try:
        _ddp_case(rank, results_dir)   # its DDP module freed on return, before the group it holds is destroyed
        dist.barrier()   # and both ranks done: tearing down with a DDP module alive aborted 1 run in 5
    finally:
        dist.destroy_process_group()


def _ddp_case(rank, results_dir):
    sys.path.insert(0, os.path.dirname(__file__))
    import adjointdeis as ad
    from nets import TinyConvNet

    torch.manual_seed(0)
    net = TinyConvNet().double()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    sched = ad.VPSchedule.linear()
    g = torch.Generator().manual_seed(10 + rank)  # every rank samples different noise
    x_T = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=g)
    cond = torch.randn(2, 4, dtype=torch.float64, generator=g)
    weight = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=g)

    def averaged_reference(mode):
        """The same gradient on the unwrapped model, all-reduced by hand."""
        x = ad.sample(net, x_T, sched, steps=4, cond=cond, grad=mode, adjoint_form="x0")
        (weight * x).sum().backward()
        reference = []
        for p in net.parameters():
            dist.all_reduce(p.grad)
            reference.append(p.grad / WORLD)
            p.grad = None
        return reference

    # The discrete adjoint is the gradient plain autograd (DDP's own path) computes.
    for mode, reference_mode in (("discrete", "autograd"), ("adjoint", "adjoint")):
        reference = averaged_reference(reference_mode)
        x = ad.sample(ddp, x_T, sched, steps=4, cond=cond, grad=mode, adjoint_form="x0")
        (weight * x).sum().backward()
        grads = [p.grad.clone() for p in net.parameters()]
        for p in net.parameters():
            p.grad = None
        torch.save({"mode": mode, "grads": grads, "reference": reference},
                   os.path.join(results_dir, f"{mode}-{rank}.pt"))


def test_ddp_parameter_gradients_are_reduced(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for mode in ("discrete", "adjoint"):
        per_rank = [torch.load(tmp_path / f"{mode}-{r}.pt", weights_only=True) for r in range(WORLD)]
        for grad0, grad1 in zip(per_rank[0]["grads"], per_rank[1]["grads"]):
            torch.testing.assert_close(grad0, grad1, rtol=0, atol=0)  # identical on every rank
        for got, want in zip(per_rank[0]["grads"], per_rank[0]["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _fsdp_main(rank, init_file, results_dir):
    sys.path.insert(0, os.path.dirname(__file__))
    import adjointdeis as ad
    from memory import SavedBytes
    from nets import TinyConvNet
    from torch.distributed.fsdp import fully_shard

    _init(rank, init_file)
    try:
        torch.manual_seed(0)
        net = TinyConvNet().double()
        single = TinyConvNet().double()
        single.load_state_dict(net.state_dict())
        net.time.requires_grad_(False)  # a frozen submodule
        single.time.requires_grad_(False)
        for layer in (net.inp, net.mid):
            fully_shard(layer)
        fully_shard(net)
        sched = ad.VPSchedule.linear()
        g = torch.Generator().manual_seed(10 + rank)  # every rank samples different noise
        x_T = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=g)
        cond = torch.randn(2, 4, dtype=torch.float64, generator=g)
        weight = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=g)
        out = {}
        for steps in (3, 6):
            # The single-process gradient, averaged over the ranks by hand.
            x = ad.sample(single, x_T, sched, steps=steps, cond=cond, grad="autograd")
            (weight * x).sum().backward()
            reference = []
            for p in single.parameters():
                if p.requires_grad:
                    dist.all_reduce(p.grad)
                    reference.append(p.grad / WORLD)
                    p.grad = None
            meter = SavedBytes()
            x_in = x_T.clone().requires_grad_()
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
                x = ad.sample(net, x_in, sched, steps=steps, cond=cond, grad="discrete")
                (weight * x).sum().backward()
            grads = [p.grad.full_tensor() for p in net.parameters() if p.requires_grad]
            assert all(p.grad is None for p in net.time.parameters())
            assert all(type(p).__name__ == "DTensor" for p in net.parameters())
            for p in net.parameters():
                p.grad = None
            out[steps] = {"grads": grads, "reference": reference, "peak": meter.peak}
        try:
            ad.sample(net, x_T, sched, steps=3, cond=cond, grad="adjoint")
        except ValueError as e:
            out["adjoint_error"] = str(e)
        torch.save(out, os.path.join(results_dir, f"fsdp-{rank}.pt"))
        del net, single
        dist.barrier()   # both ranks done before the group goes (a rank exiting early could abort the other)
    finally:
        dist.destroy_process_group()


def test_fsdp2_parameter_gradients_equal_the_single_process_ones(tmp_path):
    """Two gloo processes on CPU, a model sharded with fully_shard (a frozen submodule): grad="discrete" gives the
    rank-averaged single-process gradients; what it saves for backward grows with N by the recorded states only
    (one step's activations alive at a time)."""
    mp.spawn(_fsdp_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"fsdp-{r}.pt", weights_only=True) for r in range(WORLD)]
    for steps in (3, 6):
        for grad0, grad1 in zip(per_rank[0][steps]["grads"], per_rank[1][steps]["grads"]):
            torch.testing.assert_close(grad0, grad1, rtol=0, atol=0)
        for rank in range(WORLD):
            for got, want in zip(per_rank[rank][steps]["grads"], per_rank[rank][steps]["reference"]):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert "cannot differentiate the parameters of an FSDP2" in per_rank[0]["adjoint_error"]
    state_bytes = 2 * 2 * 6 * 6 * 8  # one recorded state, the only thing that grows with N
    for rank in range(WORLD):
        assert per_rank[rank][6]["peak"] - per_rank[rank][3]["peak"] == 3 * state_bytes < per_rank[rank][3]["peak"]
