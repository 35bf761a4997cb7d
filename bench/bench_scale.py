"""Gradients through sampling at Stable Diffusion and FLUX layouts: memory and time per gradient against N.

Usage: python bench/bench_scale.py [--quick] [--json PATH]

Measured (CPU, float32, one thread, batch 1 with classifier-free guidance: the network sees batch 2):

- "sd": diffusers ``UNet2DConditionModel`` with Stable Diffusion 1.5's block layout (CrossAttnDownBlock2D x3,
  DownBlock2D; UpBlock2D, CrossAttnUpBlock2D x3) at reduced width (32, 64, 64, 64), one layer per block,
  latent 4x16x16, cross-attention on 77 text tokens of width 64; eps prediction on SD's scaled-linear betas,
  DPM-Solver++(2M), CFG 7.5 (cond and uncond embeddings).
- "flux": diffusers ``FluxTransformer2DModel`` (double- and single-stream blocks, RoPE) with tiny dims, a 4x16x16
  latent packed 2x2 into 64 tokens of 16 channels as FluxPipeline packs it, 32 text tokens, pooled projections;
  flow prediction on a shift-3 FlowSchedule, DPM-Solver++(2M), "true CFG" 3.5.

Each gradient is dL/d(x_T, text embeddings, every network parameter) of L = sum(w * x_0), for
grad="autograd", per-step checkpointing (our run loop with ``torch.utils.checkpoint`` around each model call:
what DNO and DRaFT do today), grad="discrete" and grad="adjoint" (AdjointDEIS, x0 form, 2M). Memory: the peak
RSS rise during one gradient in a fresh child process (bench/memory.py). Time: that gradient's process CPU time
and wall time.

Extrapolated (not measured): the activation memory autograd saves per network call is counted with
``torch.autograd.graph.saved_tensors_hooks`` during one forward of the full-size SD 1.5, SDXL and FLUX.1
architectures built on the meta device (no weights, no compute; bfloat16; attention counted as a fused
flash/memory-efficient kernel saves it: q, k, v, the output and the log-sum-exp), checked against the measured
per-step growth of autograd on the small models; per-gradient memory is then computed from it (see
``extrapolate``).
"""

import argparse
import datetime
import json
import os
import pathlib
import sys
import time
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import adjointdeis as ad  # noqa: E402
from adjointdeis.planning import plan_sampling, run_plan  # noqa: E402
from adjointdeis.benchmarks import cpu_name  # noqa: E402
from memory import RSS_METHOD, in_fresh_process, peak_rss_rise  # noqa: E402  bench/memory.py

STEPS = (10, 25, 50)
QUICK_STEPS = (2, 5)
METHODS = ("autograd", "checkpoint", "discrete", "adjoint")
MODELS = ("sd", "flux")
GROWTH_TARGET = 0.10
SD_SMALL = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64, 64),
                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=64,
                attention_head_dim=8, norm_num_groups=32)
FLUX_SMALL = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
                  num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
LATENT = (4, 16, 16)
TEXT_TOKENS = {"sd": 77, "flux": 32}


