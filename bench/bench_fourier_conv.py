"""DSNO's temporal layer: the fused op against the FFT reference, and against the physical limit.

    python bench/bench_fourier_conv.py [--device cpu|cuda] [--threads N] [--dtype float32|bfloat16|...]
                                       [--quick] [--json PATH]

For each shape (B, T, K = modes, C = C_in = C_out, H = W) it times, in one run, the forward and the
forward + backward (gradients in x and the complex weight) of ops.fourier_temporal_conv (residual,
LeakyReLU) and of reference.fourier_temporal_conv (rfft / einsum / irfft, autograd), and prints the
speed-up. "limit" is the larger of two lower bounds on the op's time: moving its tensors once at the
copy bandwidth measured in the same run (forward: read x, write y; forward + backward: also read x and
dy, write dx), and the time of plain matmuls of the sizes of the op's GEMMs (C x C for the DC and
Nyquist bins, a batched 2C x 2C for the complex bins, times B H W columns; the dense block-circulant
kernel would be T C x T C), in the activations' dtype (three times that for forward + backward).
"% limit" is limit / our time.

The matmuls and the four timed calls of a shape run in turn, one call each per round in a new order each
round, and each time is the fastest call (bench/timing.py): this VM's speed drifts over seconds, so timing
each in its own block would compare them on different machines. On the CPU the times are CPU time of this
process (time.process_time), not wall time: on a shared machine that excludes the time other processes hold
the core. On CUDA they are wall times (synchronised after each call).

ADJOINTDEIS_TEMPORAL_MIX=avx512|avx2|tiles forces the CPU temporal mix's kernel (the header says so): that is how
the AVX2 kernel and the tile loops are measured on a CPU that has AVX-512.
"""

import argparse
import json
import os
import pathlib
import sys
import time

import torch
from torch.utils import benchmark

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from adjointdeis import ops, reference  # noqa: E402
from adjointdeis.benchmarks import cpu_name  # noqa: E402
from timing import interleaved_min_ms

