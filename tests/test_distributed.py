"""DistributedDataParallel: parameter gradients through sampling are averaged across ranks as DDP would."""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _rank_main(rank, init_file, results_dir):
    sys.path.insert(0, os.path.dirname(__file__))
    import adjointdeis as ad
    from nets import TinyConvNet

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
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
    finally:
        dist.destroy_process_group()


def test_ddp_parameter_gradients_are_reduced(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for mode in ("discrete", "adjoint"):
        per_rank = [torch.load(tmp_path / f"{mode}-{r}.pt", weights_only=True) for r in range(WORLD)]
        for grad0, grad1 in zip(per_rank[0]["grads"], per_rank[1]["grads"]):
            torch.testing.assert_close(grad0, grad1, rtol=0, atol=0)  # identical on every rank
        for got, want in zip(per_rank[0]["grads"], per_rank[0]["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
