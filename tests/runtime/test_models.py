"""Model resolution and the target/draft tokenizer compatibility check."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from runtime import models


def test_builtin_model_resolves_to_the_packaged_gguf():
    src = models.resolve(models.DEFAULT_MODEL)
    assert src.gguf_file and src.gguf_file.endswith(".gguf")


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        models.resolve("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(FileNotFoundError, match="not found"):
        models.resolve(str(tmp_path / "missing.gguf"))


def test_directory_model_loads_with_dtype(tiny_llama_dir):
    model = models.load_model(tiny_llama_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {models.DTYPES["bfloat16"]}
    # Rotary inverse frequencies stay float32: rounded to bfloat16 they shift far positions' angles.
    inv_freq = [b for name, b in model.named_buffers() if name.endswith("inv_freq")]
    assert inv_freq and all(b.dtype == models.DTYPES["float32"] for b in inv_freq)
    with pytest.raises(ValueError, match="dtype"):
        models.load_model(tiny_llama_dir, dtype="int3")


def test_same_tokenizer_is_compatible(tiny_llama_dir, smollm2_tokenizer):
    draft = AutoTokenizer.from_pretrained(tiny_llama_dir)
    models.check_tokenizers_compatible(smollm2_tokenizer, draft, 49152, 49152)


def test_other_tokenizer_is_rejected_with_reasons(tmp_path, smollm2_tokenizer):
    from tokenizers import Tokenizer
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "a": 1, "b": 2, "<|im_end|>": 3}
    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>")),
        eos_token="<|im_end|>",
        unk_token="<unk>",
    )
    with pytest.raises(models.IncompatibleTokenizers) as err:
        models.check_tokenizers_compatible(smollm2_tokenizer, other, 49152, 4)
    assert "map to other ids" in str(err.value) and "eos_token_id" in str(err.value)
    with pytest.raises(models.IncompatibleTokenizers, match="vocab size"):
        models.check_tokenizers_compatible(smollm2_tokenizer, smollm2_tokenizer, 100, 49152)
