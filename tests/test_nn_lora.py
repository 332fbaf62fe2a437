"""swkernels.nn.LoRALinear: PEFT's parameter layout, names, init and scaling; forward and
gradients equal to a PEFT LoRA layer on the same weights; merging; NF4 base; fake and compiled runs."""

import math

import pytest
import torch
from torch import nn

import swkernels
from swkernels.nn import LoRALinear


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


class Holder(nn.Module):
    """A model with one projection at path ``proj``, the module PEFT and we both wrap."""

    def __init__(self, k=24, n=40, bias=True):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=bias)

    def forward(self, x):
        return self.proj(x)


def peft_twin(holder, seed, **config):
    """PEFT's LoRA on a copy of ``holder``, initialised from the same torch seed."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(holder), LoraConfig(target_modules=["proj"], **config))


def test_layout_names_and_init_are_peft_s():
    from peft.utils import get_peft_model_state_dict

    holder = Holder()
    peft_model = peft_twin(holder, 3, r=4, lora_alpha=8)
    torch.manual_seed(3)
    holder.proj = LoRALinear.from_linear(holder.proj, r=4, lora_alpha=8)
    layer = holder.proj
    assert layer.lora_A.weight.shape == (4, 24) and layer.lora_B.weight.shape == (40, 4)
    # adapter keys: PEFT's saved keys without its "base_model.model." prefix
    ours = {k for k in holder.state_dict() if "lora_" in k}
    theirs = {k.removeprefix("base_model.model.") for k in get_peft_model_state_dict(peft_model)}
    assert ours == theirs == {"proj.lora_A.weight", "proj.lora_B.weight"}
    assert set(holder.state_dict()) - ours == {"proj.base_layer.weight", "proj.base_layer.bias"}
    # init: A Kaiming-uniform(a=√5) drawn exactly as PEFT draws it, B zero
    peft_layer = peft_model.base_model.model.proj
    assert torch.equal(layer.lora_A.weight, peft_layer.lora_A["default"].weight)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(24)
    assert [n for n, p in holder.named_parameters() if p.requires_grad] == ["proj.lora_A.weight", "proj.lora_B.weight"]


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_attributes_and_scaling_match_peft(rslora):
    layer = LoRALinear.from_linear(nn.Linear(24, 40), r=16, lora_alpha=32, lora_dropout=0.1, use_rslora=rslora)
    peft_layer = peft_twin(Holder(), 0, r=16, lora_alpha=32, lora_dropout=0.1, use_rslora=rslora).base_model.model.proj
    assert (layer.r, layer.lora_alpha, layer.lora_dropout, layer.use_rslora) == (16, 32, 0.1, rslora)
    assert layer.scaling == pytest.approx(peft_layer.scaling["default"])
    assert layer.scaling == pytest.approx(32 / 4 if rslora else 32 / 16)
    assert (layer.in_features, layer.out_features) == (24, 40)


def test_starts_as_the_base_layer(device):
    base = nn.Linear(24, 40, device=device)
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8)
    x = torch.randn(3, 5, 24, device=device)
    assert rel_err(layer(x), base(x)) < 1e-6


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_forward_and_grads_equal_peft(rslora, device):
    holder = Holder(45, 53)
    peft_model = peft_twin(holder, 1, r=6, lora_alpha=12, use_rslora=rslora).to(device)
    peft_layer = peft_model.base_model.model.proj
    nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.2)
    layer = LoRALinear.from_linear(holder.proj, r=6, lora_alpha=12, use_rslora=rslora).to(device)
    with torch.no_grad():
        layer.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(4, 9, 45, device=device, requires_grad=True)
    y, y_peft = layer(x), peft_model(x)
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, layer.lora_A.weight, layer.lora_B.weight), g)
    theirs = torch.autograd.grad(y_peft, (x, peft_layer.lora_A["default"].weight,
                                          peft_layer.lora_B["default"].weight), g)
    assert rel_err(y, y_peft) < 1e-5
    for name, got, want in zip(("dx", "dA", "dB"), ours, theirs, strict=True):
        assert rel_err(got, want) < 1e-5, name


def test_merged_weight_equals_peft_merge(device):
    holder = Holder()
    peft_model = peft_twin(holder, 2, r=4, lora_alpha=8, use_rslora=True)
    nn.init.normal_(peft_model.base_model.model.proj.lora_B["default"].weight)
    torch.manual_seed(2)
    layer = LoRALinear.from_linear(holder.proj, r=4, lora_alpha=8, use_rslora=True)
    layer.lora_B.weight.data.copy_(peft_model.base_model.model.proj.lora_B["default"].weight)
    merged = peft_model.merge_and_unload().proj.weight
    torch.testing.assert_close(layer.merged_weight(), merged, atol=1e-6, rtol=1e-6)
    layer.to(device)
    x = torch.randn(7, 24, device=device)
    assert rel_err(layer(x), x @ layer.merged_weight().t() + layer.base_layer.bias) < 1e-5


def test_dropout_only_in_training(device):
    layer = LoRALinear.from_linear(nn.Linear(16, 16, device=device), r=2, lora_alpha=4, lora_dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 16, device=device)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_autocast_runs_in_the_autocast_dtype(device):
    layer = LoRALinear.from_linear(nn.Linear(32, 24, device=device), r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(5, 32, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, x @ layer.merged_weight().t() + layer.base_layer.bias) < 2e-2
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A.weight.grad.dtype == torch.float32


def test_bad_arguments_say_what_to_fix():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear.from_linear(nn.Linear(8, 8), r=0, lora_alpha=1)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear.from_linear(nn.Linear(8, 8), r=2, lora_alpha=1, lora_dropout=1.0)


def test_runs_under_fake_tensors_and_torch_compile():
    """The planner counts memory under FakeTensorMode; training may compile the model."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = LoRALinear.from_linear(nn.Linear(32, 24, dtype=torch.bfloat16), r=4, lora_alpha=8)
    with FakeTensorMode(allow_non_fake_inputs=True), swkernels.force_backend("triton"):
        y = layer(torch.randn(3, 7, 32, dtype=torch.bfloat16, requires_grad=True))
        y.sum().backward()
    assert y.shape == (3, 7, 24) and layer.lora_A.weight.grad.shape == (4, 32)
    layer.zero_grad(set_to_none=True)  # those grads are fake tensors
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    assert rel_err(compiled(x), layer(x)) < 1e-6