class SDUNet(nn.Module):
    """``(x, t, text) -> eps`` as StableDiffusionPipeline calls its UNet; x (b, 4, h, w), text (b, tokens, dim)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, text):
        return self.unet(x, t, encoder_hidden_states=text).sample


class FluxFlow(nn.Module):
    """``(x, t, cond) -> flow`` as FluxPipeline calls its transformer.

    x: (b, c, h, w) latents, packed 2x2 into (b, h w / 4, 4 c) tokens; t: (b,) flow time in (0, 1] (the
    pipeline's timestep / 1000); cond: {"text": (b, tokens, dim), "pooled": (b, pooled_dim)}.
    """

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, cond):
        b, c, h, w = x.shape
        tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)
        img_ids = torch.zeros(h // 2, w // 2, 3, dtype=x.dtype, device=x.device)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        text = cond["text"]
        txt_ids = torch.zeros(text.shape[1], 3, dtype=x.dtype, device=x.device)
        out = self.transformer(hidden_states=tokens, timestep=t.to(x.dtype), encoder_hidden_states=text,
                               pooled_projections=cond["pooled"], img_ids=img_ids.reshape(-1, 3), txt_ids=txt_ids,
                               return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def sd_schedule():
    """Stable Diffusion's scaled-linear betas (0.00085 to 0.012 in sqrt, 1000 steps)."""
    return ad.VPSchedule.from_betas(torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2)


def problem(name: str, seed: int = 0) -> dict:
    """The model, its inputs (requiring grad), the loss weight and the sampling settings, all float32."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(1, *LATENT, generator=g).requires_grad_()
    weight = torch.randn(1, *LATENT, generator=g)
    if name == "sd":
        model = SDUNet(UNet2DConditionModel(**SD_SMALL))
        text, null = (torch.randn(1, TEXT_TOKENS[name], 64, generator=g).requires_grad_() for _ in range(2))
        return dict(model=model, x_T=x_T, weight=weight, cond=text, uncond=null, guidance_scale=7.5,
                    sched=sd_schedule(), prediction="eps", leaves=[text, null])
    model = FluxFlow(FluxTransformer2DModel(**FLUX_SMALL))
    text, null = (torch.randn(1, TEXT_TOKENS[name], 64, generator=g).requires_grad_() for _ in range(2))
    pooled, null_pooled = (torch.randn(1, 32, generator=g) for _ in range(2))
    return dict(model=model, x_T=x_T, weight=weight, cond={"text": text, "pooled": pooled},
                uncond={"text": null, "pooled": null_pooled}, guidance_scale=3.5,
                sched=ad.FlowSchedule(shift=3.0), prediction="flow", leaves=[text, null])


def gradient(p: dict, method: str, steps: int) -> None:
    """One forward + backward: fills x_T's, the text embeddings' and the parameters' .grad."""
    conditioning = dict(cond=p["cond"], uncond=p["uncond"], guidance_scale=p["guidance_scale"])
    if method == "checkpoint":
        plan = plan_sampling(p["sched"], steps, "logsnr", None, False, "dpmpp", 2, p["prediction"])
        model = p["model"]

        def checkpointed(x, t, cond):
            return torch.utils.checkpoint.checkpoint(model, x, t, cond, use_reentrant=False)

        x_0 = run_plan(checkpointed, p["x_T"], plan, check_finite=False, **conditioning)
    else:
        extra = dict(adjoint=ad.AdjointOptions(order=2, form="x0")) if method == "adjoint" else {}
        x_0 = ad.sample(p["model"], p["x_T"], p["sched"], steps=steps, solver="dpmpp", order=2,
                        prediction=p["prediction"], grad=method, **conditioning, **extra)
    (x_0 * p["weight"]).sum().backward()


def zero_grads(p: dict) -> None:
    p["model"].zero_grad(set_to_none=True)
    for t in [p["x_T"], *p["leaves"]]:
        t.grad = None


def measure_case(name: str, method: str, steps: int) -> dict:
    """Peak RSS rise, CPU and wall seconds of one gradient, in this (fresh) process, after a 2-step warm-up."""
    torch.set_num_threads(1)
    p = problem(name)
    gradient(p, method, 2)
    zero_grads(p)
    start, cpu_start = time.perf_counter(), time.process_time()
    _, rss = peak_rss_rise(lambda: gradient(p, method, steps))
    return dict(model=name, method=method, steps=steps, rss=rss, cpu=time.process_time() - cpu_start,
                wall=time.perf_counter() - start, state_bytes=p["x_T"].numel() * 4,
                parameters=sum(q.numel() for q in p["model"].parameters()))


def check_agreement(name: str, steps: int) -> float:
    """Max relative L2 difference between grad="discrete" and autograd over x_T, the text and the parameters."""
    p = problem(name)
    grads = {}
    for method in ("autograd", "discrete"):
        zero_grads(p)
        gradient(p, method, steps)
        grads[method] = [p["x_T"].grad.clone()] + [t.grad.clone() for t in p["leaves"]] + [
            torch.cat([q.grad.reshape(-1) for q in p["model"].parameters()])]
    return max(((u - v).norm() / v.norm()).item() for u, v in zip(grads["discrete"], grads["autograd"]))


class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention while counting: saves what a fused (flash / memory-efficient)
    kernel saves, q, k, v, the output and a float32 log-sum-exp per query, and never the attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("only for counting saved bytes")


@contextmanager
def fused_attention():
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _FusedAttention.apply(query, key, value)

    functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def saved_bytes_per_call(model: nn.Module, args: tuple, fused: bool = True) -> int:
    """Bytes autograd saves for backward during one call ``model(*args)`` (each saved tensor once)."""
    seen = {}

    def pack(t):
        seen.setdefault(id(t), (t, t.numel() * t.element_size()))
        return t

    attention = fused_attention() if fused else _nothing()
    with torch.enable_grad(), attention, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*args)
    return sum(nbytes for _, nbytes in seen.values())


@contextmanager
def _nothing():
    yield


