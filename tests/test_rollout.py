"""The lean latent step (`--rollout_impl lean`) computes what the HF decoder modules compute.

For each supported family (Qwen2, Llama with attention and MLP biases, Mistral, Qwen3 with its q/k norms
and a head_dim that is not hidden / heads), on a left-padded batch of prompts of different lengths and
K in {1, 7}: the latents and the gradient of every trained parameter equal the `hf` path's in float64, with
and without gradient checkpointing of the prefill. Then bf16 autocast against float32, the fallback for
what the lean step does not implement, and the bookkeeping of its deferred weight gradients.
"""

import copy
import logging

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

import train_latent_comm as tlc

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")  # fmt: skip
FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "llama": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True, "mlp_bias": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 24}),
}
PROMPT_LENGTHS = (11, 4, 8)  # left-padded to 11


def make_model(student, dtype=torch.float64):
    """A LatentCommModel around `student` with a tiny Qwen2 teacher (unused by the rollout), dropout off."""
    torch.manual_seed(1)
    teacher = Qwen2ForCausalLM(Qwen2Config(**{**SHAPE, "hidden_size": 32, "num_hidden_layers": 1}))
    settings = tlc.LatentSettings(K=7, bop_id=95, eop_id=96)
    return tlc.LatentCommModel(teacher, student, settings, head_num_heads=4, head_dropout=0.0).to(dtype).train()


def make_student(family, **overrides):
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    return model_class(config_class(**{**SHAPE, **extra, **overrides}))


def prompts(batch=len(PROMPT_LENGTHS)):
    generator = torch.Generator().manual_seed(2)
    width = max(PROMPT_LENGTHS)
    ids = torch.randint(0, 90, (batch, width), generator=generator)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, length in enumerate(PROMPT_LENGTHS[:batch]):
        mask[b, width - length :] = 1
        ids[b, : width - length] = 0
    return ids, mask


