"""The teacher phase: SmolLM2's top-k log-probabilities over the training windows, cached in shards."""

from __future__ import annotations

import glob
import math
import os
import time

import numpy as np
import torch

from training.data import SEQ_LEN, train_windows
from training.student import log


def selfgen_path(args) -> str:
    return os.path.join(args.cache_dir, f"selfgen_windows_seed{args.seed}.npy")


def teacher_windows(args, tok, data: str) -> np.ndarray:
    return np.load(selfgen_path(args)) if data == "selfgen" else train_windows(tok, args.seed, args.cache_dir)


def teacher_shards(args, data: str) -> str:
    """Glob of the teacher cache of one data set (the stdlib's keeps its original name)."""
    prefix = "teacher" if data == "stdlib" else f"teacher_{data}"
    return os.path.join(args.cache_dir, f"{prefix}_seed{args.seed}_k{args.topk}_*.npz")


def phase_teacher(args, tok) -> dict:
    from runtime.models import load_model

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
        x = torch.from_numpy(windows[s : min(s + shard, n_max)])
        idx, lp = [], []
        with torch.inference_mode():
            for b in range(0, len(x), args.teacher_batch):
                logits = teacher(x[b : b + args.teacher_batch]).logits.float()
                v, i = torch.log_softmax(logits, -1).topk(args.topk, -1)
                idx.append(i.to(torch.int32))
                lp.append(v.to(torch.float16))
        tmp = path + ".tmp.npz"
        np.savez(
            tmp, ids=x.numpy().astype(np.int32), idx=torch.cat(idx).numpy().astype(np.uint16), lp=torch.cat(lp).numpy()
        )
        os.replace(tmp, path)
        done = min(s + shard, n_max)
        el = time.time() - t0
        log(f"teacher: {done}/{n_max} windows cached ({done * SEQ_LEN} tokens), {el:.0f}s")
    return {
        "teacher_data": args.teacher_data,
        "teacher_windows": done,
        "teacher_tokens": done * SEQ_LEN,
        "teacher_seconds": time.time() - t0,
        "teacher_dtype": "bfloat16",
        "topk": args.topk,
    }


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
