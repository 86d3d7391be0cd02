"""Train SmartSpec's built-in draft model for SmolLM2-135M-Instruct on this CPU.

Reproducible, seeded pipeline in three phases (run all, or one at a time):

1. ``teacher``: tokenise the Python standard library's sources (offline), cut them into
   256-token windows, hold out every 25th file for evaluation, shuffle the training
   windows with the seed, and run SmolLM2 (bfloat16 prefill, whole windows at once)
   over them in that fixed order, caching the teacher's top-k log-probs per position to
   ``--cache-dir`` (resumable shards).
2. ``pretrain``: train the student with plain next-token cross-entropy on the stdlib
   windows (cheap: no teacher needed) -- learns the statistics of Python code.
3. ``distill``: continue on the cached windows with a KD loss: cross-entropy against the
   teacher's renormalised top-k distribution plus ``--argmax-weight`` x cross-entropy on
   the teacher's argmax (what greedy acceptance needs).

The student is a 2-layer Llama with SmolLM2's vocabulary and tokenizer, hidden size 256
and a tied embedding initialised from SmolLM2's embedding projected onto its top-256
principal directions (SVD), so its logits start as the teacher's unembedding restricted
to a subspace.  Weights are written in float16 with ``save_pretrained``.

Budgets are given in minutes and/or steps; whichever ends first stops a phase.  The
log (``training_log.json``) records the steps actually run, so passing them back as
``--teacher-seqs/--pretrain-steps/--distill-steps`` (minutes 0 = unlimited) reproduces
the run exactly.  The teacher and pretrain phases are independent and may run as two
processes at the same time; distill needs both.

    python -m proposer_svc.train_draft --phase all

A second stage distils further from SmolLM2's own output (``proposer_svc/selfgen.py``):

4. ``generate``: SmolLM2 decodes prompts made from the training files (code completions
   and chat requests about their functions) greedily; the sequences are packed into
   windows (``--generate-batches`` repeats a run);
5. ``teacher --teacher-data selfgen``: the teacher's top-k over those windows;
6. ``distill --init-from DIR --distill-data stdlib,selfgen``: continues a saved draft on
   both caches.

The model card (``proposer_svc/models/smollm2-draft/README.md``) lists the exact commands.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

STDLIB = os.path.dirname(os.__file__)
SEQ_LEN = 256
HELDOUT_EVERY = 25  # every 25th stdlib file (sorted) is held out for evaluation
EXCLUDE = ("/test/", "/tests/", "/idlelib/", "/site-packages/", "/lib2to3/tests", "/turtledemo/",
           "/__phello__", "/encodings/")


def stdlib_files(root: str = STDLIB) -> tuple[list[str], list[str]]:
    """(train files, held-out files): sorted stdlib .py sources without tests and the like."""
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if not any(x in f.replace(root, "/") for x in EXCLUDE))
    held = [f for i, f in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY // 2]
    train = [f for f in files if f not in set(held)]
    return train, held


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def build_windows(tok, files: list[str], seq_len: int = SEQ_LEN) -> np.ndarray:
    """Concatenate the files' tokens (eos between files) and cut into seq_len windows."""
    ids: list[int] = []
    for f in files:
        ids.extend(tok(read(f)).input_ids)
        ids.append(tok.eos_token_id)
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def train_windows(tok, seed: int, cache_dir: str) -> np.ndarray:
    """Training windows in the seeded order shared by all phases (cached as .npy)."""
    path = os.path.join(cache_dir, f"windows_seed{seed}.npy")
    if os.path.exists(path):
        return np.load(path)
    train, _ = stdlib_files()
    w = build_windows(tok, train)
    rng = np.random.default_rng(seed)
    w = w[rng.permutation(len(w))]
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path, w)
    return w


