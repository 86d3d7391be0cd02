"""The student (draft) model and its training loop: architecture, initialisation, optimiser."""

from __future__ import annotations

import math
import time

import torch

from training.data import SEQ_LEN


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def student_config(teacher_config, hidden: int, layers: int, heads: int, kv_heads: int, inter: int):
    from transformers import LlamaConfig

    rope_theta = getattr(teacher_config, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(teacher_config, "rope_parameters", None) or {}).get("rope_theta", 100000.0)
    return LlamaConfig(
        vocab_size=teacher_config.vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=teacher_config.max_position_embeddings,
        rms_norm_eps=teacher_config.rms_norm_eps,
        rope_theta=rope_theta,
        tie_word_embeddings=True,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=teacher_config.bos_token_id,
        eos_token_id=teacher_config.eos_token_id,
        pad_token_id=teacher_config.pad_token_id,
    )


def svd_embedding(teacher_emb: torch.Tensor, dim: int) -> torch.Tensor:
    """Teacher embedding (V x D) projected onto its top-`dim` right singular vectors."""
    e = teacher_emb.float()
    _, _, vh = torch.linalg.svd(e, full_matrices=False)
    return e @ vh[:dim].T  # (V x dim); logits e_i . (V^T h) = teacher logits of the projected state


class CandidateVocab:
    """Sampled softmax for speed: every token that occurs in the training data (inputs,
    targets, teacher top-k) plus `n_neg` random other tokens per step, so rare tokens are
    still pushed down.  The saved model uses the full vocabulary."""

    def __init__(self, active: torch.Tensor, vocab: int, n_neg: int, seed: int):
        self.active = active.unique()
        mask = torch.ones(vocab, dtype=torch.bool)
        mask[self.active] = False
        self.inactive = mask.nonzero().squeeze(1)
        self.vocab, self.n_neg, self.seed = vocab, n_neg, seed

    def sample(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        neg = self.inactive[torch.randperm(len(self.inactive), generator=g)[: self.n_neg]]
        cand = torch.cat([self.active, neg])
        pos = torch.full((self.vocab,), -1, dtype=torch.long)
        pos[cand] = torch.arange(len(cand))
        return cand, pos


def cand_logits(student, x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    h = student.model(input_ids=x).last_hidden_state
    return h @ student.model.embed_tokens.weight[cand].T


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def optimizer(student, lr: float, emb_lr_scale: float):
    emb = [student.model.embed_tokens.weight]
    rest = [p for n, p in student.named_parameters() if p is not emb[0]]
    decay = [p for p in rest if p.dim() >= 2]
    nodecay = [p for p in rest if p.dim() < 2]
    groups = [
        {"params": emb, "lr_scale": emb_lr_scale, "weight_decay": 0.0},
        {"params": decay, "lr_scale": 1.0, "weight_decay": 0.01},
        {"params": nodecay, "lr_scale": 1.0, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]


def run_loop(args, student, name: str, steps: int, minutes: float, lr: float, batch_fn, sched: int = 0) -> dict:
    """Generic training loop; batch_fn(step) -> loss. Stops at `steps` or `minutes`.

    The cosine schedule spans `sched` steps if given, else `steps`, else the number of steps
    estimated (after 20 steps) to fit `minutes`; the log records it as <name>_schedule_steps."""
    opt = optimizer(student, lr, args.emb_lr_scale)
    student.train()
    total = sched or steps or 10**9
    t0 = time.time()
    hist = []
    step = 0
    ema = None
    while True:
        el = time.time() - t0
        if minutes and el > 60 * minutes:
            break
        if not (sched or steps) and step == 20:  # estimate how many steps fit the time budget
            total = max(21, int(60 * minutes / (el / 20)))
            log(f"{name}: ~{total} steps fit {minutes} min")
        if step >= (steps or total):
            break
        set_lr(opt, lr_at(step, total if total < 10**9 else 10**6, lr, args.warmup))
        loss, metrics = batch_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        v = loss.item()
        ema = v if ema is None else 0.98 * ema + 0.02 * v
        step += 1
        if step % args.log_every == 0 or step == 1:
            log(
                f"{name}: step {step}/{total if total < 10**9 else '?'} loss {v:.3f} ema {ema:.3f} "
                + " ".join(f"{k} {x:.3f}" for k, x in metrics.items())
                + f" {time.time() - t0:.0f}s"
            )
            hist.append({"step": step, "loss": v, "ema": ema, **metrics, "seconds": time.time() - t0})
    return {
        f"{name}_steps": step,
        f"{name}_schedule_steps": total if total < 10**9 else None,
        f"{name}_tokens": step * args.batch * SEQ_LEN,
        f"{name}_seconds": time.time() - t0,
        f"{name}_history": hist,
        f"{name}_final_ema": ema,
    }
