"""MoE layer shapes and routing styles of the models the demo and benchmarks use (one layer each).

The activation is SiLU-and-mul for all four (GPT-OSS's clamped SwiGLU with expert biases is
approximated by it; the shapes and routing are its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MoEConfig:
    name: str
    num_experts: int
    topk: int
    hidden_size: int
    intermediate_size: int
    routing: dict = field(default_factory=dict)
    correction_bias: bool = False

    def weight_bytes(self, num_local_experts: int | None = None, elem_bytes: int = 2) -> int:
        e = self.num_experts if num_local_experts is None else num_local_experts
        return e * 3 * self.hidden_size * self.intermediate_size * elem_bytes


MODELS = {
    # DeepSeek-V3/R1: sigmoid scores, correction bias, 8 groups of which 4 compete, scale 2.5.
    "deepseek-v3": MoEConfig("deepseek-v3", 256, 8, 7168, 2048,
                             dict(scoring_func="sigmoid", renormalize=True, num_expert_group=8, topk_group=4,
                                  routed_scaling_factor=2.5), correction_bias=True),
    # GPT-OSS-120B: top-4 logits then softmax (= softmax + renormalize).
    "gpt-oss-120b": MoEConfig("gpt-oss-120b", 128, 4, 2880, 2880, dict(renormalize=True)),
    # Mixtral-8x7B: top-2 of 8, softmax over the two.
    "mixtral-8x7b": MoEConfig("mixtral-8x7b", 8, 2, 4096, 14336, dict(renormalize=True)),
    # Qwen3-30B-A3B: softmax, top-8 of 128, renormalized (norm_topk_prob).
    "qwen3-30b-a3b": MoEConfig("qwen3-30b-a3b", 128, 8, 2048, 768, dict(renormalize=True)),
}