def student_config(teacher_config, hidden: int, layers: int, heads: int, kv_heads: int, inter: int):
    from transformers import LlamaConfig

    rope_theta = getattr(teacher_config, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(teacher_config, "rope_parameters", None) or {}).get("rope_theta", 100000.0)
    return LlamaConfig(
        vocab_size=teacher_config.vocab_size, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, max_position_embeddings=teacher_config.max_position_embeddings,
        rms_norm_eps=teacher_config.rms_norm_eps, rope_theta=rope_theta,
        tie_word_embeddings=True, hidden_act="silu", initializer_range=0.02,
        bos_token_id=teacher_config.bos_token_id, eos_token_id=teacher_config.eos_token_id,
        pad_token_id=teacher_config.pad_token_id,
    )


def svd_embedding(teacher_emb: torch.Tensor, dim: int) -> torch.Tensor:
    """Teacher embedding (V x D) projected onto its top-`dim` right singular vectors."""
    e = teacher_emb.float()
    _, _, vh = torch.linalg.svd(e, full_matrices=False)
    return e @ vh[:dim].T  # (V x dim); logits e_i . (V^T h) = teacher logits of the projected state


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ---------------------------------------------------------------------------------- phases

def selfgen_path(args) -> str:
    return os.path.join(args.cache_dir, f"selfgen_windows_seed{args.seed}.npy")


def phase_generate(args, tok) -> dict:
    """SmolLM2 (bfloat16) decodes prompts made from the training files greedily; packed windows are cached."""
    from proposer_svc import selfgen
    from smartspec.models import load_model

    model = load_model("smollm2").to(torch.bfloat16)
    prompt_ids = selfgen.prompts(tok, [read(f) for f in stdlib_files()[0]], args.seed)
    log(f"generate: {len(prompt_ids)} prompts")
    t0 = time.time()
    seqs, done = selfgen.generate_all(model, tok, prompt_ids, args.generate_new_tokens, args.generate_batch,
                                      args.generate_minutes, max_batches=args.generate_batches, log=log)
    windows = selfgen.pack(seqs, tok.eos_token_id, SEQ_LEN)
    np.save(selfgen_path(args), windows)
    return {"generate_sequences": len(seqs), "generate_batches": done,
            "generate_tokens": sum(map(len, seqs)), "generate_windows": len(windows),
            "generate_seconds": time.time() - t0, "generate_dtype": "bfloat16"}


def teacher_windows(args, tok, data: str) -> np.ndarray:
    return np.load(selfgen_path(args)) if data == "selfgen" else train_windows(tok, args.seed, args.cache_dir)


def teacher_shards(args, data: str) -> str:
    """Glob of the teacher cache of one data set (the stdlib's keeps its original name)."""
    prefix = "teacher" if data == "stdlib" else f"teacher_{data}"
    return os.path.join(args.cache_dir, f"{prefix}_seed{args.seed}_k{args.topk}_*.npz")


def phase_teacher(args, tok) -> dict:
    from smartspec.models import load_model

    windows = teacher_windows(args, tok, args.teacher_data)
    n_max = len(windows) if not args.teacher_seqs else min(args.teacher_seqs, len(windows))
    teacher = load_model("smollm2").to(torch.bfloat16)
    shard = args.shard_seqs
    t0 = time.time()
    done = 0
    for s in range(0, n_max, shard):
        path = teacher_shards(args, args.teacher_data).replace("*", f"{s // shard:05d}")
        if os.path.exists(path):
            done = min(s + shard, n_max)
            continue
        if args.teacher_minutes and time.time() - t0 > 60 * args.teacher_minutes:
            break
        x = torch.from_numpy(windows[s:min(s + shard, n_max)])
        idx, lp = [], []
        with torch.inference_mode():
            for b in range(0, len(x), args.teacher_batch):
                logits = teacher(x[b:b + args.teacher_batch]).logits.float()
                v, i = torch.log_softmax(logits, -1).topk(args.topk, -1)
                idx.append(i.to(torch.int32))
                lp.append(v.to(torch.float16))
        tmp = path + ".tmp.npz"
        np.savez(tmp, ids=x.numpy().astype(np.int32), idx=torch.cat(idx).numpy().astype(np.uint16),
                 lp=torch.cat(lp).numpy())
        os.replace(tmp, path)
        done = min(s + shard, n_max)
        el = time.time() - t0
        log(f"teacher: {done}/{n_max} windows cached ({done * SEQ_LEN} tokens), {el:.0f}s")
    return {"teacher_data": args.teacher_data, "teacher_windows": done, "teacher_tokens": done * SEQ_LEN,
            "teacher_seconds": time.time() - t0, "teacher_dtype": "bfloat16", "topk": args.topk}


