"""Runs the target over one flattened ragged batch and returns the logits asked for."""

from __future__ import annotations

import logging
import time

import torch

from runtime import model_thread
from runtime.attention import ATTN_IMPLEMENTATION, LAYOUT_KWARG, ForwardItem, StepLayout
from runtime.cpu_linear import prebuild
from runtime.cpu_linear_select import use_cpu_linear
from runtime.graphs import GraphRunner
from runtime.kv_cache import KVCache
from runtime.paged_flash import unavailable

log = logging.getLogger(__name__)


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


ATTENTION = ("auto", "flash", "sdpa")


class ModelRunner:
    def __init__(
        self,
        model,
        num_blocks: int,
        block_size: int,
        batched_max_q: int = 16,
        graphs: str = "off",
        attention: str = "auto",
    ):
        """`graphs`: "off" (eager), "compile" or "cuda": decode and verification steps through
        `runtime.graphs` (compiled, or captured as CUDA graphs), anything larger eagerly.
        `attention`: "sdpa" (gathered blocks, `runtime.attention`), "flash" (the paged kernel,
        `runtime.paged_flash`) or "auto": flash where it runs and agrees with dense attention."""
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        model_thread.call(self._init, model, num_blocks, block_size, batched_max_q, graphs, attention)

    def _init(self, model, num_blocks: int, block_size: int, batched_max_q: int, graphs: str, attention: str) -> None:
        self.model = model
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            use_cpu_linear(model)
            start = time.perf_counter()
            ran = prebuild(model)  # the model is final here (a draft's head already restricted)
            log.info("cpu_linear: %d packed products prebuilt in %.2f s", ran, time.perf_counter() - start)
        layers, kv_heads, head_dim = kv_shape(model.config)
        self.kv = KVCache(
            layers, num_blocks, block_size, kv_heads, head_dim, next(model.parameters()).dtype, self.device
        )
        self.batched_max_q = batched_max_q
        self.flash = self._choose_flash(attention, model.config, kv_heads, head_dim, block_size)
        self.graphs = None if graphs == "off" else GraphRunner(model, self.kv, graphs, batched_max_q, self.flash)

    def _choose_flash(self, attention: str, config, kv_heads: int, head_dim: int, block_size: int) -> bool:
        if attention == "sdpa":
            return False
        geometry, dtype = (config.num_attention_heads, kv_heads, head_dim), self.kv.k[0].dtype
        why = unavailable(*geometry, block_size, dtype, self.device)
        if why is None:
            return True
        if self.device.type == "cuda" and unavailable(*geometry, 256, dtype, self.device) is None:
            why += "; it runs with a block size of 256 (--block-size 256)"
        if attention == "flash":
            raise ValueError(why)
        if self.device.type == "cuda":
            log.warning("attention: gathered blocks and SDPA, as %s", why)
        return False

    def forward(self, items: list[ForwardItem]) -> torch.Tensor:
        """Returns [sum(num_logits), vocab] float32 logits, items in order (run on the model thread)."""
        return model_thread.call(self._forward, items)

    @torch.inference_mode()
    def _forward(self, items: list[ForwardItem]) -> torch.Tensor:
        if not any(it.token_ids for it in items):
            return torch.empty(0, self.model.config.vocab_size)
        bucket = self.graphs.bucket(items) if self.graphs is not None else None
        if bucket is not None:
            logits = self.graphs.forward(items, bucket).float()
        else:
            logits = self._eager(items)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's timers (and the cost model) see the GPU's time
        return logits

    def _eager(self, items: list[ForwardItem]) -> torch.Tensor:
        layout = StepLayout.build(items, self.kv, self.device, self.batched_max_q, flash=self.flash)
        out = self.model(
            input_ids=layout.input_ids,
            position_ids=layout.positions,
            use_cache=False,
            logits_to_keep=layout.keep,
            **{LAYOUT_KWARG: layout},
        )
        return out.logits[0].float()
