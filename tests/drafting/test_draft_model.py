"""The committed built-in draft for SmolLM2 (drafting/models/smollm2-draft) is usable."""

from __future__ import annotations

import json
import os

import pytest
import torch

from drafting.builtin import builtin_draft_dir
from runtime import models

DRAFT_DIR = os.environ.get("DRAFT_MODEL_DIR") or builtin_draft_dir()
MAX_BYTES = 30 * 1000 * 1000


@pytest.fixture(scope="module")
def draft():
    return models.load_model(DRAFT_DIR)


def test_weights_file_is_small_enough():
    assert os.path.getsize(os.path.join(DRAFT_DIR, "model.safetensors")) <= MAX_BYTES


def test_config_is_a_tied_llama():
    with open(os.path.join(DRAFT_DIR, "config.json")) as fh:
        cfg = json.load(fh)
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True
    assert cfg["vocab_size"] == 49152


def test_model_card_and_training_log_exist():
    for name in ("README.md", "training_log.json"):
        assert os.path.isfile(os.path.join(DRAFT_DIR, name)), name


def test_tokenizer_is_compatible_with_smollm2(draft, smollm2_tokenizer):
    draft_tok = models.load_tokenizer(DRAFT_DIR)
    models.check_tokenizers_compatible(smollm2_tokenizer, draft_tok, 49152, draft.config.vocab_size)
    assert draft_tok.eos_token_id == smollm2_tokenizer.eos_token_id


def test_greedy_forward_gives_finite_full_vocab_logits(draft, smollm2_tokenizer):
    ids = torch.tensor([smollm2_tokenizer("def add(a, b):\n    return").input_ids])
    with torch.inference_mode():
        logits = draft(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
    assert 0 <= int(logits[0, -1].argmax()) < 49152
    assert draft.get_input_embeddings().weight.data_ptr() == draft.get_output_embeddings().weight.data_ptr()