def load_teacher_cache(args, data: str, max_seqs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    paths = sorted(p for p in glob.glob(teacher_shards(args, data)) if not p.endswith(".tmp.npz"))
    if max_seqs:
        paths = paths[: math.ceil(max_seqs / args.shard_seqs)]
    if not paths:
        raise SystemExit(f"no {data} teacher cache in {args.cache_dir}: run --phase teacher --teacher-data {data}")
    parts = [np.load(p) for p in paths]
    ids = np.concatenate([p["ids"] for p in parts]).astype(np.int64)
    idx = np.concatenate([p["idx"] for p in parts]).astype(np.int64)
    lp = np.concatenate([p["lp"] for p in parts]).astype(np.float32)
    if max_seqs:
        ids, idx, lp = ids[:max_seqs], idx[:max_seqs], lp[:max_seqs]
    return ids, idx, lp


def make_student(args):
    from transformers import LlamaForCausalLM
    from smartspec.models import load_model

    teacher = load_model("smollm2")
    cfg = student_config(teacher.config, args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate)
    torch.manual_seed(args.seed)
    student = LlamaForCausalLM(cfg)
    with torch.no_grad():
        student.model.embed_tokens.weight.copy_(svd_embedding(teacher.model.embed_tokens.weight, args.hidden))
        # final-norm gain so that initial logits have unit scale (rows of the projected
        # embedding are long; without this the first loss is ~35 nats)
        rownorm = student.model.embed_tokens.weight.norm(dim=1).pow(2).mean().sqrt()
        student.model.norm.weight.fill_(1.0 / float(rownorm))
    student.tie_weights()
    del teacher
    return student


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
    total = sched or steps or 10 ** 9
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
        set_lr(opt, lr_at(step, total if total < 10 ** 9 else 10 ** 6, lr, args.warmup))
        loss, metrics = batch_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        v = loss.item()
        ema = v if ema is None else 0.98 * ema + 0.02 * v
        step += 1
        if step % args.log_every == 0 or step == 1:
            log(f"{name}: step {step}/{total if total < 10 ** 9 else '?'} loss {v:.3f} ema {ema:.3f} "
                + " ".join(f"{k} {x:.3f}" for k, x in metrics.items()) + f" {time.time() - t0:.0f}s")
            hist.append({"step": step, "loss": v, "ema": ema, **metrics, "seconds": time.time() - t0})
    return {f"{name}_steps": step, f"{name}_schedule_steps": total if total < 10 ** 9 else None, f"{name}_tokens": step * args.batch * SEQ_LEN,
            f"{name}_seconds": time.time() - t0, f"{name}_history": hist, f"{name}_final_ema": ema}


def phase_pretrain(args, tok) -> dict:
    windows = train_windows(tok, args.seed, args.cache_dir)
    student = make_student(args)
    g = torch.Generator().manual_seed(args.seed + 1)
    order = torch.randperm(len(windows), generator=g)
    cv = CandidateVocab(torch.from_numpy(windows).reshape(-1), student.config.vocab_size, args.negatives, args.seed)

    def batch_fn(step):
        sel = [(step * args.batch + j) % len(windows) for j in range(args.batch)]
        x = torch.from_numpy(windows[order[sel].numpy()])
        cand, pos = cv.sample(step)
        logits = cand_logits(student, x[:, :-1], cand)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), pos[x[:, 1:]].reshape(-1))
        return loss, {}

    info = run_loop(args, student, "pretrain", args.pretrain_steps, args.pretrain_minutes, args.lr, batch_fn,
                    args.pretrain_sched)
    torch.save(student.state_dict(), os.path.join(args.cache_dir, f"pretrain_seed{args.seed}.pt"))
    return info


