"""Drafting with a small causal LM: its own paged KV cache, a whole sub-batch per call.

Per request the state is the context the verifier committed plus the draft
model's KV for it. A call first feeds every request's uncached tokens, then
drafts in lockstep: step j feeds the token drafted at step j - 1 for the
requests that still want more (k_i > j), so requests drop out as their k_i is
reached. Drafted positions' KV is kept: when the verifier accepts them, the
next call finds it already computed.

With `min_confidence` > 0 a request's draft also stops after a position
where the draft model's most likely token had less than that probability (of
its processed distribution, for sampled requests): the verifier then checks
fewer tokens that would likely be rejected. The stop depends on the draft
model alone, so verification stays lossless (greedy and sampled).

Greedy requests draft the argmax. Sampled requests draw from the draft's
distribution after their own temperature / top-p and a top-k cap, and get
that exact sparse distribution back for the rejection sampler.

With a head vocabulary (`drafting.head_vocab`) the draft's output layer
covers only those tokens: logits column j is token `head_ids[j]`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from drafting.head_vocab import restrict_head
from drafting.state import DraftCall
from runtime import model_thread
from runtime.draft import Draft
from runtime.kv_cache import BlockAllocator, OutOfBlocks
from runtime.model_runner import ForwardItem, ModelRunner
from runtime.paged_kernels import KERNELS
from runtime.sampler import SamplingParams, processed_probs

log = logging.getLogger(__name__)


@dataclass(eq=False)
class DraftState:
    tokens: list[int] = field(default_factory=list)  # committed context
    drafted: list[int] = field(default_factory=list)  # tokens drafted after it, with KV computed
    num_computed: int = 0  # positions with valid KV (context first, then drafted)
    block_table: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, new: list[int]) -> None:
        # KV of drafted tokens that the verifier accepted stays valid.
        keep = 0
        while keep < min(len(new), len(self.drafted)) and new[keep] == self.drafted[keep]:
            keep += 1
        self.num_computed = min(self.num_computed, len(self.tokens) + keep)
        self.tokens.extend(new)
        self.drafted = []


class DraftModelBackend:
    def __init__(
        self,
        model,
        kv_cache_tokens: int = 65536,
        block_size: int = 16,
        top_k_cap: int = 32,
        min_confidence: float = 0.0,
        head_vocab: list[int] | None = None,
        graphs: str = "off",
        attention: str = "auto",
        max_batch: int = 0,
        max_len: int | None = None,
    ):
        """`max_batch`: with graphs, those of sub-batches up to this many requests are captured (or
        compiled) now, before a verifier waits on one; larger ones on first use (0: every one).
        `max_len`: the longest request it drafts for (default: the model's context)."""
        if top_k_cap < 1:
            raise ValueError(f"top_k_cap must be at least 1, got {top_k_cap}")
        self.min_confidence = check_min_confidence(min_confidence)
        self.head_ids = restrict_head(model, head_vocab) if head_vocab is not None else None
        num_blocks = -(-kv_cache_tokens // block_size)
        self.max_len = min(getattr(model.config, "max_position_embeddings", 1 << 30), max_len or 1 << 30)
        # Its lockstep steps are small and many: the case graphs help most.
        runner = functools.partial(
            ModelRunner, model, num_blocks, block_size, graphs=graphs, max_len=min(self.max_len, kv_cache_tokens)
        )
        try:
            self.runner = runner(attention=attention)
        except ValueError as exc:
            if attention not in KERNELS:  # auto, sdpa or a bad name: nothing to fall back from
                raise
            # The draft's blocks are its own: a kernel the target runs at --block-size 256 may refuse them.
            log.warning("draft attention: %s; choosing automatically", exc)
            self.runner = runner(attention="auto")
        if max_batch > 0:
            self.runner.warm_up(max_batch)
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.top_k_cap = top_k_cap
        self.vocab_size = model.get_input_embeddings().num_embeddings  # token ids a context may hold

    def new_state(self) -> DraftState:
        return DraftState()

    def release(self, state: DraftState) -> None:
        self.allocator.free(state.block_table)

    def propose(self, calls: list[DraftCall]) -> list[Draft]:
        """A draft per call, at most k ids, with sparse distributions for sampled requests
        (computed on the model thread, with the forwards: runtime.model_thread)."""
        return model_thread.call(self._propose, calls)

    def _propose(self, calls: list[DraftCall]) -> list[Draft]:
        drafts: list[list[int]] = [[] for _ in calls]
        probs: list[list | None] = [None if c.params.greedy else [] for c in calls]
        stopped = [False] * len(calls)
        active = [i for i, c in enumerate(calls) if c.k > 0 and self._fits(c)]
        for i in active:
            s = calls[i].state
            s.drafted = []
            # Feed at least the last committed token: its logits give the first draft.
            s.num_computed = min(s.num_computed, len(s.tokens) - 1)
            if s.generator is None and not calls[i].params.greedy:
                s.generator = _generator(calls[i].params)
        while active:
            items = [
                ForwardItem(_pending(calls[i].state), calls[i].state.num_computed, calls[i].state.block_table, 1)
                for i in active
            ]
            picks = self._pick([calls[i] for i in active], self.runner.forward(items))
            still = []
            for i, item, pick in zip(active, items, picks):
                c = calls[i]
                if pick is None:  # its logits were not finite: no more drafts, and its KV is redone
                    self._forget(c.state)
                    continue
                token, dist, confidence = pick
                c.state.num_computed += len(item.token_ids)
                drafts[i].append(token)
                c.state.drafted.append(token)
                if dist is not None:
                    probs[i].append(dist)
                if len(drafts[i]) < c.k:
                    if confidence >= self.min_confidence:
                        still.append(i)
                    else:
                        stopped[i] = True
            active = still
        return [Draft(*d) for d in zip(drafts, probs, stopped)]

    def _fits(self, call: DraftCall) -> bool:
        """Reserves KV for the uncached context plus k drafts; no room means no drafts."""
        s = call.state
        total = len(s.tokens) + call.k
        if total > self.max_len or not s.tokens:
            return False
        try:
            self.allocator.grow(s.block_table, total)
        except OutOfBlocks:
            return False
        return True

    def _forget(self, state: DraftState) -> None:
        """Drops a request's cached KV after its logits were not finite: its blocks are zeroed
        (a NaN left there would spread to whoever computes into them next, as masked reads of
        slots not yet written weigh them by 0, and 0 x NaN is NaN) and recomputed next call."""
        self.runner.clear_blocks(state.block_table)
        state.num_computed = 0

    def _pick(self, calls: list[DraftCall], logits: torch.Tensor) -> list[tuple[int, tuple | None, float] | None]:
        """Per call (a row of logits): the drafted token, its sparse distribution (sampled requests)
        and the draft's confidence, the probability of its most likely token (1.0 for greedy
        requests without a confidence stop: not computed); None where the row is not finite.
        The rows are processed together on the logits' device and copied to the host once per
        kind (greedy, sampled): a lockstep step runs this for every request, and a copy per row
        would wait on the device per row."""
        picks: list = [None] * len(calls)
        greedy = [row for row, c in enumerate(calls) if c.params.greedy]
        if greedy:
            rows = logits if len(greedy) == len(calls) else logits[greedy]
            top, columns = rows.max(dim=1)  # the first maximum, as argmax; NaN or +inf when the row holds one
            confidence = (
                torch.softmax(rows, dim=1).gather(1, columns.unsqueeze(1)).squeeze(1)
                if self.min_confidence > 0.0
                else torch.ones_like(top)
            )
            picked = torch.stack([columns.double(), confidence.double(), (top < float("inf")).double()], 1).tolist()
            for row, (column, p, finite) in zip(greedy, picked):
                picks[row] = (self._token(int(column)), None, p) if finite else None
        sampled = [row for row, c in enumerate(calls) if not c.params.greedy]
        if sampled:
            params = [calls[row].params for row in sampled]
            caps = [min(p.top_k, self.top_k_cap) if p.top_k > 0 else self.top_k_cap for p in params]
            capped = [SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=k) for p, k in zip(params, caps)]
            # A row proposes from its `cap` most likely tokens, renormalised (top-k keeps more when
            # tokens tie at the k-th value): any proposal is lossless as long as the distribution
            # returned is the one drawn from. Only those columns leave the device.
            top = torch.topk(processed_probs(logits[sampled], capped), min(max(caps), logits.shape[1]), dim=1)
            kept = top.values / top.values.sum(dim=1, keepdim=True)
            host = torch.cat([kept.double(), top.indices.double()], dim=1).cpu().numpy()
            kept, columns = host[:, : kept.shape[1]], host[:, kept.shape[1] :].astype(np.int64)
            tokens = columns if self.head_ids is None else self.head_ids.numpy()[columns]
            # Inverse CDF with one uniform from each request's own generator (values descend,
            # so zero-probability columns sit at the end and no draw lands on them).
            cdf = np.cumsum(kept, axis=1)
            for j, row in enumerate(sampled):
                if not np.isfinite(kept[j]).all():
                    continue
                u = float(torch.rand((), generator=calls[row].state.generator, dtype=torch.float64))
                n = int(np.count_nonzero(kept[j]))
                column = min(int(np.searchsorted(cdf[j, :n], u * cdf[j, n - 1], side="right")), n - 1)
                dist = (tokens[j, :n].tolist(), kept[j, :n].tolist())
                picks[row] = (int(tokens[j, column]), dist, float(kept[j, 0]))
        return picks

    def _token(self, column: int) -> int:
        return column if self.head_ids is None else int(self.head_ids[column])


def _pending(s: DraftState) -> list[int]:
    """The tokens whose KV the draft has not computed: the context's tail, then the drafts."""
    if s.num_computed >= len(s.tokens):
        return s.drafted[s.num_computed - len(s.tokens) :]
    return s.tokens[s.num_computed :] + s.drafted


def check_min_confidence(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {value}")
    return value


def _generator(params: SamplingParams) -> torch.Generator:
    g = torch.Generator()
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed ^ 0x5EED)  # a stream of its own, not the verifier's
    return g
