"""The float forward of one DeepSeek-V3/R1 layer over the whole calibration (or evaluation) set,
in the two pieces a layer-streamed pass needs: the layer base over every batch, keeping its MoE
input, its routing and h1 + shared; then each routed expert, loaded a chunk at a time, adding its
weighted output for the tokens routed to it. `streamq eval` runs it for both of its models, the
disable_level pre-pass for the float one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .arch.base import Step

EXPERT_TAG = ".mlp.experts."


@dataclass
class Side:
    """One model's state inside a layer, after its base pass."""
    out: torch.Tensor            # h1 + shared expert (MoE) or the whole layer output (dense), [S, L, h]
    x: torch.Tensor | None       # the routed experts' input (post-attention norm), [S·L, h]
    idx: torch.Tensor | None     # chosen experts per token, [S·L, k]
    w: torch.Tensor | None       # their routing weights, [S·L, k]


def base_pass(arch, base: nn.Module, inputs, shape: tuple, rotary, batch: int, moe: bool) -> Side:
    """The base over rows 0:S of `shape` = [S, L, h] in batches of `batch`; `inputs(i, j)` gives
    rows i:j on the device, in the compute dtype. Kept on the host in fp32."""
    S, L, h = shape
    out = torch.empty(S, L, h)
    x = torch.empty(S, L, h) if moe else None
    idx, w = [], []
    with torch.no_grad():
        for i in range(0, S, batch):
            j = min(i + batch, S)
            h1 = arch.attn_block(base, inputs(i, j), rotary)
            xb = arch.mlp_input(base, h1)
            if moe:
                ib, wb = arch.route(base, xb)
                idx.append(ib.cpu())
                w.append(wb.cpu())
                out[i:j] = (h1 + arch.shared(base, xb)).float().cpu()
                x[i:j] = xb.float().cpu()
            else:
                out[i:j] = (h1 + arch.dense_mlp(base, xb)).float().cpu()
    if not moe:
        return Side(out, None, None, None)
    return Side(out, x.view(S * L, h), torch.cat(idx), torch.cat(w))


def routed(side: Side, e: int) -> bool:
    return bool((side.idx == e).any())


def add_expert(arch, side: Side, expert: nn.Module, e: int, tokens_per_batch: int, device, dtype,
               accumulate: bool = True) -> int:
    """side.out += w · expert(x) for the tokens this side routed to e; fp32 accumulation in
    expert order, so chunking does not change the sum. accumulate=False only runs the tokens
    through the expert (for observers on it). Returns the number of tokens."""
    token, weight = arch.tokens_for(side.idx, side.w, e)
    flat = side.out.view(-1, side.out.shape[-1])
    with torch.no_grad():
        for a in range(0, token.numel(), tokens_per_batch):
            t, wt = token[a:a + tokens_per_batch], weight[a:a + tokens_per_batch]
            y = expert(side.x[t].to(device, dtype)).float().cpu()
            if accumulate:
                flat.index_add_(0, t, y * wt[:, None])
    return int(token.numel())


def expert_sources(step: Step, n_experts: int) -> dict[int, list[str]]:
    """Routed expert → its source tensors in the step."""
    sources: dict[int, list[str]] = {e: [] for e in range(n_experts)}
    for n in step.shapes:
        if EXPERT_TAG in n:
            sources[int(n.split(EXPERT_TAG, 1)[1].split(".", 1)[0])].append(n)
    return sources
