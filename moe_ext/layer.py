"""nn.Module over moe_ext.fused_moe: a router plus E SwiGLU experts."""

from __future__ import annotations

import torch
from torch import nn

from .fused_moe import fused_moe


class MoE(nn.Module):
    """A Mixture-of-Experts layer: router logits = x @ gate^T, then moe_ext.fused_moe.

    Args:
        hidden_size: H.
        intermediate_size: I, per expert.
        num_experts: E, experts the router scores.
        topk: experts per token.
        scoring_func, renormalize, num_expert_group, topk_group, routed_scaling_factor: routing,
            as in moe_ext.topk_gating.
        use_correction_bias: hold a DeepSeek-V3 style [E] fp32 selection bias.
        expert_map: optional [E] int32 global -> local expert (-1 off this rank); the layer then
            holds only the local experts (max(expert_map) + 1 of them).
        dtype, device: of the parameters (the router and bias stay fp32).

    forward(x [..., H]) -> [..., H].
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        topk: int,
        *,
        scoring_func: str = "softmax",
        renormalize: bool = True,
        num_expert_group: int | None = None,
        topk_group: int | None = None,
        routed_scaling_factor: float = 1.0,
        use_correction_bias: bool = False,
        expert_map: torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.topk = num_experts, topk
        self.scoring_func, self.renormalize = scoring_func, renormalize
        self.num_expert_group, self.topk_group = num_expert_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        local = num_experts
        if expert_map is not None:
            expert_map = expert_map.to(device=device, dtype=torch.int32)
            local = int(expert_map.max().item()) + 1
        self.register_buffer("expert_map", expert_map)
        self.num_local_experts = local
        self.gate = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32, device=device))
        self.w13 = nn.Parameter(torch.empty(local, 2 * intermediate_size, hidden_size, dtype=dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(local, hidden_size, intermediate_size, dtype=dtype, device=device))
        self.correction_bias = (nn.Parameter(torch.zeros(num_experts, dtype=torch.float32, device=device))
                                if use_correction_bias else None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate, std=self.hidden_size ** -0.5)
        nn.init.normal_(self.w13, std=self.hidden_size ** -0.5)
        nn.init.normal_(self.w2, std=self.intermediate_size ** -0.5)
        if self.correction_bias is not None:
            nn.init.normal_(self.correction_bias, std=0.1)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, E] fp32."""
        return x.float() @ self.gate.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)
        out = fused_moe(
            x, self.w13, self.w2, self.router_logits(x), self.topk,
            scoring_func=self.scoring_func, renormalize=self.renormalize,
            correction_bias=self.correction_bias, num_expert_group=self.num_expert_group,
            topk_group=self.topk_group, routed_scaling_factor=self.routed_scaling_factor,
            expert_map=self.expert_map)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, local_experts={self.num_local_experts}, topk={self.topk}, "
                f"scoring_func={self.scoring_func!r}")