def phase_distill(args, tok) -> tuple[dict, torch.nn.Module]:
    caches = [load_teacher_cache(args, data, args.teacher_seqs if data == "stdlib" else 0)
              for data in args.distill_data.split(",")]
    ids, idx, lp = (np.concatenate([c[i] for c in caches]) for i in range(3))
    log(f"distill: {len(ids)} cached windows ({len(ids) * SEQ_LEN} tokens) from {args.distill_data}")
    student = make_student(args)
    ck = os.path.join(args.cache_dir, f"pretrain_seed{args.seed}.pt")
    if args.init_from:
        student.load_state_dict(load_draft_state(args.init_from))
        student.tie_weights()
        log(f"distill: starting from {args.init_from}")
    elif os.path.exists(ck) and not args.no_pretrain:
        student.load_state_dict(torch.load(ck))
        student.tie_weights()
        log(f"distill: starting from {ck}")
    g = torch.Generator().manual_seed(args.seed + 2)
    order = torch.randperm(len(ids), generator=g)
    windows = train_windows(tok, args.seed, args.cache_dir)
    active = torch.cat([torch.from_numpy(windows).reshape(-1), torch.from_numpy(ids).reshape(-1),
                        torch.from_numpy(idx).reshape(-1)])
    cv = CandidateVocab(active, student.config.vocab_size, args.negatives, args.seed + 7)
    log(f"distill: {len(cv.active)} active tokens + {args.negatives} sampled negatives per step")

    def batch_fn(step):
        sel = order[[(step * args.batch + j) % len(ids) for j in range(args.batch)]].numpy()
        x = torch.from_numpy(ids[sel])
        cand, pos = cv.sample(step)
        ti = pos[torch.from_numpy(idx[sel])]       # B x T x k teacher top-k ids (candidate positions)
        tp = torch.softmax(torch.from_numpy(lp[sel]), -1)  # renormalised top-k probs
        logp = torch.log_softmax(cand_logits(student, x, cand).float(), -1)
        s_topk = logp.gather(-1, ti)  # B x T x k
        soft = -(tp * s_topk).sum(-1).mean()
        hard = -s_topk[..., 0].mean()  # teacher argmax
        loss = soft + args.argmax_weight * hard
        agree = (logp.argmax(-1) == ti[..., 0]).float().mean().item()
        return loss, {"soft": soft.item(), "hard": hard.item(), "agree": agree}

    info = run_loop(args, student, "distill", args.distill_steps, args.distill_minutes, args.distill_lr, batch_fn,
                    args.distill_sched)
    info["distill_cached_windows"] = int(len(ids))
    info["distill_data"] = args.distill_data
    info["distill_init_from"] = args.init_from
    return info, student