DSNO_SHAPES = [(b, 4, 2, c, h) for b in (32, 128) for c in (128, 256) for h in (8, 16, 32)]
LONG_SHAPES = [(32, t, k, 128, 16) for t in (8, 16) for k in (2, t // 2 + 1)]
CPU_SHAPES = [(32, 4, 2, 128, 8), (32, 4, 2, 128, 16), (32, 4, 2, 256, 8), (8, 4, 2, 256, 16),
              (8, 4, 2, 128, 32)] + [(16, t, k, 128, 8) for t in (8, 16) for k in (2, t // 2 + 1)]
QUICK_SHAPES = [(4, 4, 2, 32, 8), (4, 8, 2, 32, 8)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def seconds(fn, min_run_time, threads, device):
    clock = {"timer": time.process_time} if device.type == "cpu" else {}
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, **clock)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(device, dtype, min_run_time, threads) -> float:
    """Bytes per second of dst.copy_(src) over 256 MiB (read + write)."""
    src = torch.empty(1 << 26, device=device, dtype=torch.float32).to(dtype)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / seconds(lambda: dst.copy_(src), min_run_time, threads,
                                                          torch.device(device))


def gemm_of_the_op(n_times, modes, channels, columns, device, dtype):
    """The products the op's forward does, as plain matmuls of the same sizes: C x C for the DC and
    Nyquist bins, a batched 2C x 2C for the complex bins, over all B H W columns."""
    nyquist = n_times % 2 == 0 and modes == n_times // 2 + 1
    complex_bins = modes - 1 - int(nyquist)
    def rand(*shape):
        return torch.randn(shape, device=device, dtype=dtype)
    single = [(rand(channels, channels), rand(channels, columns)) for _ in range(1 + int(nyquist))]
    paired = (rand(complex_bins, 2 * channels, 2 * channels), rand(complex_bins, 2 * channels, columns))

    def run():
        for a, b in single:
            torch.mm(a, b)
        if complex_bins:
            torch.bmm(*paired)
    return run


def bench_case(shape, device, dtype, min_run_time, threads, bandwidth):
    b, t, k, c, h = shape
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, t, c, h, h, device=device, dtype=dtype, generator=g)
    weight = (torch.randn(k, c, c, device=device, dtype=torch.complex64, generator=g) / c).to(
        torch.complex128 if dtype == torch.float64 else torch.complex64)
    grad = torch.randn_like(x)
    xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(x, weight, k)
        return run

    def forward_backward(fn):
        def run():
            xg.grad = wg.grad = None
            fn(xg, wg, k).backward(grad)
        return run

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def synced(fn):
        def run():
            fn()
            sync()
        return run

    parts = {"matmul": gemm_of_the_op(t, k, c, b * h * h, device, dtype)}
    for name, make in (("fwd", forward), ("fwd+bwd", forward_backward)):
        parts[name, "ours"] = make(ops.fourier_temporal_conv)
        parts[name, "ref"] = make(reference.fourier_temporal_conv)
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    ms, _ = interleaved_min_ms({key: synced(fn) for key, fn in parts.items()}, 5 * min_run_time, clock)
    matmul, moved = ms["matmul"] / 1e3, x.numel() * x.element_size()
    row = dict(B=b, T=t, K=k, C=c, H=h)
    for name, tensors, gemms in (("fwd", 2, 1), ("fwd+bwd", 4, 3)):
        ours, ref = ms[name, "ours"] / 1e3, ms[name, "ref"] / 1e3
        limit = max(tensors * moved / bandwidth, gemms * matmul)
        row[name] = dict(ours_ms=ours * 1e3, reference_ms=ref * 1e3, speedup=ref / ours,
                         limit_ms=limit * 1e3, fraction_of_limit=limit / ours)
    return row


def format_rows(rows) -> str:
    lines = ["| B | T | K | C | H=W | fwd ours ms | fwd ref ms | fwd speed-up | fwd % limit "
             "| fwd+bwd ours ms | fwd+bwd ref ms | fwd+bwd speed-up | fwd+bwd % limit |",
             "|" + "---|" * 13]
    for r in rows:
        cells = [str(r[key]) for key in ("B", "T", "K", "C", "H")]
        for name in ("fwd", "fwd+bwd"):
            m = r[name]
            cells += [f"{m['ours_ms']:.2f}", f"{m['reference_ms']:.2f}", f"{m['speedup']:.2f}x",
                      f"{m['fraction_of_limit']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="intra-op CPU threads (default 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append",
                        help="activation dtype, repeatable (default float32)")
    parser.add_argument("--quick", action="store_true", help="two small shapes (smoke test)")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timed call of a shape (5 of them, interleaved)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    torch.set_num_threads(args.threads)
    if args.quick:
        shapes = QUICK_SHAPES
    else:
        shapes = DSNO_SHAPES + LONG_SHAPES if device.type == "cuda" else CPU_SHAPES
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {args.threads} thread(s)"
    if device.type == "cpu" and os.environ.get("ADJOINTDEIS_TEMPORAL_MIX"):
        name += f", temporal mix forced to {os.environ['ADJOINTDEIS_TEMPORAL_MIX']}"
    result = {"device": name, "torch": torch.__version__, "tables": {}}
    for dtype_name in args.dtype or ["float32"]:
        dtype = DTYPES[dtype_name]
        bandwidth = copy_bandwidth(device, dtype, args.min_run_time, args.threads)
        print(f"\n# {name}, torch {torch.__version__}, {dtype_name}; copy {bandwidth / 1e9:.1f} GB/s", flush=True)
        rows = [bench_case(shape, device, dtype, args.min_run_time, args.threads, bandwidth) for shape in shapes]
        print(format_rows(rows), flush=True)
        result["tables"][dtype_name] = dict(copy_gbps=bandwidth / 1e9, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
