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

    python -m training.train_draft --phase all

A second stage distils further from SmolLM2's own output (``training/selfgen.py``):

4. ``generate``: SmolLM2 decodes prompts made from the training files (code completions
   and chat requests about their functions) greedily; the sequences are packed into
   windows (``--generate-batches`` repeats a run);
5. ``teacher --teacher-data selfgen``: the teacher's top-k over those windows;
6. ``distill --init-from DIR --distill-data stdlib,selfgen``: continues a saved draft on
   both caches.

The model card (``drafting/models/smollm2-draft/README.md``) lists the exact commands.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from training.data import SEQ_LEN, read, stdlib_files, train_windows
from training.student import CandidateVocab, cand_logits, log, run_loop, student_config, svd_embedding
from training.teacher import load_teacher_cache, phase_teacher, selfgen_path


def phase_generate(args, tok) -> dict:
    """SmolLM2 (bfloat16) decodes prompts made from the training files greedily; packed windows are cached."""
    from runtime.models import load_model
    from training import selfgen

    model = load_model("smollm2").to(torch.bfloat16)
    prompt_ids = selfgen.prompts(tok, [read(f) for f in stdlib_files()[0]], args.seed)
    log(f"generate: {len(prompt_ids)} prompts")
    t0 = time.time()
    seqs, done = selfgen.generate_all(
        model,
        tok,
        prompt_ids,
        args.generate_new_tokens,
        args.generate_batch,
        args.generate_minutes,
        max_batches=args.generate_batches,
        log=log,
    )
    windows = selfgen.pack(seqs, tok.eos_token_id, SEQ_LEN)
    np.save(selfgen_path(args), windows)
    return {
        "generate_sequences": len(seqs),
        "generate_batches": done,
        "generate_tokens": sum(map(len, seqs)),
        "generate_windows": len(windows),
        "generate_seconds": time.time() - t0,
        "generate_dtype": "bfloat16",
    }


def make_student(args):
    from transformers import LlamaForCausalLM

    from runtime.models import load_model

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

    info = run_loop(
        args, student, "pretrain", args.pretrain_steps, args.pretrain_minutes, args.lr, batch_fn, args.pretrain_sched
    )
    torch.save(student.state_dict(), os.path.join(args.cache_dir, f"pretrain_seed{args.seed}.pt"))
    return info


def phase_distill(args, tok) -> tuple[dict, torch.nn.Module]:
    caches = [
        load_teacher_cache(args, data, args.teacher_seqs if data == "stdlib" else 0)
        for data in args.distill_data.split(",")
    ]
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
    active = torch.cat(
        [torch.from_numpy(windows).reshape(-1), torch.from_numpy(ids).reshape(-1), torch.from_numpy(idx).reshape(-1)]
    )
    cv = CandidateVocab(active, student.config.vocab_size, args.negatives, args.seed + 7)
    log(f"distill: {len(cv.active)} active tokens + {args.negatives} sampled negatives per step")

    def batch_fn(step):
        sel = order[[(step * args.batch + j) % len(ids) for j in range(args.batch)]].numpy()
        x = torch.from_numpy(ids[sel])
        cand, pos = cv.sample(step)
        ti = pos[torch.from_numpy(idx[sel])]  # B x T x k teacher top-k ids (candidate positions)
        tp = torch.softmax(torch.from_numpy(lp[sel]), -1)  # renormalised top-k probs
        logp = torch.log_softmax(cand_logits(student, x, cand).float(), -1)
        s_topk = logp.gather(-1, ti)  # B x T x k
        soft = -(tp * s_topk).sum(-1).mean()
        hard = -s_topk[..., 0].mean()  # teacher argmax
        loss = soft + args.argmax_weight * hard
        agree = (logp.argmax(-1) == ti[..., 0]).float().mean().item()
        return loss, {"soft": soft.item(), "hard": hard.item(), "agree": agree}

    info = run_loop(
        args,
        student,
        "distill",
        args.distill_steps,
        args.distill_minutes,
        args.distill_lr,
        batch_fn,
        args.distill_sched,
    )
    info["distill_cached_windows"] = int(len(ids))
    info["distill_data"] = args.distill_data
    info["distill_init_from"] = args.init_from
    return info, student


def load_draft_state(path: str) -> dict:
    """A saved draft's weights in float32 (for continuing its training)."""
    from transformers import AutoModelForCausalLM

    return {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def save(student, out: str) -> None:
    from runtime.models import load_tokenizer

    os.makedirs(out, exist_ok=True)
    student.eval()
    student.to(torch.float16).save_pretrained(out, safe_serialization=True)
    load_tokenizer("smollm2").save_pretrained(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", default="drafting/models/smollm2-draft")
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
    ap.add_argument(
        "--teacher-data",
        choices=["stdlib", "selfgen"],
        default="stdlib",
        help="windows the teacher phase caches: stdlib sources or SmolLM2's own continuations",
    )
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
    from runtime.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    t0 = time.time()
    info: dict = {
        "command": " ".join([os.path.basename(sys.executable), "-m", "training.train_draft"] + sys.argv[1:]),
        "args": vars(args),
        "torch": torch.__version__,
    }
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