def load_draft_state(path: str) -> dict:
    """A saved draft's weights in float32 (for continuing its training)."""
    from transformers import AutoModelForCausalLM

    return {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def save(student, out: str) -> None:
    from smartspec.models import load_tokenizer

    os.makedirs(out, exist_ok=True)
    student.eval()
    student.to(torch.float16).save_pretrained(out, safe_serialization=True)
    load_tokenizer("smollm2").save_pretrained(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", default="proposer_svc/models/smollm2-draft")
    ap.add_argument("--cache-dir", default="/tmp/smartspec-draft-cache")
    ap.add_argument("--phase", choices=["all", "generate", "teacher", "pretrain", "distill"], default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    # budgets (0 = unlimited); whichever of steps/minutes ends first stops a phase
    ap.add_argument("--teacher-seqs", type=int, default=0, help="number of 256-token windows to cache")
    ap.add_argument("--teacher-minutes", type=float, default=25.0)
    ap.add_argument("--pretrain-steps", type=int, default=0)
    ap.add_argument("--pretrain-minutes", type=float, default=25.0)
    ap.add_argument("--distill-steps", type=int, default=0)
    ap.add_argument("--distill-minutes", type=float, default=18.0)
    ap.add_argument("--pretrain-sched", type=int, default=0, help="cosine schedule length (default: steps)")
    ap.add_argument("--distill-sched", type=int, default=0, help="cosine schedule length (default: steps)")
    ap.add_argument("--no-pretrain", action="store_true", help="distill from the SVD initialisation")
    ap.add_argument("--init-from", default="", help="distill starting from this saved draft (continued training)")
    ap.add_argument("--generate-minutes", type=float, default=20.0)
    ap.add_argument("--generate-batches", type=int, default=0, help="number of prompt batches to decode")
    ap.add_argument("--generate-batch", type=int, default=32)
    ap.add_argument("--generate-new-tokens", type=int, default=96)
    ap.add_argument("--teacher-data", choices=["stdlib", "selfgen"], default="stdlib",
                    help="windows the teacher phase caches: stdlib sources or SmolLM2's own continuations")
    ap.add_argument("--distill-data", default="stdlib", help="comma-separated teacher caches to distil from")
    # model
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1024)
    # optimisation
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--emb-lr-scale", type=float, default=0.3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--argmax-weight", type=float, default=0.5)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--negatives", type=int, default=4096, help="sampled non-data tokens per step")
    ap.add_argument("--teacher-batch", type=int, default=4)
    ap.add_argument("--shard-seqs", type=int, default=32)
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    os.makedirs(args.cache_dir, exist_ok=True)
    from smartspec.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    t0 = time.time()
    info: dict = {"command": " ".join([os.path.basename(sys.executable), "-m", "proposer_svc.train_draft"] + sys.argv[1:]),
                  "args": vars(args), "torch": torch.__version__}
    name = f"teacher_{args.teacher_data}" if args.phase == "teacher" and args.teacher_data != "stdlib" else args.phase
    logpath = os.path.join(args.cache_dir, f"log_{name}_seed{args.seed}.json")
    if args.phase == "generate":
        info.update(phase_generate(args, tok))
    if args.phase in ("all", "teacher"):
        info.update(phase_teacher(args, tok))
    if args.phase in ("all", "pretrain"):
        info.update(phase_pretrain(args, tok))
    if args.phase in ("all", "distill"):
        d, student = phase_distill(args, tok)
        info.update(d)
        # merge the logs of separately run phases
        for ph in ("teacher", "pretrain", "generate", "teacher_selfgen"):
            p = os.path.join(args.cache_dir, f"log_{ph}_seed{args.seed}.json")
            if os.path.exists(p):
                with open(p) as fh:
                    info.setdefault("phase_logs", {})[ph] = json.load(fh)
        previous = os.path.join(args.init_from, "training_log.json")
        if args.init_from and os.path.exists(previous):  # the training the run continued, before it is replaced
            with open(previous) as fh:
                info["init_from_training_log"] = json.load(fh)
        info["n_params"] = sum(p.numel() for p in student.parameters())
        info["wall_seconds_this_process"] = time.time() - t0
        save(student, args.output_dir)
        with open(os.path.join(args.output_dir, "training_log.json"), "w") as fh:
            json.dump(info, fh, indent=1)
        log(f"saved {args.output_dir} ({info['n_params']} params)")
    info["wall_seconds_this_process"] = time.time() - t0
    with open(logpath, "w") as fh:
        json.dump(info, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