def rollout(model, impl, K, ids, mask):
    """Latents and the gradients of a loss that weighs every latent coordinate differently."""
    model.settings.rollout_impl, model.settings.K = impl, K
    model.zero_grad(set_to_none=True)
    latents = model.student_latents(ids, mask)
    weights = torch.linspace(-1, 1, latents.numel(), dtype=torch.float64).view_as(latents)
    (latents.double().sin() * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return latents.detach(), grads


def relative_difference(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


@pytest.fixture()
def hf_norms_in_input_dtype(monkeypatch):
    """HF's RMSNorm normalises in float32 even in a float64 model; the lean step keeps float64 in float64
    (and agrees with HF in float32, bf16 and fp16, see the tests below). For the float64 comparison the
    reference's norms run in the input's dtype as well, so that only the lean step's own differences show."""

    def forward(self, hidden_states):
        x = hidden_states if hidden_states.dtype == torch.float64 else hidden_states.float()
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * normed.to(hidden_states.dtype)

    for module, name in ((modeling_qwen2, "Qwen2RMSNorm"), (modeling_llama, "LlamaRMSNorm"),
                         (modeling_mistral, "MistralRMSNorm"), (modeling_qwen3, "Qwen3RMSNorm")):  # fmt: skip
        monkeypatch.setattr(getattr(module, name), "forward", forward)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("K", [1, 7])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lean_rollout_equals_hf_in_float64(hf_norms_in_input_dtype, family, K, checkpointing):
    model = make_model(make_student(family))
    assert tlc.lean_rollout_unsupported(model.student) is None
    reference = rollout(model, "hf", K, *prompts())  # never checkpointed: the plain HF rollout
    if checkpointing:
        model.activation_checkpointing_enable()
    latents, grads = rollout(model, "lean", K, *prompts())

    assert relative_difference(latents, reference[0]) <= 1e-10
    assert grads.keys() == reference[1].keys()
    trained = {name for name, p in model.named_parameters() if p.requires_grad and not name.startswith("head.")}
    expected = trained - {name for name in trained if name.startswith(("h2e.", "student_proj."))}
    if K > 1:
        expected |= {name for name in trained if name.startswith("h2e.")}  # step 1 feeds lat_bos, not h2e
    assert expected <= set(grads)  # every layer's weights, the embeddings (through the cache) and lat_bos
    for name in grads:
        assert relative_difference(grads[name], reference[1][name]) <= 1e-10, name


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_lean_rollout_equals_hf_in_float32_without_patching(family):
    """In float32 both paths normalise the same way; what is left is rounding of a different operation order."""
    model = make_model(make_student(family), torch.float32)
    (ref_latents, ref_grads), (latents, grads) = (rollout(model, impl, 7, *prompts()) for impl in ("hf", "lean"))
    assert relative_difference(latents, ref_latents) < 1e-5
    for name in ref_grads:
        assert relative_difference(grads[name], ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_lean_rollout_under_bf16_autocast_is_as_close_to_float32_as_hf(family):
    """bf16 rounds differently in the two paths (fused matmuls, one gradient matmul over all steps), so they
    are not equal; each must be about as far from the float32 rollout as the other."""
    model = make_model(make_student(family), torch.float32)
    reference_latents, reference_grads = rollout(model, "hf", 7, *prompts())
    errors = {}
    for impl in ("hf", "lean"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latents, grads = rollout(model, impl, 7, *prompts())
        assert latents.dtype == torch.float32  # the final norm's float32 weight, as in HF
        assert all(g.dtype == torch.float32 for g in grads.values())  # trained weights stay float32
        errors[impl] = (
            relative_difference(latents.float(), reference_latents),
            max(relative_difference(grads[n], reference_grads[n]) for n in reference_grads),
        )
    for lean_error, hf_error in zip(errors["lean"], errors["hf"]):
        assert lean_error < max(2 * hf_error, 0.02), errors  # bf16 has 8 bits of mantissa: ~0.4% a rounding
    assert errors["lean"][0] < 0.05 and errors["lean"][1] < 0.1, errors


def test_lean_rollout_without_gradient_equals_with_and_batches_like_each_prompt_alone():
    model = make_model(make_student("qwen2")).eval()
    model.settings.rollout_impl = "lean"
    ids, mask = prompts()
    with torch.no_grad():
        latents = model.student_latents(ids, mask)
    torch.testing.assert_close(latents, rollout(model, "lean", 7, ids, mask)[0], rtol=1e-12, atol=1e-12)
    for b, length in enumerate(PROMPT_LENGTHS):
        with torch.no_grad():
            alone = model.student_latents(ids[b : b + 1, -length:], mask[b : b + 1, -length:])
        torch.testing.assert_close(alone[0], latents[b], rtol=1e-10, atol=1e-10)


def test_deferred_weight_gradients_accumulate_over_two_backward_passes(hf_norms_in_input_dtype):
    """Each backward pass forms the weight gradients from the steps it reached: running the backward twice
    over one graph (retain_graph) gives twice the gradient, and a loss on the first latent alone gives the
    gradient of the rollout cut after step 1."""
    model = make_model(make_student("qwen2"))
    ids, mask = prompts()
    model.settings.rollout_impl, model.settings.K = "lean", 4
    latents = model.student_latents(ids, mask)
    latents.sum().backward(retain_graph=True)
    once = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    latents.sum().backward()
    for name, grad in once.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, 2 * grad, rtol=1e-12, atol=0)

    first_only = {}
    for impl in ("lean", "hf"):
        model.settings.rollout_impl = impl
        model.zero_grad(set_to_none=True)
        model.student_latents(ids, mask)[:, 0].sum().backward()
        first_only[impl] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert first_only["lean"].keys() == first_only["hf"].keys()
    for name, grad in first_only["hf"].items():
        assert relative_difference(first_only["lean"][name], grad) <= 1e-10, name


def test_unsupported_students_fall_back_to_hf_with_one_log_line(caplog):
    class Adapter(torch.nn.Linear):  # stands for a LoRA or quantized layer: computes something else
        pass

    dynamic_rope = make_student("qwen2", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    adapted = make_student("qwen2")
    q_proj = adapted.model.layers[1].self_attn.q_proj
    adapted.model.layers[1].self_attn.q_proj = Adapter(q_proj.in_features, q_proj.out_features)
    torch.manual_seed(0)
    gemma = GemmaForCausalLM(GemmaConfig(**{**SHAPE, "head_dim": 16}))  # RMSNorm with (1 + weight)
    windowed = make_student("mistral", sliding_window=12)  # prompt 11 + K 7 latents > 12
    cases = {
        "rope type 'dynamic'": dynamic_rope,
        "layer 1 self_attn.q_proj is a": adapted,  # ... test_rollout.<...>.Adapter, not a plain torch.nn.Linear
        "model type 'gemma'": gemma,
        "exceeds the sliding window 12": windowed,
    }
    for reason, student in cases.items():
        model = make_model(student)
        with caplog.at_level(logging.INFO, logger="train_latent_comm"):
            caplog.clear()
            lean, hf = (rollout(model, impl, 7, *prompts()) for impl in ("auto", "hf"))
            rollout(model, "auto", 7, *prompts())  # said once per reason
        notes = [r.getMessage() for r in caplog.records if "Student rollout" in r.getMessage()]
        assert len(notes) == 1 and reason in notes[0], notes
        torch.testing.assert_close(lean[0], hf[0], rtol=0, atol=0)  # the HF path itself
        model.settings.rollout_impl = "lean"
        with pytest.raises(tlc.LatentCommError, match="--rollout_impl lean cannot run this student"):
            model.student_latents(*prompts())

    # The window binds only past its length: a short enough rollout takes the lean step.
    model = make_model(make_student("mistral", sliding_window=64))
    assert model.rollout_impl(11) == "lean"


def test_rollout_impl_flag_reaches_the_model_and_its_saved_settings(assets, tmp_path):
    from test_cli import base_args

    out = tmp_path / "hf_rollout"
    code = tlc.main(base_args(assets, out, "--max_steps", "1", "--eval_ratio", "0", "--save_strategy", "no",
                              "--rollout_impl", "hf"))  # fmt: skip
    assert code == 0
    model, run = tlc.load_latent_model(str(out))
    assert model.settings.rollout_impl == "hf" and run.config["settings"]["rollout_impl"] == "hf"
    with pytest.raises(tlc.LatentCommError, match="--rollout_impl.*invalid choice: 'fast'"):
        tlc.parse_args(base_args(assets, tmp_path / "unused", "--rollout_impl", "fast"))


def test_rms_normalize_matches_hf_rmsnorm_in_half_precision():
    """The lean step's RMSNorm normalises in float32 and rounds to the input dtype before the weight, as HF's."""
    norm = modeling_qwen2.Qwen2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = (torch.randn(3, 64) * 4).to(dtype).requires_grad_()
        ours = tlc._rms_normalize(x, 1e-6) * norm.weight
        theirs = norm(x)
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        # The kernel the lean step uses on CUDA computes the same (here through its CPU decomposition).
        torch.testing.assert_close(tlc._rms_normalize(x, 1e-6), torch.nn.functional.rms_norm(x, (64,), None, 1e-6))
        grad_ours, = torch.autograd.grad(ours.sum(), x)
        grad_theirs, = torch.autograd.grad(theirs.sum(), x)
        low_precision = dtype != torch.float32  # the two backward passes round differently
        tolerance = dict(rtol=2e-2, atol=1e-2) if low_precision else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_ours.float(), grad_theirs.float(), **tolerance)


def test_gradient_checkpointed_prefill_is_recomputed_under_the_lean_rollout():
    """With checkpointing, the student's prefill layers run again in the backward pass (their activations are
    not kept) while the lean steps read the cache the first run filled."""
    model = make_model(make_student("qwen2"))
    model.activation_checkpointing_enable()
    calls = {"n": 0}
    handles = [layer.self_attn.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
               for layer in model.student.model.layers]  # fmt: skip
    model.settings.rollout_impl = "lean"
    latents = model.student_latents(*prompts())
    assert calls["n"] == 2  # the prefill only: the steps do not call the modules
    latents.sum().backward()
    assert calls["n"] == 4  # both prefill layers recomputed
    for h in handles:
        h.remove()
    copy.deepcopy(model)  # a model that went through a rollout stays copyable (no graph state on modules)
