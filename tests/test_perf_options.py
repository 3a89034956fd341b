"""CPU checks of the performance options' plumbing (speed itself is measured by bench/train_step.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.gpu_common import lora_step_flops, mfu, video_tokens
from bench.train_step import parse_case
from engine.families import wan_perf
from engine.families.wan_perf import PerfOptions, apply


class _CountSelfAttention(TorchDispatchMode):
    """Counts fused-attention kernels whose key length equals the query length."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if wan_perf._is_self_attention_op(func, args):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _tiny_wan(seed: int = 0):
    from diffusers import WanTransformer3DModel

    from engine.families.wan_random import transformer_config

    torch.manual_seed(seed)
    return WanTransformer3DModel(**transformer_config("tiny")).requires_grad_(True).train()


def _inputs():
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 2, 8, 8, generator=g)
    text = torch.randn(1, 7, 32, generator=g)
    return latents, text


def _loss_and_grads(model) -> tuple[float, dict[str, torch.Tensor]]:
    latents, text = _inputs()
    out = model(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                return_dict=False)[0]
    loss = out.square().mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_defaults_change_nothing_and_bad_values_name_the_key():
    assert PerfOptions() == PerfOptions.from_config(None) == PerfOptions.from_config({})
    with pytest.raises(ValueError, match="performance.attention_backend"):
        PerfOptions(attention_backend="flash4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="performance.checkpointing"):
        PerfOptions.from_config({"checkpointing": "some"})


def test_from_config_reads_a_section_object():
    class Section:
        attention_backend = "cudnn"
        compile_blocks = True
        checkpointing = "save_attention"

    expected = PerfOptions(attention_backend="cudnn", compile_blocks=True, checkpointing="save_attention")
    assert PerfOptions.from_config(Section()) == expected


def test_save_attention_keeps_self_attention_and_matches_full_checkpointing():
    reference = _tiny_wan()
    apply(reference, PerfOptions(checkpointing="full"), activation_checkpointing=True)
    with _CountSelfAttention() as full_count:
        loss_full, grads_full = _loss_and_grads(reference)

    selective = _tiny_wan()
    applied = apply(selective, PerfOptions(checkpointing="save_attention"), activation_checkpointing=True)
    with _CountSelfAttention() as sac_count:
        loss_sac, grads_sac = _loss_and_grads(selective)

    blocks = len(selective.blocks)
    assert applied.checkpointing == "save_attention"
    # Full checkpointing runs self-attention again in backward; selective keeps its output.
    assert full_count.calls == 2 * blocks
    assert sac_count.calls == blocks
    assert loss_sac == pytest.approx(loss_full, rel=1e-6)
    assert grads_sac.keys() == grads_full.keys()
    for name in grads_full:
        torch.testing.assert_close(grads_sac[name], grads_full[name], rtol=1e-5, atol=1e-6)


def test_without_checkpointing_apply_leaves_checkpointing_off():
    model = _tiny_wan()
    applied = apply(model, PerfOptions(checkpointing="save_attention"), activation_checkpointing=False)
    assert applied.checkpointing == "off"
    assert not model.gradient_checkpointing


def test_gpu_only_options_fall_back_on_cpu():
    model = _tiny_wan()
    applied = apply(model, PerfOptions(attention_backend="cudnn", compile_blocks=True),
                    activation_checkpointing=True)
    if not torch.cuda.is_available():
        assert applied.attention_backend == "default"
        assert applied.compiled == "none"
        assert len(applied.notes) == 2
    wan_perf.reset_attention_backend()


def test_flash3_without_its_kernel_falls_back_and_says_why():
    model = _tiny_wan()
    applied = apply(model, PerfOptions(attention_backend="flash3"), activation_checkpointing=False)
    if not torch.cuda.is_available():
        assert applied.attention_backend == "default"
        assert applied.notes == ["attention_backend flash3 unavailable (FlashAttention-3 needs a CUDA GPU); using default"]
    wan_perf.reset_attention_backend()


def test_save_attention_finds_flashattention3_self_attention_in_its_layout():
    class Op:  # how the dispatcher names diffusers' FA3 custom op
        __name__ = "_flash_attn_forward.default"

    query = torch.empty(1, 40, 2, 8)  # FA3 takes (batch, seq, heads, dim)
    assert wan_perf._is_self_attention_op(Op(), (query, torch.empty(1, 40, 2, 8)))
    # cross-attention with the same head count: the SDPA rule (dim -2) would call it self-attention
    assert not wan_perf._is_self_attention_op(Op(), (query, torch.empty(1, 7, 2, 8)))


def test_reset_restores_every_sdpa_backend():
    wan_perf._set_sdp_order([int(torch.nn.attention.SDPBackend.MATH)])
    assert not torch.backends.cuda.flash_sdp_enabled()
    wan_perf.reset_attention_backend()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.cudnn_sdp_enabled()


def test_mfu_counting_reproduces_reference_table():
    tokens = video_tokens(480, 832, 81)
    assert tokens == 32_760
    assert mfu(lora_step_flops("1.3B", tokens), 2.87) == pytest.approx(0.27, abs=0.005)
    assert mfu(lora_step_flops("14B", tokens), 14.06) == pytest.approx(0.31, abs=0.005)
    assert mfu(lora_step_flops("1.3B", video_tokens(480, 832, 33)), 0.853) == pytest.approx(0.22, abs=0.005)


def test_bench_case_grammar():
    case = parse_case("trainer+attn=cudnn+ckpt=attn+compile+lora=bf16")
    assert (case.loop, case.attn, case.ckpt, case.compile, case.lora_dtype) == ("trainer", "cudnn", "attn", True, "bf16")
    assert case.perf == PerfOptions(attention_backend="cudnn", compile_blocks=True, checkpointing="save_attention")
    with pytest.raises(ValueError):
        parse_case("plain+ckpt=sometimes")
    with pytest.raises(ValueError):
        parse_case("other")


def test_lora_in_activation_dtype_keeps_fp32_weights_and_bf16_matmuls():
    from peft import LoraConfig

    def lora_model():
        model = _tiny_wan().to(torch.bfloat16).requires_grad_(False)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "ffn.net.2"], init_lora_weights=False))
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
        return model

    reference, fast = lora_model(), lora_model()
    applied = apply(fast, PerfOptions(lora_compute_dtype="activation"), activation_checkpointing=False)
    assert applied.lora_layers_in_activation_dtype == 3 * len(fast.blocks)  # to_q in attn1 and attn2, ffn.net.2
    seen: list[torch.dtype] = []
    fast.blocks[0].attn1.to_q.lora_A["default"].register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    latents, text = _inputs()
    outs = []
    for model in (reference, fast):
        out = model(hidden_states=latents.bfloat16(), timestep=torch.tensor([500.0]),
                    encoder_hidden_states=text.bfloat16(), return_dict=False)[0]
        out.float().square().mean().backward()
        outs.append(out.float())
    assert seen == [torch.bfloat16]  # peft no longer upcasts the layer input
    lora = [p for n, p in fast.named_parameters() if "lora_" in n]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    assert float(((outs[1] - outs[0]).norm() / outs[0].norm()).detach()) < 2e-2
    assert set(fast.state_dict()) == set(reference.state_dict())


def test_train_config_performance_table_reaches_the_options():
    from engine.config import ConfigError, TrainConfig

    cfg = TrainConfig.from_toml_string(
        'output_dir = "o"\n[performance]\nattention_backend = "cudnn"\ncompile_blocks = true\n'
        'checkpointing = "save_attention"\nlora_compute_dtype = "activation"\n')
    assert PerfOptions.from_config(cfg.performance) == PerfOptions(
        attention_backend="cudnn", compile_blocks=True, checkpointing="save_attention", lora_compute_dtype="activation")
    assert PerfOptions.from_config(TrainConfig(output_dir="o").performance) == PerfOptions()
    with pytest.raises(ConfigError, match="performance.checkpointing"):
        TrainConfig.from_toml_string('output_dir = "o"\n[performance]\ncheckpointing = "most"\n')
