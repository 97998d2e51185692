"""The one FLOP count of the project (patch-aware), and GPU peak throughputs for MFU.

Megatron's count per global batch (from core_v0.13.0 on, causal attention counts half of the
score matrix), forward + backward:

    12 * B * s * L * h^2 * [ (1 + G/H + s/(2h)) * q_ratio
                             + (F/h) * (3/2 if SwiGLU else 1)
                             + V / (2 * L * h) ]

Derivation, per layer and position, forward, in multiply-adds (q_ratio = H*d/h):
* QKV projection h*(H*d + 2*G*d) plus output projection h*H*d: 2 * h^2 * q_ratio * (1 + G/H)
* scores QK^T and the weighted sum AV: 2 * s * H*d, halved by the causal mask: s * h * q_ratio
* MLP: 2 * h * F (GELU) or 3 * h * F (SwiGLU: gate, up, down)
* LM head (once, not per layer): h * V
Multiplying by 2 (FLOPs per multiply-add) and 3 (forward + backward: the backward pass costs
two forward passes) and factoring 12 * L * h^2 out gives the formula.

In the patch stage, s is the number of PATCH positions and B the number of sequences:
the transformer, the head and the softmax run once per patch; the tokens per step are K*B*s.
The patch embedding (a mean of K lookups) and the K target gathers are not matrix products and
are not counted, as megatron does not count the token embedding either.
"""

from __future__ import annotations

from megapatch.config import ModelConfig

# Dense peak throughput per GPU, TFLOP/s (no sparsity): bf16 and FP8.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100": {"bf16": 989.0, "fp8": 1979.0},
    "H200": {"bf16": 989.0, "fp8": 1979.0},
    "H800": {"bf16": 989.0, "fp8": 1979.0},
    "A100": {"bf16": 312.0, "fp8": 312.0},
    "B200": {"bf16": 2250.0, "fp8": 4500.0},
    "GH200": {"bf16": 989.0, "fp8": 1979.0},
}


def flops_per_step(model: ModelConfig, sequences: int, positions: int, vocab: int) -> float:
    """Training FLOPs (forward + backward) of one global batch of ``sequences`` x ``positions``.

    ``positions`` are patches in the patch stage, tokens in the token stage; ``vocab`` is the
    (padded) output vocabulary.
    """
    h, layers = model.hidden_size, model.num_layers
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    head_dim = model.kv_channels or h // heads
    q_ratio = heads * head_dim / h
    ffn = model.resolved_ffn_hidden_size()
    mlp = (ffn / h) * (1.5 if model.swiglu else 1.0)
    attn = (1 + groups / heads + positions / (2 * h)) * q_ratio
    head = vocab / (2 * layers * h)
    return 12.0 * sequences * positions * layers * h * h * (attn + mlp + head)


def peak_tflops(device_name: str, fp8: bool = False) -> float | None:
    """Peak dense TFLOP/s of a GPU by its name (None when unknown, e.g. on CPU)."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name.upper():
            return PEAK_TFLOPS[key]["fp8" if fp8 else "bf16"]
    return None
