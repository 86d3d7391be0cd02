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
from runtime.paged_kernels import KERNELS, unavailable

log = logging.getLogger(__name__)


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


ATTENTION = ("auto", *KERNELS, "sdpa")


class ModelRunner:
    def __init__(
        self,
        model,
        num_blocks: int,
        block_size: int,
        batched_max_q: int = 16,
        graphs: str = "off",
        attention: str = "auto",
        max_len: int | None = None,
    ):
        """`graphs`: "off" (eager), "compile" or "cuda": decode and verification steps through
        `runtime.graphs` (compiled, or captured as CUDA graphs), anything larger eagerly;
        "cuda-compiled": compiled, then captured.
        `attention`: "sdpa" (gathered blocks, `runtime.attention`), a paged kernel ("flash":
        torch's, "triton": ours; `runtime.paged_kernels`), or "auto": the first of those that
        runs here and agrees with dense attention, else sdpa.
        `max_len`: the longest request a step holds (prompt and output), which sizes the graphs'
        tables and what `warm_up` covers (`runtime.graphs`)."""
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        model_thread.call(self._init, model, num_blocks, block_size, batched_max_q, graphs, attention, max_len)

    def _init(
        self,
        model,
        num_blocks: int,
        block_size: int,
        batched_max_q: int,
        graphs: str,
        attention: str,
        max_len: int | None,
    ) -> None:
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
        self.paged = self._choose_paged(attention, model.config, kv_heads, head_dim, block_size)
        self.graphs = (
            None if graphs == "off" else GraphRunner(model, self.kv, graphs, batched_max_q, self.paged, max_len)
        )

    def warm_up(self, max_batch: int) -> None:
        """Compiles or captures every graph a step of up to `max_batch` requests can take (none
        without graphs), before any request waits on one (on the model thread)."""
        if self.graphs is not None:
            model_thread.call(self._warm_up, max_batch)

    @torch.inference_mode()
    def _warm_up(self, max_batch: int) -> None:
        start = time.perf_counter()
        count = self.graphs.warm_up(max_batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("graphs: %d buckets %s in %.1f s", count, self.graphs.mode, time.perf_counter() - start)

    def _choose_paged(self, attention: str, config, kv_heads: int, head_dim: int, block_size: int) -> str | None:
        """The paged kernel's name, or None: gathered blocks and SDPA."""
        if attention == "sdpa":
            return None
        geometry, dtype = (config.num_attention_heads, kv_heads, head_dim), self.kv.k[0].dtype
        reasons = []
        for name in KERNELS if attention == "auto" else (attention,):
            why = unavailable(name, *geometry, block_size, dtype, self.device)
            if why is None:
                if reasons and self.device.type == "cuda":
                    log.info("attention: the paged %s kernel (%s)", name, "; ".join(reasons))
                return name
            if self.device.type == "cuda" and unavailable(name, *geometry, 256, dtype, self.device) is None:
                why += "; it runs with a block size of 256 (--block-size 256)"
            reasons.append(why)
        if attention != "auto":
            raise ValueError(reasons[0])
        if self.device.type == "cuda":
            log.warning("attention: gathered blocks and SDPA, as %s", "; ".join(reasons))
        return None

    def clear_blocks(self, blocks: list[int]) -> None:
        """Zeros these KV blocks (on the model thread): a request whose logits were not finite may
        have left NaN in them, and a later owner's attention multiplies the slots it has not
        written yet by weight 0, which keeps a NaN."""
        if blocks:
            model_thread.call(self.kv.clear, blocks)

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
        layout = StepLayout.build(items, self.kv, self.device, self.batched_max_q, paged=self.paged)
        out = self.model(
            input_ids=layout.input_ids,
            position_ids=layout.positions,
            use_cache=False,
            logits_to_keep=layout.keep,
            **{LAYOUT_KWARG: layout},
        )
        return out.logits[0].float()
