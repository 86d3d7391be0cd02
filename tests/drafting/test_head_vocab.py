"""A draft's output layer over its head vocabulary: slicing the layer, the built-in draft's
file, and the proposer flag that turns it off."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from drafting import head_vocab
from drafting.builtin import builtin_draft_dir
from drafting.draft_model import DraftModelBackend
from drafting.state import DraftCall
from runtime.models import load_model
from runtime.sampler import SamplingParams

BUILTIN = builtin_draft_dir()


def test_restricted_logits_are_the_full_logits_at_those_ids(small_vocab_dir):
    full, small = load_model(small_vocab_dir), load_model(small_vocab_dir)
    ids = [0, 2, 3, 7, 11]
    mapped = head_vocab.restrict_head(small, ids)
    assert mapped.tolist() == ids
    assert small.get_output_embeddings().weight.shape[0] == len(ids)
    assert small.get_input_embeddings().weight.shape[0] == 12  # inputs still cover every token
    x = torch.tensor([[3, 4, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, full(x).logits[..., ids])
    small.tie_weights()  # nothing puts the whole vocabulary back
    assert small.get_output_embeddings().weight.shape[0] == len(ids)


@pytest.mark.parametrize("ids", [[], [1, 1, 2], [-1, 3], [3, 12]])
def test_bad_head_vocabularies_are_refused(small_vocab_dir, ids):
    with pytest.raises(ValueError, match="distinct token ids in \\[0, 12\\)"):
        head_vocab.restrict_head(load_model(small_vocab_dir), ids)


def test_greedy_and_sampled_drafts_come_from_the_head_vocabulary(small_vocab_dir):
    ids = [0, 1, 4, 5, 8, 9, 10]
    reference = load_model(small_vocab_dir)
    backend = DraftModelBackend(load_model(small_vocab_dir), kv_cache_tokens=512, head_vocab=ids)
    state = backend.new_state()
    state.extend([3, 4, 5, 6])
    [d] = backend.propose([DraftCall(state, 4, SamplingParams())])
    context = [3, 4, 5, 6]
    for token in d.token_ids:  # each is the argmax over the head vocabulary after the drafts before it
        with torch.no_grad():
            logits = reference(torch.tensor([context])).logits[0, -1]
        assert token == ids[int(logits[ids].argmax())]
        context.append(token)
    state = backend.new_state()
    state.extend([3, 4, 5])
    [d] = backend.propose([DraftCall(state, 3, SamplingParams(temperature=1.0, seed=4))])
    for token, (support, probs) in zip(d.token_ids, d.probs):
        assert token in support and set(support) <= set(ids)
        assert abs(sum(probs) - 1) < 1e-5


def test_the_builtin_draft_ships_a_head_vocabulary_with_its_special_tokens(smollm2_tokenizer):
    ids = head_vocab.load(BUILTIN)
    assert ids is not None and ids == sorted(set(ids))
    assert 4096 <= len(ids) <= 16384 and 0 <= ids[0] and ids[-1] < 49152
    assert set(smollm2_tokenizer.all_special_ids) <= set(ids)
    with open(os.path.join(BUILTIN, head_vocab.FILE)) as fh:
        meta = json.load(fh)
    assert meta["size"] == len(ids) and meta["coverage_of_counted"] > 0.98
    assert head_vocab.load(os.path.dirname(BUILTIN)) is None  # no file: the whole vocabulary


def test_the_proposer_uses_the_head_vocabulary_unless_told_not_to(small_vocab_dir, tmp_path):
    from proposer_svc.server import ProposerConfig

    model_dir = tmp_path / "draft"
    load_model(small_vocab_dir).save_pretrained(model_dir)
    with open(model_dir / head_vocab.FILE, "w") as fh:
        json.dump({"token_ids": [0, 1, 2, 5]}, fh)
    parser = argparse.ArgumentParser()
    ProposerConfig.add_arguments(parser)
    with_head = ProposerConfig.from_args(parser.parse_args(["--draft", str(model_dir)]))
    without = ProposerConfig.from_args(parser.parse_args(["--draft", str(model_dir), "--full-head"]))
    assert not with_head.drafting.full_head and without.drafting.full_head
    assert with_head.drafting.make_backend().head_ids.tolist() == [0, 1, 2, 5]
    assert without.drafting.make_backend().head_ids is None
