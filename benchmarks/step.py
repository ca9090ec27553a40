"""Step benchmark: one PAPO update step of a random-init Qwen2.5-VL, our loss vs the eager loss.

    python -m benchmarks.step                          # tiny model on CPU (train/tiny.py)
    python -m benchmarks.step --model tiny-32k         # tiny trunk, 32k vocabulary (head-heavy)
    python -m benchmarks.step --model 3b --max-batch   # on a GPU (gpu_session.sh step)

A step is what the trainer does per micro-batch with estimator "exact" and
masked_view "current_no_grad" (PAPOConfig preset papo-g-nref-7b): the trunk with grad on the
original image, the trunk without grad on the masked image, the loss on the completion tokens'
hidden states, backward, and an AdamW step. The two sides differ only in the loss:

    ours   papo.PAPOLoss (papo_kernels' fused two-view loss, no [tokens x vocab] logits);
    eager  lm_head on both views' hidden states -> fp32 logits -> log_softmax, entropies,
           KL(pi_masked || pi_theta) -> papo.papo_loss (what TRL-style code does).

Both sides share one model and optimizer and alternate step by step (interleaved timing).
Reported per side: step time (median of >= 3), completion tokens per second (tokens of one
view), peak memory and the step's extra memory over the state it starts from (CPU: own
process, peak RSS; CUDA: max_memory_allocated), the first step's loss (the sides must agree),
and on CUDA with --max-batch the largest micro-batch (sequences) that fits and the throughput
there. The 3B shape runs only on GPU: its weights, gradients and AdamW states exceed the CPU
machines' memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import _harness as H
from benchmarks.loss import render_document
from benchmarks.step_report import plot_section


@dataclass(frozen=True)
class StepModel:
    """A model shape plus the geometry of one sequence and the equal batch."""

    name: str
    spec: dict  # train.tiny.TinyModelSpec fields
    device: str
    dtype: str
    prompt_tokens: int  # text tokens around the image
    image_grid: int  # the image is image_grid x image_grid patches (merged 2x2 into tokens)
    completion_tokens: int
    batch: int  # sequences of the equal-batch comparison
    grad_checkpointing: bool = False
    note: str = ""

    @property
    def sequence_tokens(self) -> int:
        return self.prompt_tokens + self.image_grid**2 // 4 + 2 + self.completion_tokens


MODELS: dict[str, StepModel] = {
    m.name: m
    for m in (
        StepModel("tiny", {}, "cpu", "float32", 16, 8, 64, 4,
                  note="train/tiny.py defaults (hidden 64, 2 layers, vocab 526)"),
        StepModel("tiny-32k", dict(vocab_size=32768 - 14, hidden_size=256, intermediate_size=512,
                                   num_heads=4, num_kv_heads=2),
                  "cpu", "float32", 16, 8, 256, 4,
                  note="tiny trunk (hidden 256, 2 layers) with a 32k vocabulary: the head dominates"),
        StepModel("3b", dict(vocab_size=151936 - 14, hidden_size=2048, intermediate_size=11008,
                             num_layers=36, num_heads=16, num_kv_heads=2, vision_depth=32,
                             vision_hidden_size=1280, vision_heads=16, tie_word_embeddings=True),
                  "cuda", "bfloat16", 64, 32, 1024, 4, grad_checkpointing=True,
                  note="Qwen2.5-VL-3B shape (36 layers, hidden 2048, vocab 151,936, tied head; "
                       "vision MLP 2x width and one full-attention block, as train/tiny.py builds), "
                       "bf16 weights, gradient checkpointing"),
        StepModel("7b-short", dict(vocab_size=152064 - 14, hidden_size=3584, intermediate_size=18944,
                                   num_layers=4, num_heads=28, num_kv_heads=4, vision_depth=4,
                                   vision_hidden_size=1280, vision_heads=16, tie_word_embeddings=False),
                  "cuda", "bfloat16", 64, 32, 1024, 4, grad_checkpointing=True,
                  note="Qwen2.5-VL-7B layer and head shapes (hidden 3584, MLP 18944, vocab 152,064, untied "
                       "head) with the trunk SHORTENED to 4 of 28 text layers and 4 of 32 vision blocks, so "
                       "that it builds and runs in a short GPU window: the head's share of memory and time "
                       "is larger than in the real 7B; bf16 weights, gradient checkpointing"),
        StepModel("tiny-gpu", {}, "cuda", "bfloat16", 16, 8, 64, 4, note="GPU smoke shape"),
    )
}

SIDES = ("ours", "eager")


# ---------------------------------------------------------------- model and batch


class _Ids:
    """The two tokenizer methods train.tiny.build_model needs, for any vocabulary size: the
    BPE ids first, then Qwen's special tokens in Qwen's order (as train.tiny lays them out)."""

    def __init__(self, bpe_size: int):
        from train.tiny import QWEN_SPECIAL_TOKENS

        self.bpe_size, self.special = bpe_size, QWEN_SPECIAL_TOKENS

    def __len__(self) -> int:
        return self.bpe_size + len(self.special)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.bpe_size + self.special.index(token)


def build_policy(m: StepModel, device: str):
    from train.tiny import TinyModelSpec, build_model

    spec = TinyModelSpec(**m.spec)
    dtype = getattr(torch, m.dtype)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_model(_Ids(spec.vocab_size), spec)
    finally:
        torch.set_default_dtype(prev)
    model.to(device=device, dtype=dtype)
    if m.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def make_batch(model, m: StepModel, batch: int, device: str, seed: int = 0) -> dict:
    """B sequences of [text, <vision_start>, image pads, <vision_end>, text, completion], random
    pixels for the original view and the same pixels with 60% of the patches blackened."""
    cfg, vc = model.config, model.config.vision_config
    g = torch.Generator(device="cpu").manual_seed(seed)
    text_vocab = cfg.text_config.vocab_size - 14  # BPE ids; Qwen's 14 special tokens follow
    n_img = m.image_grid**2 // vc.spatial_merge_size**2
    L, C = m.sequence_tokens, m.completion_tokens
    ids = torch.randint(0, text_vocab, (batch, L), generator=g)
    p0 = m.prompt_tokens // 2
    ids[:, p0] = cfg.vision_start_token_id
    ids[:, p0 + 1:p0 + 1 + n_img] = cfg.image_token_id
    ids[:, p0 + 1 + n_img] = cfg.vision_end_token_id
    patches = batch * m.image_grid**2
    feat = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    dtype = next(model.parameters()).dtype
    pix = torch.randn(patches, feat, generator=g)
    masked = pix.clone()
    masked[torch.rand(patches, generator=g) < 0.6] = pix.min()  # blackened patches
    P = L - C
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch, L, dtype=torch.long, device=device),
        "pixel_values": pix.to(device=device, dtype=dtype),
        "masked_pixel_values": masked.to(device=device, dtype=dtype),
        "image_grid_thw": torch.tensor([[1, m.image_grid, m.image_grid]] * batch, device=device),
        "completion_ids": ids[:, P:].to(device),
        "completion_mask": torch.ones(batch, C, dtype=torch.bool, device=device),
        "advantages": torch.randn(batch, generator=g).to(device),
        "start": P - 1,  # hidden[:, P-1+t] predicts completion token t
    }


def _trunk(model, b: dict, masked: bool) -> torch.Tensor:
    out = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      pixel_values=b["masked_pixel_values" if masked else "pixel_values"],
                      image_grid_thw=b["image_grid_thw"])
    C = b["completion_ids"].shape[1]
    return out.last_hidden_state[:, b["start"]:b["start"] + C]


def eager_loss(config, hidden, masked_hidden, weight, b):
    """TRL-style: materialized fp32 logits of both views, then papo_loss on the statistics."""
    from papo import papo_loss

    t = config.temperature
    lp = (hidden @ weight.T).float().div(t).log_softmax(-1)
    # the masked view is detached (current_no_grad): a constant distribution, no dW through it
    lpm = (masked_hidden @ weight.detach().T).float().div(t).log_softmax(-1)
    logp = lp.gather(-1, b["completion_ids"].long().unsqueeze(-1)).squeeze(-1)
    p, pm = lp.exp(), lpm.exp()
    entropy = -(p * lp).sum(-1)
    masked_entropy = -(pm * lpm).sum(-1)
    kl = (pm * (lpm - lp)).sum(-1)  # KL(pi_masked || pi_theta), masked view detached
    return papo_loss(logp, None, b["advantages"], b["completion_mask"], config=config,
                     entropy=entropy, masked_entropy=masked_entropy, kl_prcp=kl,
                     num_micro_batches=1)


class Stepper:
    """One model, one AdamW, the PAPO config; `step(side, batch)` runs one update."""

    def __init__(self, m: StepModel, device: str, backend: str):
        from papo import PAPOConfig, PAPOLoss

        self.m, self.device = m, device
        self.model = build_policy(m, device)
        self.config = PAPOConfig.from_preset("papo-g-nref-7b", estimator="exact",
                                             masked_view="current_no_grad")
        self.papo = PAPOLoss(self.config, backend=backend)
        try:  # fused AdamW: no foreach temporaries the size of the model
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-6, fused=True)
        except (RuntimeError, TypeError, ValueError):
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-6)
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self, side: str, b: dict, update: bool = True) -> float:
        """One micro-batch: forward both views, loss, backward, AdamW (unless update=False)."""
        self.opt.zero_grad(set_to_none=True)
        hidden = _trunk(self.model, b, masked=False)
        with torch.no_grad():
            masked_hidden = _trunk(self.model, b, masked=True)
        weight = self.model.lm_head.weight
        if side == "ours":
            out = self.papo(hidden, weight, b["completion_ids"], b["completion_mask"], b["advantages"],
                            masked_hidden=masked_hidden, num_micro_batches=1)
        else:
            out = eager_loss(self.config, hidden, masked_hidden, weight, b)
        out.loss.backward()
        if update:
            self.opt.step()
        return float(out.loss.detach())


# ---------------------------------------------------------------- measurements


def _cpu_side(payload: dict) -> dict:
    """Isolated CPU measurement of one side: warm-up step, then one step's peak RSS."""
    m = MODELS[payload["model"]]
    torch.manual_seed(0)
    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    st = Stepper(m, "cpu", payload["backend"])
    b = make_batch(st.model, m, payload["batch"], "cpu")
    loss0 = st.step(payload["side"], b, update=False)  # at the initial weights, as in-process
    st.step(payload["side"], b)  # warm-up: allocates the AdamW states
    st.opt.zero_grad(set_to_none=True)
    H.release_cpu_memory()
    start = H.rss_bytes()
    H.reset_peak_rss()
    t0 = time.perf_counter()
    st.step(payload["side"], b)
    seconds = time.perf_counter() - t0
    peak = H.peak_rss_bytes()
    return {"status": "ok", "peak_bytes": peak, "extra_bytes": peak - start, "seconds": seconds,
            "first_loss": loss0}