def test_over_a_bitsandbytes_nf4_layer_merges_and_runs_fake(device):
    bnb = pytest.importorskip("bitsandbytes")
    from torch._subclasses.fake_tensor import FakeTensorMode

    base = bnb.nn.Linear4bit(96, 40, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4", device=device)
    base.weight = bnb.nn.Params4bit(torch.randn(40, 96, dtype=torch.bfloat16) / 10, requires_grad=False,
                                    blocksize=64, quant_type="nf4", module=base)._quantize(device)
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8)
    assert layer.nf4 and [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight",
                                                                                          "lora_B.weight"]
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(6, 96, dtype=torch.bfloat16, device=device)
    merged = x.float() @ layer.merged_weight().t() + base.bias.float()
    assert rel_err(layer(x), merged) < 2e-2
    with FakeTensorMode(allow_non_fake_inputs=True), swkernels.force_backend("triton"):
        y = layer(torch.randn(2, 5, 96, dtype=torch.bfloat16, device=device, requires_grad=True))
        y.sum().backward()
    assert y.shape == (2, 5, 40)


def test_an_nf4_base_held_as_plain_packed_bytes_gives_the_same_layer(device):
    """detach_nf4_state (what FSDP2 sharding needs): the packed bytes become a plain uint8
    parameter, the quantisation state stays on the layer, and outputs, gradients and the merged
    weight are unchanged."""
    bnb = pytest.importorskip("bitsandbytes")
    base = bnb.nn.Linear4bit(96, 40, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                             compress_statistics=True, device=device)
    base.weight = bnb.nn.Params4bit(torch.randn(40, 96, dtype=torch.bfloat16) / 10, requires_grad=False,
                                    blocksize=64, quant_type="nf4", compress_statistics=True,
                                    module=base)._quantize(device)
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(6, 96, dtype=torch.bfloat16, device=device, requires_grad=True)
    before, merged = layer(x), layer.merged_weight()
    before.float().sum().backward()
    grads = (x.grad.clone(), layer.lora_A.weight.grad.clone())
    x.grad, layer.lora_A.weight.grad = None, None
    layer.detach_nf4_state()
    weight = layer.base_layer.weight
    assert type(weight) is nn.Parameter and weight.dtype == torch.uint8 and layer.nf4
    assert not hasattr(weight, "quant_state") and layer.nf4_quant_state is not None
    after = layer(x)
    after.float().sum().backward()
    assert torch.equal(after, before) and torch.equal(layer.merged_weight(), merged)
    assert torch.equal(x.grad, grads[0]) and torch.equal(layer.lora_A.weight.grad, grads[1])
