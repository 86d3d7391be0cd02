"""What a proposer drafts with, as configured on the command line."""

from __future__ import annotations

from dataclasses import dataclass, field

from drafting import builtin
from drafting.draft_model import DraftModelBackend, check_min_confidence
from drafting.ngram import NgramBackend
from runtime.models import Placement

MIN_CONFIDENCE_HELP = (
    "stop a request's draft after a position where the draft model's most likely token "
    "had less than this probability (0 = draft all k tokens)"
)


@dataclass(frozen=True)
class DraftConfig:
    draft: str | None = field(
        default=None,
        metadata={
            "help": f"draft model: '{builtin.BUILTIN_DRAFT}' (built-in), a directory or a .gguf file; "
            "unset: n-gram prompt lookup"
        },
    )
    kv_cache_tokens: int = field(default=65536, metadata={"help": "the draft model's KV cache, in tokens"})
    top_k_cap: int = field(default=32, metadata={"help": "sampled drafts come from at most this many tokens"})
    min_confidence: float = field(default=0.0, metadata={"help": MIN_CONFIDENCE_HELP})
    full_head: bool = field(
        default=False, metadata={"help": "draft over the whole vocabulary, ignoring the draft's head_vocab.json"}
    )
    max_batch: int = field(
        default=64,
        metadata={
            "help": "the most requests one verifier step drafts for (the verifiers' --max-num-seqs): on a GPU, "
            "the draft's graphs up to it are captured at start-up"
        },
    )
    max_model_len: int | None = field(
        default=None,
        metadata={
            "help": "longest request it drafts for, prompt + output (the verifiers' --max-model-len; unset: the "
            "draft's context, capped by its cache): on a GPU, the contexts its graphs are captured for"
        },
    )
    ngram_min: int = field(default=1, metadata={"help": "shortest suffix n-gram prompt lookup matches"})
    ngram_max: int = field(default=4, metadata={"help": "longest suffix n-gram prompt lookup matches"})

    def make_backend(self, placement: Placement = Placement()):
        """An NgramBackend, or a DraftModelBackend with the draft loaded by `placement`."""
        check_min_confidence(self.min_confidence)  # before a model loads
        for name in ("max_batch", "top_k_cap", "max_model_len"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not self.draft:
            if self.min_confidence:
                raise ValueError("min_confidence needs a draft model; n-gram drafts have no confidence")
            return NgramBackend(self.ngram_min, self.ngram_max)
        from drafting import head_vocab

        path = builtin.resolve(self.draft)
        model = placement.load(path)
        head = None if self.full_head else head_vocab.load(path)  # None for a .gguf file or a model without one
        # A draft's few layers launch few kernels, so it is captured but not compiled: compiling
        # would buy little fusion and share the target's compile cache (one function), where
        # each model's differing sizes would cost the other recompiles.
        graphs = "cuda" if placement.graph_mode() == "cuda-compiled" else placement.graph_mode()
        return DraftModelBackend(
            model,
            self.kv_cache_tokens,
            top_k_cap=self.top_k_cap,
            min_confidence=self.min_confidence,
            head_vocab=head,
            graphs=graphs,
            attention=placement.attention,
            max_batch=self.max_batch,
            max_len=self.max_model_len,
        )