def _measure_cuda(st: Stepper, side: str, b: dict) -> dict:
    st.opt.zero_grad(set_to_none=True)
    H.release_cuda_memory()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    st.step(side, b)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    st.opt.zero_grad(set_to_none=True)
    return {"peak_bytes": peak, "extra_bytes": peak - start}


def _row(m: StepModel, side: str, batch: int, kind: str) -> dict:
    return {"model": m.name, "side": side, "kind": kind, "batch": batch,
            "completion_tokens": batch * m.completion_tokens, "sequence_tokens": batch * m.sequence_tokens,
            "device": m.device, "dtype": m.dtype, "status": "pending", "reason": "", "time": {},
            "samples": [], "tokens_per_s": None, "peak_mb": None, "extra_mb": None,
            "first_loss": None, "max_batch": "gpu-only" if m.device == "cpu" else None}


def _time_interleaved(st: Stepper, rows: dict[str, dict], batches: dict[str, dict], reps: int,
                      deadline: H.Deadline, reserve: float) -> None:
    sides = [s for s in rows if rows[s]["status"] == "running"]
    for rep in range(reps):
        if deadline.expired(reserve):
            for s in sides:
                rows[s]["reason"] = f"{rep} of {reps} repetitions (time budget)"
            break
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            try:
                rows[side]["samples"].append(H.time_once(lambda: st.step(side, batches[side]), st.device))
            except Exception as exc:  # noqa: BLE001
                rows[side]["status"] = "oom" if H.is_oom(exc) else "error"
                rows[side]["reason"] = f"{type(exc).__name__}: {exc}"[:300]
                sides.remove(side)
                if st.device == "cuda":
                    st.opt.zero_grad(set_to_none=True)
                    H.release_cuda_memory()
        _log(f"{st.m.name} rep {rep + 1}/{reps}: " + ", ".join(
            f"{s} B={rows[s]['batch']} {rows[s]['samples'][-1]:.3f}s" for s in sides if rows[s]["samples"]))
    for row in rows.values():
        if row["status"] == "running":
            row["status"] = "ok" if row["samples"] else "skipped"
        if row["samples"]:
            row["time"] = H.summarize(row["samples"])
            row["tokens_per_s"] = row["completion_tokens"] / row["time"]["median"]


