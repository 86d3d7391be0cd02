import random

import pytest

from engine.scheduler import QueueFull, Scheduler, SchedulerConfig, SchedulerOutput, Sequence, Status
from runtime.kv_cache import BlockAllocator
from runtime.sampler import SamplingParams

TOKEN = 7


def make(num_blocks=64, block_size=4, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), BlockAllocator(num_blocks, block_size))


def seq(rid: str, prompt_len: int, max_new_tokens: int = 128) -> Sequence:
    return Sequence(rid, list(range(1, prompt_len + 1)), SamplingParams(max_new_tokens=max_new_tokens))


def step(s: Scheduler) -> SchedulerOutput:
    """What the engine does: schedule, run (advance), append a token where one is sampled."""
    out = s.schedule()
    for it in out.items:
        s.advance(it)
        if it.sample:
            it.seq.output_ids.append(TOKEN)
    return out


def preempt_second_of_two(s: Scheduler) -> tuple[Sequence, Sequence]:
    """Two 7-token prompts in 4 blocks of 4: the third step must preempt the second request."""
    a, b = seq("a", 7), seq("b", 7)
    s.add(a)
    s.add(b)
    step(s)
    step(s)
    assert step(s).preempted == [b]
    return a, b


def ids(out: SchedulerOutput) -> list[tuple[str, int, bool]]:
    return [(it.seq.request_id, it.num_new, it.sample) for it in out.items]


def check_invariants(s: Scheduler) -> None:
    held = [b for q in s.running for b in q.block_table]
    assert len(held) == len(set(held)), "a block is owned twice"
    assert len(held) + s.allocator.num_free == s.allocator.num_blocks, "a block leaked"
    for q in s.waiting:
        assert q.status is Status.WAITING
        assert q.block_table == [] and q.num_computed == 0
    for q in s.running:
        assert q.status is Status.RUNNING
        assert s.allocator.blocks_needed(q.block_table, q.num_computed) == 0


# --- admission -------------------------------------------------------------------


def test_fcfs_admission_and_max_num_seqs():
    s = make(max_num_seqs=2)
    a, b, c = seq("a", 3), seq("b", 3), seq("c", 3)
    for q in (a, b, c):
        s.add(q)
    out = step(s)
    assert ids(out) == [("a", 3, True), ("b", 3, True)]
    assert out.preempted == []
    assert s.running == [a, b] and list(s.waiting) == [c]
    assert a.status is Status.RUNNING and c.status is Status.WAITING
    assert a.first_scheduled_time is not None and c.first_scheduled_time is None
    s.finish(a)
    out = step(s)
    assert ids(out) == [("b", 1, True), ("c", 3, True)]
    assert s.running == [b, c]


def test_empty_scheduler_has_no_work():
    s = make()
    assert not s.has_work()
    out = s.schedule()
    assert out.items == [] and out.preempted == [] and out.num_batched_tokens == 0
    s.add(seq("a", 2))
    assert s.has_work()


def test_token_budget_chunks_the_request_that_does_not_fit():
    s = make(max_batched_tokens=10)
    a, b, c = seq("a", 6), seq("b", 6), seq("c", 2)
    for q in (a, b, c):
        s.add(q)
    out = step(s)
    assert ids(out) == [("a", 6, True), ("b", 4, False)]
    assert out.num_batched_tokens == 10
    assert list(s.waiting) == [c]  # budget exhausted: c waits
    out = step(s)
    assert ids(out) == [("a", 1, True), ("b", 2, True), ("c", 2, True)]
    assert out.num_batched_tokens == 5


def test_chunked_prefill_samples_only_on_the_last_chunk_then_decodes_one_token():
    s = make(max_batched_tokens=4)
    a = seq("a", 10)
    s.add(a)
    assert ids(step(s)) == [("a", 4, False)]
    assert a.num_computed == 4 and a.output_ids == []
    assert ids(step(s)) == [("a", 4, False)]
    assert ids(step(s)) == [("a", 2, True)]
    assert a.num_computed == 10 and a.output_ids == [TOKEN]
    for _ in range(3):
        assert ids(step(s)) == [("a", 1, True)]
    assert a.num_computed == 13 and len(a.output_ids) == 4
    assert len(a.block_table) == 4  # 13 tokens, blocks of 4


def test_blocks_grow_with_the_scheduled_tokens():
    s = make(num_blocks=8, block_size=4, max_batched_tokens=5)
    a = seq("a", 9)
    s.add(a)
    step(s)
    assert len(a.block_table) == 2  # 5 tokens
    step(s)
    assert len(a.block_table) == 3  # 9 tokens
    assert s.allocator.num_free == 5


