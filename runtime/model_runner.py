"""Runs the target over one flattened ragged batch and returns the logits asked for."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.attention import ATTN_IMPLEMENTATION, LAYOUT_KWARG, StepItem, StepLayout
from runtime.cpu_linear_select import use_cpu_linear
from runtime.kv_cache import KVCache


@dataclass
class ForwardItem:
    token_ids: list[int]  # new tokens fed this step
    ctx: int  # tokens of this request already in the cache (position of token_ids[0])
    block_table: list[int]  # must already hold ctx + len(token_ids) tokens
    num_logits: int  # trailing positions whose logits are returned (0..len(token_ids))


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, batched_max_q: int = 16):
        self.model = model
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            use_cpu_linear(model)
        layers, kv_heads, head_dim = kv_shape(model.config)
        self.kv = KVCache(
            layers, num_blocks, block_size, kv_heads, head_dim, next(model.parameters()).dtype, self.device
        )
        self.batched_max_q = batched_max_q

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem]) -> torch.Tensor:
        """Returns [sum(num_logits), vocab] float32 logits, items in order."""
        ids, positions, keep = [], [], []
        for it in items:
            start = len(ids)
            ids.extend(it.token_ids)
            positions.extend(range(it.ctx, it.ctx + len(it.token_ids)))
            keep.extend(range(start + len(it.token_ids) - it.num_logits, start + len(it.token_ids)))
        if not ids:
            return torch.empty(0, self.model.config.vocab_size)
        layout = StepLayout.build(
            [StepItem(it.ctx, len(it.token_ids), it.block_table) for it in items],
            self.kv,
            self.device,
            self.batched_max_q,
        )
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            use_cache=False,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
            **{LAYOUT_KWARG: layout},
        )
        logits = out.logits[0].float()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's timers (and the cost model) see the GPU's time
        return logits