def run_model(m: StepModel, args, deadline: H.Deadline, info: dict) -> list[dict]:
    device = m.device
    rows = {s: _row(m, s, args.batch or m.batch, "equal batch") for s in args.sides}
    # Memory: CPU, each side in its own process.
    if device == "cpu" and not args.no_isolate:
        for side, row in rows.items():
            res = H.run_isolated("benchmarks.step", {"worker": True, "model": m.name, "side": side,
                                                     "batch": row["batch"], "backend": args.backend,
                                                     "threads": args.threads}, args.isolate_timeout)
            if res["status"] == "ok":
                row.update(peak_mb=res["peak_bytes"] / H.MB, extra_mb=res["extra_bytes"] / H.MB,
                           first_loss=res["first_loss"])
            else:
                row["status"], row["reason"] = res["status"], res.get("reason", "")
            _log(f"{m.name} memory {side}: {'ok' if row['status'] == 'pending' else row['status']} "
                 f"peak {H.fmt(row['peak_mb'])} MB "
                 f"extra {H.fmt(row['extra_mb'])} MB {row['reason']}")
    torch.manual_seed(0)
    st = Stepper(m, device, args.backend)
    info["params"] = st.params
    batches = {}
    for side, row in rows.items():  # the loss of both sides at the same initial weights
        if row["status"] != "pending":
            continue
        try:
            batches[side] = make_batch(st.model, m, row["batch"], device)
            row["first_loss"] = st.step(side, batches[side], update=False)
        except Exception as exc:  # noqa: BLE001
            row["status"] = "oom" if H.is_oom(exc) else "error"
            row["reason"] = f"{type(exc).__name__}: {exc}"[:300]
            st.opt.zero_grad(set_to_none=True)
    for side, row in rows.items():
        if row["status"] != "pending":
            continue
        try:
            st.step(side, batches[side])  # warm-up (AdamW states, JIT)
            if device == "cuda":
                mem = _measure_cuda(st, side, batches[side])
                row.update(peak_mb=mem["peak_bytes"] / H.MB, extra_mb=mem["extra_bytes"] / H.MB)
            row["status"] = "running"
        except Exception as exc:  # noqa: BLE001
            row["status"] = "oom" if H.is_oom(exc) else "error"
            row["reason"] = f"{type(exc).__name__}: {exc}"[:300]
            if device == "cuda":
                st.opt.zero_grad(set_to_none=True)
                H.release_cuda_memory()
    _time_interleaved(st, rows, batches, args.reps, deadline, args.reserve_s)
    out = list(rows.values())
    if args.max_batch:
        out += _max_batch(st, m, args, deadline, batches)
    return out