def test_admission_waits_for_free_blocks():
    s = make(num_blocks=3, block_size=4)
    a, b = seq("a", 8), seq("b", 8)
    s.add(a)
    s.add(b)
    out = step(s)
    assert ids(out) == [("a", 8, True)]  # b needs 2 blocks, 1 free
    assert list(s.waiting) == [b]
    s.finish(a)
    assert ids(step(s)) == [("b", 8, True)]


def test_queue_full_at_max_waiting():
    s = make(max_waiting=2, max_num_seqs=1)
    s.add(seq("a", 2))
    s.add(seq("b", 2))
    with pytest.raises(QueueFull):
        s.add(seq("c", 2))
    assert [q.request_id for q in s.waiting] == ["a", "b"]
    step(s)  # a is admitted, freeing a waiting slot
    s.add(seq("c", 2))
    with pytest.raises(QueueFull):
        s.add(seq("d", 2))


# --- preemption ------------------------------------------------------------------


def test_preemption_evicts_the_most_recent_and_requeues_it_at_the_front():
    s = make(num_blocks=4, block_size=4, max_num_seqs=2)
    a, b, c = seq("a", 7), seq("b", 7), seq("c", 1)
    for q in (a, b, c):
        s.add(q)
    assert ids(step(s)) == [("a", 7, True), ("b", 7, True)]  # 2 + 2 blocks, none free
    assert ids(step(s)) == [("a", 1, True), ("b", 1, True)]  # tokens 8 fit in 2 blocks
    assert s.allocator.num_free == 0
    out = step(s)  # a needs a third block for token 9: b is evicted
    assert ids(out) == [("a", 1, True)]
    assert out.preempted == [b]
    assert b.status is Status.WAITING
    assert b.block_table == [] and b.num_computed == 0 and b.num_preemptions == 1
    assert list(s.waiting) == [b, c]  # the preempted request goes to the FRONT
    assert s.running == [a]
    assert s.allocator.num_free == 1
    assert b.output_ids == [TOKEN, TOKEN]  # output is kept, only KV is dropped
    check_invariants(s)

    s.finish(a)
    out = step(s)
    # b is readmitted before c, and recomputes prompt + output in one go, then samples.
    assert ids(out)[0] == ("b", 7 + 2, True)
    assert ids(out)[1] == ("c", 1, True)
    assert b.num_computed == 9 and b.output_ids == [TOKEN] * 3
    assert b.first_scheduled_time is not None
    check_invariants(s)


def test_no_admission_in_a_step_that_preempted():
    s = make(num_blocks=3, block_size=4)
    a, b = seq("a", 4), seq("b", 4)
    s.add(a)
    s.add(b)
    step(s)  # 1 + 1 blocks
    s.add(seq("c", 1))
    out = step(s)  # both need a 2nd block, 1 free: a grows, b evicts itself
    assert ids(out) == [("a", 1, True)]
    assert out.preempted == [b]
    assert [q.request_id for q in s.waiting] == ["b", "c"]
    check_invariants(s)


def test_preempted_request_with_a_small_budget_recomputes_in_chunks():
    s = make(num_blocks=4, block_size=4, max_batched_tokens=16)
    a, b = preempt_second_of_two(s)
    s.finish(a)
    s.config = SchedulerConfig(max_batched_tokens=4)
    out = step(s)
    assert ids(out) == [("b", 4, False)]
    out = step(s)
    assert ids(out) == [("b", 4, False)]
    out = step(s)
    assert ids(out) == [("b", 1, True)]  # 9 tokens recomputed, sample only at the end
    assert b.output_ids == [TOKEN] * 3


def test_lone_request_out_of_blocks_is_preempted_not_crashed():
    s = make(num_blocks=2, block_size=4)
    a = seq("a", 8)
    s.add(a)
    step(s)
    out = step(s)  # needs a 3rd block that does not exist
    assert out.items == [] and out.preempted == [a]
    assert list(s.waiting) == [a] and s.running == []
    assert s.allocator.num_free == 2
    out = step(s)  # still does not fit: waits, no exception
    assert out.items == [] and list(s.waiting) == [a]