def small_call_args(name: str, p: dict) -> tuple:
    """The guided call the sampler makes (batch 2: uncond and cond) on the small model."""
    x = torch.cat([p["x_T"].detach()] * 2)
    t = torch.full((2,), 500.0 if name == "sd" else 0.5)
    if name == "sd":
        return x, t, torch.cat([p["uncond"], p["cond"]]).detach()
    return x, t, {k: torch.cat([p["uncond"][k], p["cond"][k]]).detach() for k in p["cond"]}


# Full-size architectures: diffusers' published configs (SD 1.5 = UNet2DConditionModel's defaults), 1 image with
# CFG (the network sees batch 2; FLUX.1-dev runs one pass with its guidance embedding), bfloat16.
FULL = {
    "SD 1.5 (512x512)": dict(kind="sd", latent=(4, 64, 64), tokens=77, config=dict()),
    "SDXL (1024x1024)": dict(kind="sdxl", latent=(4, 128, 128), tokens=77, config=dict(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)),
    "FLUX.1-dev (1024x1024)": dict(kind="flux", latent=(16, 128, 128), tokens=512, config=dict(guidance_embeds=True)),
}


def full_size_saved_bytes(label: str) -> tuple[int, int, int]:
    """(parameters, saved activation bytes per network call, latent bytes) of a full-size model, on meta."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    spec = FULL[label]
    dtype = torch.bfloat16
    with torch.device("meta"):
        if spec["kind"] == "flux":
            net = FluxTransformer2DModel(**spec["config"]).to(dtype)
            c, h, w = spec["latent"]
            n = h * w // 4
            args = dict(hidden_states=torch.empty(1, n, 4 * c, dtype=dtype, requires_grad=True),
                        timestep=torch.ones(1, dtype=dtype), guidance=torch.ones(1, dtype=dtype),
                        encoder_hidden_states=torch.empty(1, spec["tokens"], 4096, dtype=dtype),
                        pooled_projections=torch.empty(1, 768, dtype=dtype),
                        img_ids=torch.empty(n, 3, dtype=dtype), txt_ids=torch.empty(spec["tokens"], 3, dtype=dtype))
            call = lambda: net(**args, return_dict=False)  # noqa: E731
        else:
            net = UNet2DConditionModel(**spec["config"]).to(dtype)
            dim = net.config.cross_attention_dim
            kwargs = {}
            if spec["kind"] == "sdxl":
                kwargs["added_cond_kwargs"] = dict(text_embeds=torch.empty(2, 1280, dtype=dtype),
                                                   time_ids=torch.empty(2, 6, dtype=dtype))
            x = torch.empty(2, *spec["latent"], dtype=dtype, requires_grad=True)
            text = torch.empty(2, spec["tokens"], dim, dtype=dtype)
            call = lambda: net(x, torch.ones(2, dtype=dtype), encoder_hidden_states=text, **kwargs)  # noqa: E731
        params = sum(p.numel() for p in net.parameters())
        saved = saved_bytes_per_call(_Call(call), ())
    return params, saved, 2 * int(torch.tensor(spec["latent"]).prod())


class _Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self):
        return self.fn()


def extrapolate(params: int, saved: int, latent_bytes: int, steps: int) -> dict:
    """Per-gradient memory (bytes) of full-parameter gradients at N steps, bfloat16 weights and gradients.

    weights + gradients = 2 * 2 bytes per parameter, in every method;
    autograd: N * saved (every call's activations alive at the backward pass);
    checkpoint: N * latent (the checkpointed inputs) + saved (one call recomputed at a time);
    discrete: N * latent (the stored states) + saved + 2 latent-sized adjoints;
    adjoint: the same as discrete (N + 1 states).
    """
    base = 4 * params
    one = saved
    return {"autograd": base + steps * saved, "checkpoint": base + steps * latent_bytes + one,
            "discrete": base + steps * latent_bytes + one + 2 * latent_bytes,
            "adjoint": base + (steps + 1) * latent_bytes + one + 2 * latent_bytes}


def gib(b: float) -> str:
    return f"{b / 2**30:.1f}"


def mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 2, 5 only (a smoke run)")
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    steps_list = QUICK_STEPS if args.quick else STEPS
    load = os.getloadavg()
    start = time.perf_counter()
    cases = [(m, method, n) for m in MODELS for n in steps_list for method in METHODS]
    rows = [in_fresh_process(measure_case, *case, preload=["torch", "diffusers", "adjointdeis", __name__])
            for case in tqdm(cases, desc="fresh process per case", disable=None)]
    agreement = {m: check_agreement(m, steps_list[0]) for m in tqdm(MODELS, desc="discrete vs autograd", disable=None)}
    small = {}
    for m in MODELS:
        p = problem(m)
        small[m] = saved_bytes_per_call(p["model"], small_call_args(m, p), fused=False)
    full = {label: full_size_saved_bytes(label) for label in tqdm(FULL, desc="full-size models on meta", disable=None)}
    end_load = os.getloadavg()
    by = {(r["model"], r["method"], r["steps"]): r for r in rows}
    print(f"## Scale: memory and time per gradient, {datetime.date.today()}, {cpu_name()}, "
          f"1 thread per case; 1-minute load {load[0]:.1f} before, {end_load[0]:.1f} after (a shared machine); "
          f"{time.perf_counter() - start:.0f} s in all")
    print(f"- {RSS_METHOD}\n- time: that gradient's process CPU seconds (insensitive to other processes) and wall seconds")
    for m in MODELS:
        r0 = by[(m, "autograd", steps_list[0])]
        title = {"sd": "UNet2DConditionModel, SD 1.5 block layout (32, 64, 64, 64), latent 4x16x16, 77x64 text, CFG 7.5",
                 "flux": "FluxTransformer2DModel 2 double + 4 single blocks, 64 tokens of 16 + 32 text tokens, true CFG 3.5"}[m]
        print(f"\n### {m}: {title}; {r0['parameters'] / 1e6:.2f}M parameters, DPM-Solver++(2M), "
              f"dL/d(x_T, text, theta); discrete vs autograd {agreement[m]:.1e} (relative, N={steps_list[0]})\n")
        print("| N | peak RSS rise MiB: " + " / ".join(METHODS) + " | CPU s: " + " / ".join(METHODS)
              + " | discrete / checkpoint time |")
        print("|---|---|---|---|")
        for n in steps_list:
            cells = [by[(m, meth, n)] for meth in METHODS]
            ratio = by[(m, "discrete", n)]["cpu"] / by[(m, "checkpoint", n)]["cpu"]
            print(f"| {n} | " + " / ".join(mib(c["rss"]) for c in cells) + " | "
                  + " / ".join(f"{c['cpu']:.1f}" for c in cells) + f" | {ratio:.2f}x |")
        lo, hi = steps_list[0], steps_list[-1]
        for meth in METHODS:
            a, b = by[(m, meth, lo)]["rss"], by[(m, meth, hi)]["rss"]
            flag = "" if meth == "autograd" else ("  (target < 10%: met)" if b / a - 1 < GROWTH_TARGET
                                                   else "  (target < 10%: NOT met)")
            print(f"- {meth}: {mib(a)} -> {mib(b)} MiB from N={lo} to N={hi}, {100 * (b / a - 1):+.0f}%{flag}")
        slope = (by[(m, "autograd", hi)]["rss"] - by[(m, "autograd", lo)]["rss"]) / (hi - lo)
        print(f"- autograd grows {mib(slope)} MiB per step (measured); counted saved activations per guided call "
              f"{mib(small[m])} MiB (saved_tensors_hooks, CPU attention as it runs here)")
    print("\n### Extrapolation to full-size models (NOT measured: computed from counted saved activations)\n")
    print("Saved activations per network call counted with saved_tensors_hooks on the meta device (bfloat16, batch 2 "
          "for CFG, FLUX.1-dev one pass with its guidance embedding, attention as a fused kernel saves it); per "
          "gradient at N steps = 4 bytes per parameter (bf16 weights and gradients) + autograd: N x saved; "
          "checkpoint: N latents + one call's saved; discrete: N latents + one call's saved + 2 latents.\n")
    print("| model | parameters | saved GiB per call | N | autograd GiB | checkpoint GiB | discrete GiB |")
    print("|---|---|---|---|---|---|---|")
    extrapolated = {}
    for label, (params, saved, latent_bytes) in full.items():
        for n in (10, 25, 50):
            e = extrapolate(params, saved, latent_bytes, n)
            extrapolated[f"{label} N={n}"] = e
            print(f"| {label} | {params / 1e9:.2f}B | {gib(saved)} | {n} | {gib(e['autograd'])} | "
                  f"{gib(e['checkpoint'])} | {gib(e['discrete'])} |")
    if args.json:
        args.json.write_text(json.dumps(dict(rows=rows, agreement=agreement, small_saved=small,
                                             full={k: list(v) for k, v in full.items()},
                                             extrapolated=extrapolated, load=[load, end_load]), indent=1))


if __name__ == "__main__":
    main()
