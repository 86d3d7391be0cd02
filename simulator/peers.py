"""Other systems' rules for the speculation length, in the engine's planner seam.

Each is written from its system's documented behaviour (the source is in its
docstring) and plugs into `Engine` where `SpecPlanner` does: `plan(items)` gives k
per scheduled item, `observe(record)` sees each step's drafts and acceptance,
`release(request_id)` forgets a finished request. So in a simulation they run with
the same scheduler, proposer, verifier costs and acceptance as SmartSpec's own
policies, and only the choice of k differs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from controller.acceptance import num_tested
from controller.cost_model import CostModelFitter, CostParams
from controller.goodput import expected_tokens
from controller.policy import MAX_K, Policy
from controller.step import StepRecord
from engine.planner import SpecPlanner, draft_room
from simulator.model import DraftCost


class PeerPlanner:
    """What the peers share: they always may speculate, and each item's k is capped by what
    the request can still use (`draft_room`) and MAX_K."""

    speculates = True

    def plan(self, items) -> list[int]:
        return [min(self.choose(item, len(items)), draft_room(item), MAX_K) for item in items]

    def choose(self, item, batch_size: int) -> int:
        raise NotImplementedError

    def observe(self, step: StepRecord) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass


class HFHeuristic(PeerPlanner):
    """Hugging Face transformers' assisted generation, `num_assistant_tokens_schedule="heuristic"`
    (transformers, generation/candidate_generator.py, `AssistedCandidateGenerator.update_candidate_strategy`):
    per request, start at `num_assistant_tokens` (default 20, here capped at MAX_K); after a step
    in which every draft was accepted, draft 2 more next time; otherwise 1 fewer, never below 1."""

    def __init__(self, start: int = MAX_K):
        self.start = start
        self.k: dict[str, int] = {}

    def choose(self, item, batch_size: int) -> int:
        return self.k.get(item.seq.request_id, self.start)

    def observe(self, step: StepRecord) -> None:
        for request_id, proposed, accepted in step.drafts:
            k = self.k.get(request_id, self.start)
            self.k[request_id] = min(k + 2, MAX_K) if accepted == proposed else max(k - 1, 1)

    def release(self, request_id: str) -> None:
        self.k.pop(request_id, None)


class PaperController(PeerPlanner):
    """The goodput controller of the SmartSpec paper (Liu et al., "Optimizing Speculative Decoding
    for Serving Large Language Models Using Goodput", 2024), as its reference implementation
    behaves: one acceptance rate for the whole batch (an exponential moving average of per-token
    acceptance), one k for every request, re-chosen every `interval` steps to maximise expected
    tokens per millisecond under a cost model fitted online; k = 0 keeps a `favour_off` margin
    (a k > 0 must beat it by 10%)."""

    def __init__(self, cost_prior: CostParams, k_max: int = MAX_K, interval: int = 20, ema: float = 0.1,
                 favour_off: float = 0.10, prior_rate: float = 0.5):  # fmt: skip
        self.fitter = CostModelFitter(prior=cost_prior)
        self.k_max, self.interval, self.ema, self.favour_off = k_max, interval, ema, favour_off
        self.rate = prior_rate
        self.k = 0
        self.steps = 0

    def plan(self, items) -> list[int]:
        if self.steps % self.interval == 0:
            self.k = self._best_k(items)
        return super().plan(items)

    def choose(self, item, batch_size: int) -> int:
        return self.k

    def _best_k(self, items) -> int:
        decoding = sum(1 for it in items if draft_room(it) > 0)
        if not decoding:
            return self.k
        tokens = sum(it.num_new for it in items)
        kv = sum(it.seq.num_computed + it.num_new for it in items)
        cost = self.fitter.params
        rates = []
        for k in range(self.k_max + 1):
            emitted = len(items) - decoding + decoding * float(expected_tokens(self.rate, k))
            ms = cost.verify_ms_at(len(items), tokens + decoding * k, kv + decoding * k)
            ms += float(cost.propose_ms(k, decoding * k)) if k else 0.0
            rates.append(emitted / ms)
        best = int(np.argmax(rates[1:])) + 1 if self.k_max else 0
        return best if rates[best] > (1.0 + self.favour_off) * rates[0] else 0

    def observe(self, step: StepRecord) -> None:
        self.steps += 1
        self.fitter.observe(step)
        tested = sum(num_tested(p, a) for _, p, a in step.drafts)
        if tested:  # per-token acceptance of the tokens whose fate was decided
            observed = sum(a for _, _, a in step.drafts) / tested
            self.rate = (1.0 - self.ema) * self.rate + self.ema * observed


def _speculating(step: StepRecord) -> list[tuple[int, int]]:
    return [(proposed, accepted) for _, proposed, accepted in step.drafts if proposed]


class VLLMDynamic(PeerPlanner):
    """vLLM's dynamic speculative decoding (V1, `speculative_config.num_speculative_tokens_per_batch_size`;
    vllm-project/vllm PR #32374, `vllm/v1/spec_decode/dynamic/utils.py`,
    `build_dynamic_sd_schedule_lookup`; docs/features/speculative_decoding/dynamic_speculative_decoding.md):
    a list of inclusive ranges [start_bs, end_bs, K] starting at 1; the K for the number of requests
    scheduled this step, a gap taking the K of the range before it and sizes past the last range the
    last K; every K at most `num_speculative_tokens`; K = 0 drafts nothing."""

    def __init__(self, ranges: list[tuple[int, int, int]], num_speculative_tokens: int = MAX_K):
        if not ranges or ranges[0][0] != 1:
            raise ValueError("the first range must start at batch size 1")
        self.ranges = sorted(ranges)
        self.k_max = num_speculative_tokens

    def choose(self, item, batch_size: int) -> int:
        k = self.ranges[0][2]
        for lo, _, range_k in self.ranges:
            if lo <= batch_size:
                k = range_k
        return min(k, self.k_max)


class VLLMv0Disable(PeerPlanner):
    """vLLM v0's `speculative_disable_by_batch_size` (vllm/spec_decode/spec_decode_worker.py,
    `SpecDecodeWorker._should_disable_all_speculation`: `running_queue_size >= disable_by_batch_size`,
    the running requests after scheduling): k for every request, none in a step whose running
    batch has reached the threshold. Removed with the v0 engine (vLLM v0.10)."""

    def __init__(self, k: int, disable_at: int):
        self.k, self.disable_at = k, disable_at

    def choose(self, item, batch_size: int) -> int:
        return 0 if batch_size >= self.disable_at else self.k


class TRTLLMSchedule(PeerPlanner):
    """TensorRT-LLM's `draft_len_schedule` (`DecodingBaseConfig`, PyTorch backend;
    tensorrt_llm/_torch/speculative/utils.py, `get_draft_len_for_batch_size`): {batch size: draft
    length}, each length applying up to its key (the first key >= the batch size), 0 past the
    largest key. TensorRT-LLM counts its active requests; here the requests scheduled in the step."""

    def __init__(self, schedule: dict[int, int]):
        self.keys = sorted(schedule)
        self.schedule = schedule

    def choose(self, item, batch_size: int) -> int:
        i = bisect.bisect_left(self.keys, batch_size)
        return self.schedule[self.keys[i]] if i < len(self.keys) else 0


@dataclass
class _Slot:
    candidates: list[int]
    down_hysteresis: float = 0.0
    index: int = -1  # the candidate in use (starts at the largest)
    ema: float | None = None
    verifies: int = 0


class SGLangAdaptive(PeerPlanner):
    """SGLang's adaptive speculative steps (`--speculative-adaptive`; sgl-project/sglang PR #21599,
    python/sglang/srt/speculative/adaptive_spec_params.py, `AdaptiveSpeculativeParams`, and
    adaptive_step_router.py, `batch_size_key_for_batch`). Per batch-size bucket a list of candidate
    step counts and an EMA (alpha 0.2) of accepted drafts per request; after 10 warm-up verifies,
    every 5th verify in the bucket steps down while the EMA <= previous candidate - 0.5 + the down
    hysteresis (0.5 when the previous candidate is 0), else up while the EMA > current - 0.5; a
    bucket at 0 steps probes the next candidate. The batch size is padded up to the next CUDA-graph
    size, then the largest bucket key not above it is used. Which candidate a bucket starts at is
    not documented; here the largest."""

    DEFAULT = {1: ([1, 3, 5, 7], -0.25), 8: ([0, 1, 3], -0.25), 32: ([0, 1], -0.25), 64: ([0], -0.25)}
    GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)

    def __init__(self, buckets=None, alpha: float = 0.2, interval: int = 5, warmup: int = 10):
        buckets = buckets or self.DEFAULT
        self.keys = sorted(buckets)
        self.slots = {key: _Slot(list(c), hyst, index=len(c) - 1) for key, (c, hyst) in buckets.items()}
        self.alpha, self.interval, self.warmup = alpha, interval, warmup
        self.current: _Slot | None = None

    def slot(self, batch_size: int) -> _Slot:
        i = bisect.bisect_left(self.GRAPH_SIZES, batch_size)
        padded = self.GRAPH_SIZES[i] if i < len(self.GRAPH_SIZES) else batch_size
        j = max(bisect.bisect_right(self.keys, padded) - 1, 0)
        return self.slots[self.keys[j]]

    def plan(self, items) -> list[int]:
        self.current = self.slot(len(items))
        return super().plan(items)

    def choose(self, item, batch_size: int) -> int:
        return self.current.candidates[self.current.index]

    def observe(self, step: StepRecord) -> None:
        slot, drafted = self.current, _speculating(step)
        if slot is None:
            return
        steps = slot.candidates[slot.index]
        if steps > 0 and drafted:
            mean = sum(a for _, a in drafted) / len(drafted)
            ema = steps - 1 if slot.ema is None else slot.ema  # a new EMA starts at steps - 1
            slot.ema = (1 - self.alpha) * ema + self.alpha * mean
        slot.verifies += 1
        if slot.verifies <= self.warmup or slot.verifies % self.interval:
            return
        if steps == 0:
            slot.index = min(slot.index + 1, len(slot.candidates) - 1)
            slot.ema = None
            return
        ema = slot.ema if slot.ema is not None else steps - 1
        moved = False
        while slot.index > 0:
            prev = slot.candidates[slot.index - 1]
            if ema > (prev - 0.5 + slot.down_hysteresis if prev else 0.5):
                break
            slot.index -= 1
            moved = True
        while not moved and slot.index < len(slot.candidates) - 1 and ema > slot.candidates[slot.index] - 0.5:
            slot.index += 1


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 4096)


def tuned_table(cost: CostParams, rate: float, draft, ctx: int) -> dict[int, int]:
    """{bucket's largest batch size: its best static k}, as a user tunes a table-driven policy
    offline on the same profile: expected tokens per millisecond of a batch of that size
    whose requests all draft k at acceptance `rate`, over a `ctx`-token context each."""
    table = {}
    for b in BATCH_BUCKETS:
        best, best_rate = 0, 0.0
        for k in range(MAX_K + 1):
            ms = float(cost.verify_ms(b, b * (k + 1), b * (ctx + k + 1)))
            ms += draft.step_ms * k + draft.per_token_ms * b * k + (draft.hop_ms if k else 0.0)
            tokens_per_ms = b * float(expected_tokens(rate, k)) / ms
            if tokens_per_ms > best_rate:
                best, best_rate = k, tokens_per_ms
        table[b] = best
    return table


def _peers(cost: CostParams, rate: float, draft, ctx: int) -> dict:
    table = tuned_table(cost, rate, draft, ctx)
    keys = sorted(table)
    ranges = [(lo + 1, hi, table[hi]) for lo, hi in zip([0, *keys[:-1]], keys)]
    disable_at = next((b for b in keys if table[b] == 0), 1 << 30)
    return {
        "vllm-dynamic": lambda: VLLMDynamic(ranges),
        "vllm-v0": lambda: VLLMv0Disable(max(table[1], 1), disable_at),
        "trtllm": lambda: TRTLLMSchedule(table),
        "sglang-adaptive": lambda: SGLangAdaptive(),
        "hf-heuristic": lambda: HFHeuristic(),
        "paper": lambda: PaperController(cost),
    }


PEERS = ("vllm-dynamic", "vllm-v0", "trtllm", "sglang-adaptive", "hf-heuristic", "paper")


def make_planner(policy, profile: list[StepRecord], rate: float = 0.7, draft=None, ctx: int = 512):
    """A planner for a policy: SmartSpec's own (`Policy` or its text), its cost model seeded with
    the profile's steps as a verifier started with --cost-profile seeds it, or a peer's by name
    (PEERS), its tables tuned on the same profile for acceptance `rate`, the draft's cost and a
    `ctx`-token context (`tuned_table`); the paper's controller fits its cost model from the
    same steps."""
    if isinstance(policy, str) and policy in PEERS:
        planner = _peers(CostModelFitter().seed(profile), rate, draft or DraftCost(), ctx)[policy]()
    else:
        planner = SpecPlanner(Policy.parse(policy) if isinstance(policy, str) else policy)
    if hasattr(planner, "fitter"):
        planner.fitter.seed(profile)
    return planner
