"""Bandwidth of the fused adjoint ops against a copy measured in the same run.

    python bench/bench_adjoint_ops.py [--device cpu|cuda] [--quick]

discrete_adjoint_step reads 4 tensors (xbar, vjp, gfull, pend1) and writes 4; multi_tensor_axpy_
reads 2 and writes 1 per element, over many parameter-like tensors in one launch, compared with
torch._foreach_add_.
"""

import argparse
import pathlib
import sys

import torch
from torch.utils import benchmark

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from adjointdeis import ops  # noqa: E402
from adjointdeis.benchmarks import cpu_name  # noqa: E402


def seconds(stmt, **globals_):
    timer = benchmark.Timer(stmt=stmt, globals=globals_)
    return timer.blocked_autorange(min_run_time=0.2).median


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    n = 1 << (18 if args.quick else 24)
    src = torch.empty(n * 8, device=device)
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() * 4 / seconds("dst.copy_(src)", dst=dst, src=src) / 1e9
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"# {name}, torch {torch.__version__}; copy {copy_gbps:.1f} GB/s")
    print(f"{'op':<28}{'dtype':<10}{'elements':>12}{'ms':>10}{'GB/s':>9}{'% copy':>8}")
    for dtype in (torch.float32, torch.bfloat16):
        xbar, vjp, gfull, pend = (torch.randn(n, device=device, dtype=dtype) for _ in range(4))
        coeffs = torch.rand(6, dtype=torch.float64, device=device)
        t = seconds("ops.discrete_adjoint_step(xbar, vjp, gfull, pend, None, coeffs)", ops=ops, xbar=xbar,
                    vjp=vjp, gfull=gfull, pend=pend, coeffs=coeffs)
        gbps = 8 * n * xbar.element_size() / t / 1e9
        print(f"{'discrete_adjoint_step':<28}{str(dtype)[6:]:<10}{n:>12}{t * 1e3:>10.3f}{gbps:>9.1f}{gbps / copy_gbps:>8.0%}")
    sizes = [(i * 7919) % 300_000 + 1000 for i in range(20 if args.quick else 200)]
    acc = [torch.zeros(s, device=device) for s in sizes]
    for dtype in (torch.float32, torch.bfloat16):
        upd = [torch.randn(s, device=device, dtype=dtype) for s in sizes]
        scale = torch.ones((), dtype=torch.float64, device=device)
        t = seconds("ops.multi_tensor_axpy_(acc, upd, scale)", ops=ops, acc=acc, upd=upd, scale=scale)
        moved = sum(sizes) * (2 * 4 + upd[0].element_size())
        ref = seconds("torch._foreach_add_(acc, [u.float() for u in upd])", torch=torch, acc=acc, upd=upd)
        print(f"{'multi_tensor_axpy_':<28}{str(dtype)[6:]:<10}{sum(sizes):>12}{t * 1e3:>10.3f}"
              f"{moved / t / 1e9:>9.1f}{moved / t / 1e9 / copy_gbps:>8.0%}   speed-up over _foreach_add_: {ref / t:.2f}x")


if __name__ == "__main__":
    main()