def test_workload_under_block_pressure_finishes_and_frees_everything():
    rng = random.Random(0)
    s = make(num_blocks=12, block_size=4, max_num_seqs=5, max_batched_tokens=12, max_waiting=100)
    initial_free = s.allocator.num_free
    seqs = [seq(f"r{i}", rng.randint(1, 12), max_new_tokens=rng.randint(1, 10)) for i in range(20)]
    for q in seqs:
        s.add(q)
    total_preemptions = 0
    for _ in range(1000):
        if not s.has_work():
            break
        out = s.schedule()
        total_preemptions += len(out.preempted)
        assert out.num_batched_tokens <= 12
        assert len(s.running) <= 5
        scheduled = [it.seq for it in out.items]
        assert len(scheduled) == len(set(scheduled))
        assert not set(scheduled) & set(out.preempted)
        for it in out.items:
            assert it.num_new >= 1
            s.advance(it)
            assert it.sample == (it.seq.num_computed == it.seq.num_tokens)
            if it.sample:
                it.seq.output_ids.append(TOKEN)
                if len(it.seq.output_ids) >= it.seq.params.max_new_tokens:
                    s.finish(it.seq)
        check_invariants(s)
    assert not s.has_work()
    assert total_preemptions > 0  # the workload did exercise preemption
    assert all(q.status is Status.FINISHED for q in seqs)
    assert all(len(q.output_ids) == q.params.max_new_tokens for q in seqs)
    assert all(q.block_table == [] for q in seqs)
    assert s.allocator.num_free == initial_free


# --- finish / abort / rollback ---------------------------------------------------


def test_finish_from_waiting():
    s = make(max_num_seqs=1)
    a, b = seq("a", 3), seq("b", 3)
    s.add(a)
    s.add(b)
    step(s)
    s.finish(b)
    assert b.status is Status.FINISHED
    assert list(s.waiting) == [] and s.running == [a]


def test_finish_from_running_frees_all_blocks():
    s = make(num_blocks=8, block_size=4)
    a, b = seq("a", 9), seq("b", 2)
    s.add(a)
    s.add(b)
    step(s)
    assert s.allocator.num_free == 8 - 3 - 1
    s.finish(a)
    assert a.status is Status.FINISHED and a.block_table == []
    assert s.running == [b]
    assert s.allocator.num_free == 8 - 1
    s.finish(b)
    assert s.allocator.num_free == 8 and not s.has_work()


def test_abort_mid_chunked_prefill_frees_blocks():
    s = make(num_blocks=8, block_size=4, max_batched_tokens=5)
    a = seq("a", 20)
    s.add(a)
    step(s)
    step(s)
    assert a.num_computed == 10 and len(a.block_table) == 3
    s.finish(a)
    assert s.allocator.num_free == 8 and not s.has_work()


def test_finish_after_preemption_while_waiting():
    s = make(num_blocks=4, block_size=4)
    a, b = preempt_second_of_two(s)
    s.finish(b)
    assert b.status is Status.FINISHED and list(s.waiting) == []
    s.finish(a)
    assert s.allocator.num_free == 4


def test_finish_twice_is_harmless():
    s = make(num_blocks=4)
    a = seq("a", 3)
    s.add(a)
    step(s)
    s.finish(a)
    s.finish(a)
    assert s.allocator.num_free == 4


def test_rollback_shrinks_blocks_and_num_computed():
    s = make(num_blocks=8, block_size=4)
    a = seq("a", 10)
    s.add(a)
    step(s)
    assert a.num_computed == 10 and len(a.block_table) == 3
    kept = a.block_table[:2]
    s.rollback(a, 6)
    assert a.num_computed == 6
    assert a.block_table == kept
    assert s.allocator.num_free == 6
    s.rollback(a, 8)  # never raises num_computed
    assert a.num_computed == 6 and a.block_table == kept
    s.rollback(a, 0)
    assert a.num_computed == 0 and a.block_table == [] and s.allocator.num_free == 8


def test_after_rollback_the_rejected_tokens_are_rescheduled():
    s = make(num_blocks=8, block_size=4)
    a = seq("a", 6)
    s.add(a)
    step(s)  # 6 computed; tokens: 6 prompt + 1 output
    a.output_ids += [8, 9]  # two draft tokens appended for verification
    assert ids(step(s)) == [("a", 3, True)]  # pending token + 2 drafts, KV written for all
    assert a.num_computed == 9 and len(a.block_table) == 3
    # Both drafts rejected: drop them (and the token sampled after them) and the KV past 7.
    del a.output_ids[1:]
    a.output_ids.append(10)  # the recovered token
    s.rollback(a, 7)
    assert a.num_computed == 7 and len(a.block_table) == 2
    assert s.allocator.num_free == 6
    assert ids(step(s)) == [("a", 1, True)]
    assert a.num_computed == 8


def test_token_slice_equals_slicing_the_whole_context():
    q = seq("q", 5)
    q.output_ids.extend([7, 8, 9])
    whole = q.token_ids()
    for start in range(len(whole) + 1):
        for end in range(start, len(whole) + 1):
            assert q.token_slice(start, end) == whole[start:end]