def _max_batch(st: Stepper, m: StepModel, args, deadline: H.Deadline, batches: dict) -> list[dict]:
    """Largest micro-batch per side (binary search on OOM; CPU only with a simulated capacity),
    then the step time and throughput of each side at its own largest micro-batch."""
    if m.device == "cpu" and not args.simulated_capacity_mb:
        return []
    batches.clear()
    results = {}
    for side in args.sides:
        def fits(B: int, side=side) -> bool:
            if m.device == "cpu":
                res = H.run_isolated("benchmarks.step", {"worker": True, "model": m.name, "side": side,
                                                         "batch": B, "backend": args.backend,
                                                         "threads": args.threads}, args.isolate_timeout)
                return res["status"] == "ok" and res["peak_bytes"] <= args.simulated_capacity_mb * H.MB
            b = None
            try:
                b = make_batch(st.model, m, B, "cuda")
                st.step(side, b)
                torch.cuda.synchronize()
                return True
            except Exception as exc:  # noqa: BLE001
                if not H.is_oom(exc):
                    print(f"[bench] max-batch {side} B={B}: {type(exc).__name__}: {exc}", file=sys.stderr)
                return False
            finally:
                del b
                st.opt.zero_grad(set_to_none=True)
                H.release_cuda_memory() if m.device == "cuda" else H.release_cpu_memory()

        t0 = time.perf_counter()
        res = H.search_max_tokens(fits, start=args.batch or m.batch, limit=args.max_batch_limit, granule=1,
                                  deadline=deadline, reserve=args.reserve_s + 60)
        results[side] = res
        _log(f"{m.name} max batch {side}: {res} ({time.perf_counter() - t0:.0f} s)")
    rows = {}
    for side, res in results.items():
        B = res["max_tokens"]
        row = _row(m, side, B or 0, "largest micro-batch")
        row["max_batch"] = B if res["bound"] == "exact" else (f">= {B}" if B else None)
        if not B:
            row["status"], row["reason"] = "skipped", "no batch fits (or time budget)"
        elif m.device == "cpu":
            row["status"], row["reason"] = "skipped", "simulated capacity: search only"
        else:
            try:
                batches[side] = make_batch(st.model, m, B, "cuda")
                mem = _measure_cuda(st, side, batches[side])
                row.update(peak_mb=mem["peak_bytes"] / H.MB, extra_mb=mem["extra_bytes"] / H.MB,
                           status="running")
            except Exception as exc:  # noqa: BLE001
                row["status"], row["reason"] = ("oom" if H.is_oom(exc) else "error"), str(exc)[:300]
                H.release_cuda_memory()
        rows[side] = row
    if any(r["status"] == "running" for r in rows.values()):
        _time_interleaved(st, rows, batches, max(3, args.reps // 2), deadline, args.reserve_s)
    return list(rows.values())


# ---------------------------------------------------------------- CLI


def _log(msg: str) -> None:
    print(f"[step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help=f"comma-separated, from {', '.join(MODELS)} "
                    "(default: 3b on CUDA, tiny otherwise)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per micro-batch (equal batch)")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--backend", default="auto", help="papo_kernels backend of the 'ours' side")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-batch", action="store_true", help="search each side's largest micro-batch")
    ap.add_argument("--max-batch-limit", type=int, default=512)
    ap.add_argument("--simulated-capacity-mb", type=float, default=None,
                    help="CPU dry runs: the memory a 'device' has, for --max-batch")
    ap.add_argument("--time-budget-s", type=float, default=None)
    ap.add_argument("--reserve-s", type=float, default=20.0)
    ap.add_argument("--no-isolate", action="store_true")
    ap.add_argument("--isolate-timeout", type=float, default=600.0)
    ap.add_argument("--section", default="step",
                    help="name of this run's section in the results file (one per GPU session stage)")
    ap.add_argument("--out-dir", type=Path, default=H.RESULTS_DIR)
    ap.add_argument("--mirror-dir", type=Path, default=None)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    args.sides = [s for s in args.sides.split(",") if s]
    for s in args.sides:
        if s not in SIDES:
            raise SystemExit(f"unknown side {s!r}; known: {SIDES}")
    return args


def main(argv=None) -> list[dict]:
    if argv is None and len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        return _worker(json.loads(sys.argv[1]))
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = (args.model or ("3b" if torch.cuda.is_available() else "tiny")).split(",")
    models = []
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        if MODELS[name].device == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"model {name} runs only on CUDA (none visible)")
        models.append(MODELS[name])
    device = models[0].device
    deadline = H.Deadline(args.time_budget_s)
    env = H.environment(device)
    section = {"command": "python -m benchmarks.step " + " ".join(sys.argv[1:] if argv is None else argv),
               "device": device, "reps": args.reps, "rows": [], "models": {}, "partial": True}
    t_start = time.perf_counter()

    def save(final=False):
        section["partial"] = not final
        section["wall_s"] = round(time.perf_counter() - t_start, 1)
        if not args.no_write:
            paths = H.save_section(args.section, section, env, args.out_dir, render_document, plot_section,
                                   args.mirror_dir)
            if final:
                _log("wrote " + ", ".join(str(p) for p in paths.values()))

    for m in models:
        if deadline.expired(args.reserve_s):
            section["budget_reached"] = f"before {m.name}"
            break
        section["models"][m.name] = {"sequence_tokens": m.sequence_tokens,
                                     "completion_tokens": m.completion_tokens, "dtype": m.dtype,
                                     "device": m.device, "note": m.note}
        try:
            section["rows"] += run_model(m, args, deadline, section["models"][m.name])
        except Exception:  # noqa: BLE001
            _log(f"{m.name} failed:\n{traceback.format_exc()}")
        save()
    save(final=True)
    for r in section["rows"]:
        print(f"{r['model']:9s} {r['side']:6s} B={r['batch']:<4d} {r['kind']:20s} {r['status']:8s} "
              f"t={H.fmt(r['time'].get('median')):>7s}s tok/s={H.fmt(r['tokens_per_s']):>7s} "
              f"peak={H.fmt(r['peak_mb']):>7s}MB extra={H.fmt(r['extra_mb']):>7s}MB "
              f"loss0={H.fmt(r['first_loss'])} max={r['max_batch']} {r['reason'][:60]}")
    return section["rows"]


def _worker(payload: dict) -> list:
    try:
        out = _cpu_side(payload)
    except Exception as exc:  # noqa: BLE001
        out = {"status": "oom" if H.is_oom(exc) else "error", "reason": f"{type(exc).__name__}: {exc}"[:400]}
    print(json.dumps(out), flush=True)
    return []


if __name__ == "__main__":
    main()
