"""Continuous batching: a bounded FCFS waiting queue, a running set, a token
budget per step, chunked prefill, and preemption by recompute when KV blocks
run out. Pure Python: no model, no grpc.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from controller.policy import MAX_K, Policy
from runtime.draft import Draft
from runtime.kv_cache import BlockAllocator
from runtime.sampler import SamplingParams


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should retry later."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    seed: int = 0  # keys the request's sampling draws (runtime.counter_rng)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    policy: Policy | None = None  # the request's own speculation (off or fixed:K); None follows the server's
    # Speculation stats (proposed / accepted draft tokens, steps that proposed).
    num_proposed: int = 0
    num_accepted: int = 0
    num_spec_steps: int = 0
    draft_cap: int = MAX_K  # most drafts the proposer offered lately (MAX_K until it offers fewer)
    # (k asked, drafts proposed, drafts accepted) per step with k > 0; None: not traced.
    rounds: list[tuple[int, int, int]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids()[start:end] without copying the whole context (called per step)."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]


@dataclass
class ScheduledItem:
    seq: Sequence
    num_new: int  # tokens fed to the model this step (their KV is written)
    sample: bool  # whether the step ends the request's pending tokens, so a token is sampled
    k: int = 0  # draft tokens the planner asked for (their KV slots are allocated)
    draft: Draft | None = None  # what the proposer returned (at most k tokens)


@dataclass
class SchedulerOutput:
    items: list[ScheduledItem]
    preempted: list[Sequence]

    @property
    def num_batched_tokens(self) -> int:
        return sum(it.num_new for it in self.items)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=64, metadata={"help": "requests running at once"})
    max_batched_tokens: int = field(default=2048, metadata={"help": "token budget per engine step"})
    max_waiting: int = field(default=256, metadata={"help": "waiting-queue bound (beyond it: RESOURCE_EXHAUSTED)"})
    max_model_len: int | None = field(
        default=None,
        metadata={"help": "longest request, prompt + output (unset: the model's context, capped by the cache)"},
    )
    kv_watermark: float = field(
        default=0.01, metadata={"help": "fraction of KV blocks admission keeps free while others run"}
    )


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, clock=time.monotonic):
        self.config = config
        self.allocator = allocator
        self.clock = clock  # timestamps (a simulation passes its virtual clock)
        # Admission leaves this many blocks free so running requests can grow a
        # little before anyone must be preempted.
        self.watermark = int(allocator.num_blocks * config.kv_watermark)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"waiting queue is full ({self.config.max_waiting} requests)")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_batched_tokens
        items: list[ScheduledItem] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.allocator.can_grow(seq.block_table, seq.num_computed + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            items.append(self._take(seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, budget)
            reserve = self.watermark if self.running else 0
            if not self.allocator.can_grow(seq.block_table, seq.num_computed + n, reserve=reserve):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = self.clock()
            items.append(self._take(seq, n))
            budget -= n
        return SchedulerOutput(items, preempted)

    def _take(self, seq: Sequence, n: int) -> ScheduledItem:
        self.allocator.grow(seq.block_table, seq.num_computed + n)
        return ScheduledItem(seq, n, sample=seq.num_computed + n == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        """Drops the request's KV; it is recomputed (prompt + output so far) when readmitted."""
        self.allocator.free(seq.block_table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def advance(self, item: ScheduledItem) -> None:
        """Marks the item's fed tokens as cached (after the forward pass)."""
        item.seq.num_computed += item.num_new

    def reserve_drafts(self, item: ScheduledItem, k: int) -> bool:
        """Allocates KV slots for k draft tokens after the item's tokens, if blocks allow."""
        seq = item.seq
        total = seq.num_computed + item.num_new + k
        if not self.allocator.can_grow(seq.block_table, total):
            return False
        self.allocator.grow(seq.block_table, total)
        return True

    def rollback(self, seq: Sequence, num_tokens: int) -> None:
        """Keeps KV for the first `num_tokens` tokens only (rejected drafts are dropped)."""
        seq.num_computed = min(seq.num_computed, num_tokens)
        self.allocator.shrink(seq.block_table, num_tokens)

    def finish(self, seq: Sequence) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.allocator.free(seq.block_table)
        seq.status = Status.FINISHED
