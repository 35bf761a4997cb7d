"""Parameter gradients for LoRA-wrapped (peft) and partly frozen models: grad="discrete" equals plain autograd.

Only the adapter weights (or the unfrozen submodules) require grad; the frozen bases' ``.grad`` stay None and
the user's module keeps its parameter objects and values (a discrete run never rebinds or writes them).
"""

import pytest
import torch

import adjointdeis as ad
import adjointdeis.zoo

peft = pytest.importorskip("peft")

LORA_TARGETS = ["conv1", "conv2", "emb", "inp"]   # the ResBlocks' convs and embedding projections, the input conv


def relative_error(got, want):
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def lora_digits(seed=0):
    """The shipped digits model in float64 wrapped by peft LoRA (rank 4), adapters randomly initialised.

    peft's default init sets B = 0, which makes dL/dA = 0; ``init_lora_weights=False`` draws both.
    """
    torch.manual_seed(seed)
    base = ad.zoo.load("digits").model.double()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    return peft.get_peft_model(base, config)


def snapshot(model):
    """(name, parameter object, a copy of its values) of every parameter of the module."""
    return [(name, p, p.detach().clone()) for name, p in model.named_parameters()]


def assert_unchanged(model, before):
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _, _ in before]
    for (name, p), (_, q, values) in zip(after, before):
        assert p is q, f"parameter {name} was replaced"
        assert torch.equal(p.detach(), values), f"parameter {name} was written"


def parameter_gradients(mode, model, x_T, sched, weight, **kwargs):
    """(dL/dx_T, {name: dL/dtheta} of the parameters that require grad) of L = sum(weight * sample)."""
    model.zero_grad(set_to_none=True)
    x_T = x_T.detach().requires_grad_()
    x = ad.sample(model, x_T, sched, grad=mode, **kwargs)
    (weight * x).sum().backward()
    return x_T.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def digits_inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, 1, 8, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(batch, 1, 8, 8, generator=g, dtype=torch.float64)
    return x_T, weight


@pytest.mark.parametrize("case", ["ode", "sde", "cfg"])
def test_lora_parameter_gradients_equal_autograd(case):
    model = lora_digits()
    sched = ad.zoo.load("digits").schedule
    x_T, weight = digits_inputs()
    labels = torch.tensor([3, 5, 7])
    kwargs = dict(steps=6, solver="dpmpp", order=2, cond=labels)
    if case == "sde":
        kwargs.update(sde=True)
    if case == "cfg":
        kwargs.update(uncond=torch.full_like(labels, 10), guidance_scale=3.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = snapshot(model)
    results = {}
    for mode in ("autograd", "discrete"):
        if case == "sde":
            kwargs["generator"] = torch.Generator().manual_seed(4)
        results[mode] = parameter_gradients(mode, model, x_T, sched, weight, **kwargs)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert_unchanged(model, before)
    (gx_want, want), (gx_got, got) = results["autograd"], results["discrete"]
    assert set(got) == set(want) == set(trainable)
    assert relative_error(gx_got, gx_want) < 1e-10
    for name in trainable:
        assert want[name].norm() > 0, name
        assert relative_error(got[name], want[name]) < 1e-10, name


def test_lora_adjoint_mode_fills_only_the_adapters():
    """grad="adjoint" (an approximation of the continuous gradient) reaches the same leaves as the exact one."""
    model = lora_digits(2)
    x_T, weight = digits_inputs(2, seed=5)
    sched = ad.zoo.load("digits").schedule
    kwargs = dict(steps=8, solver="dpmpp", order=2, cond=torch.tensor([1, 8]), adjoint_form="x0", adjoint_order=2)
    _, got = parameter_gradients("adjoint", model, x_T, sched, weight, **kwargs)
    _, want = parameter_gradients("discrete", model, x_T, sched, weight, **{k: kwargs[k] for k in kwargs
                                                                            if not k.startswith("adjoint")})
    assert set(got) == set(want)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    cosine = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in got.values()]),
                                                   torch.cat([g.flatten() for g in want.values()]), dim=0)
    assert cosine > 0.5


def test_frozen_submodules_of_the_digits_model():
    model = ad.zoo.load("digits").model.double()
    for frozen in (model.time_mlp, model.class_embedding, model.down1, model.mid):
        frozen.requires_grad_(False)
    sched = ad.zoo.load("digits").schedule
    x_T, weight = digits_inputs(seed=2)
    kwargs = dict(steps=5, solver="deis", order=3, cond=torch.tensor([0, 4, 9]))
    before = snapshot(model)
    (gx_want, want), (gx_got, got) = (parameter_gradients(m, model, x_T, sched, weight, **kwargs)
                                      for m in ("autograd", "discrete"))
    assert_unchanged(model, before)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert set(got) == set(want) and not any(n.startswith(("time_mlp", "down1.", "mid.")) for n in got)
    assert relative_error(gx_got, gx_want) < 1e-10
    for name in want:
        assert relative_error(got[name], want[name]) < 1e-10, name


def tiny_conditional_unet():
    """diffusers' UNet2DConditionModel with Stable Diffusion's block layout at toy width, float64."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8).double()


class CrossAttentionEps(torch.nn.Module):
    """``(x, t, text) -> eps``: a UNet2DConditionModel called as Stable Diffusion's pipeline calls it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, text):
        return self.unet(x, t, encoder_hidden_states=text).sample


@pytest.mark.parametrize("frozen", ["lora", "submodules"])
def test_diffusers_unet_lora_and_frozen_blocks_with_cfg(frozen):
    pytest.importorskip("diffusers")
    unet = tiny_conditional_unet()
    if frozen == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        # diffusers' "gaussian" init still sets B = 0: draw it so that dL/dA is not zero
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p.data, std=0.1)
    else:
        unet.down_blocks[0].requires_grad_(False)
        unet.time_embedding.requires_grad_(False)
    model = CrossAttentionEps(unet)
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    text, null = (torch.randn(2, 3, 16, generator=g, dtype=torch.float64) for _ in range(2))
    sched = ad.VPSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    kwargs = dict(steps=4, solver="dpmpp", order=2, cond=text, uncond=null, guidance_scale=5.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and (frozen != "lora" or all("lora_" in n for n in trainable))
    before = snapshot(model)
    (gx_want, want), (gx_got, got) = (parameter_gradients(m, model, x_T, sched, weight, **kwargs)
                                      for m in ("autograd", "discrete"))
    assert_unchanged(model, before)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert set(got) == set(want) == set(trainable)
    assert relative_error(gx_got, gx_want) < 1e-10
    for name in trainable:
        assert relative_error(got[name], want[name]) < 1e-10, name
