"""smartspec.v1.Proposer messages <-> the draft records of the runtime, for both ends of Propose."""

from __future__ import annotations

from protocol.v1 import proposer_pb2 as pb
from runtime.draft import Draft, DraftRequest
from runtime.sampler import SamplingParams


def item_to_pb(request: DraftRequest, known: int | None) -> pb.ProposeItem:
    """`known`: the context length the replica is believed to hold (None: it holds nothing),
    so only the new tail travels."""
    tokens = request.token_ids
    full = known is None or known > len(tokens)
    p = request.params
    sampling = pb.DraftSampling(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)
    if p.seed is not None:
        sampling.seed = p.seed
    return pb.ProposeItem(
        request_id=request.request_id,
        new_token_ids=tokens if full else tokens[known:],
        total_length=len(tokens),
        k=request.k,
        sampling=sampling,
        full_context=full,
    )


def params_from_pb(s: pb.DraftSampling) -> SamplingParams:
    return SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
    )


def draft_to_pb(draft: Draft, result: pb.ProposeResult) -> None:
    result.draft_token_ids.extend(draft.token_ids)
    for token_ids, probs in draft.probs or []:
        result.draft_probs.add(token_ids=token_ids, probs=probs)
    result.stopped_early = draft.stopped_early


def draft_from_pb(result: pb.ProposeResult) -> Draft:
    probs = [(list(d.token_ids), list(d.probs)) for d in result.draft_probs] or None
    return Draft(list(result.draft_token_ids), probs, result.stopped_early)
