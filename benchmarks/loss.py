"""Loss benchmark: our vocabulary kernels against every peer, same inputs, one run.

    python -m benchmarks.loss                         # the CPU acceptance run (shape "cpu")
    python -m benchmarks.loss --shape cpu-tiny --reps 3
    python -m benchmarks.loss --shape gpu-7b --max-tokens   # on a GPU (gpu_session.sh loss)

For each workload (providers.py: two_view fwd_bwd, token_stats fwd_bwd, token_stats fwd) and
token count: extra memory per provider (on CPU each in its own process), then >= `--reps`
repetitions interleaved across providers (the order rotates every round), median and spread,
TFLOP/s on the 6HV-per-token-and-view basis, ratios to `floor` and to the best peer that
computes the same outputs, and a check of loss and gradients against our torch backend. On
CUDA, `--max-tokens` adds the largest token count that fits per provider (binary search on
OOM). A provider that cannot run becomes a cell with its reason, never a crash. Results are
rewritten after every workload to results/<device>-<date>.{json,md} (+ a PNG).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks import _harness as H
from benchmarks import providers as P
from benchmarks.shapes import get_shape
from benchmarks.step_report import render_section as render_step_section

REFERENCE_PROVIDERS = ("torch:fused", "torch:stats", "eager")


# ---------------------------------------------------------------- one workload


def _cell(op, mode, shape, n, name, args) -> dict:
    prov = P.PROVIDERS[name]
    head = shape.head
    return {
        "op": op, "mode": mode, "shape": shape.name, "head": head.name, "hidden": head.hidden,
        "vocab": head.vocab, "tokens": n, "dtype": shape.dtype, "device": shape.device,
        "b_requires_grad": not args.detached_b, "provider": name, "kind": prov.kind,
        "outputs": prov.outputs, "note": prov.note, "status": "pending", "reason": "",
        "time": {}, "samples": [], "tflops": None, "extra_mb": None, "dw_acc_mb": None,
        "extra_beyond_dw_mb": None, "vs_floor": None, "vs_best_peer": None, "best_peer": None,
        "vs_fastest_peer": None, "check": None, "plan": None,
        "max_tokens": "gpu-only" if shape.device == "cpu" else None,
    }


def _fail(cell: dict, exc: BaseException) -> None:
    cell["status"] = "oom" if H.is_oom(exc) else "error"
    cell["reason"] = f"{type(exc).__name__}: {exc}"[:300]


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom if denom > 0 else 1.0)


def _snapshot(inp: P.Inputs, out) -> list[torch.Tensor]:
    """What the check compares: the loss and every gradient (fwd_bwd), or the outputs (fwd)."""
    if inp.mode == "fwd":
        return [o.detach().float().clone() for o in out]
    return [out.detach().float().clone()] + [t.grad.detach().clone() for t in inp.grad_leaves]


class _Checker:
    """Relative error of each provider's loss and gradients (or outputs) against the first
    reference provider seen (REFERENCE_PROVIDERS order); "n/a" where outputs differ."""

    def __init__(self, op: str):
        self.op, self.ref, self.ref_name, self.pending = op, None, None, []

    def add(self, cell: dict, inp: P.Inputs, out) -> None:
        prov = P.PROVIDERS[cell["provider"]]
        if prov.kind == "floor" or not P.outputs_match(prov, self.op):
            cell["check"] = "n/a"
            return
        snap = _snapshot(inp, out)
        if self.ref is None and cell["provider"] in REFERENCE_PROVIDERS:
            self.ref, self.ref_name, cell["check"] = snap, cell["provider"], "reference"
            for c, s in self.pending:
                self._compare(c, s)
            self.pending = []
        elif self.ref is not None:
            self._compare(cell, snap)
        else:  # the reference has not run yet (it runs first in the first repetition)
            cell["check"] = "no reference"
            self.pending.append((cell, snap))

    def _compare(self, cell: dict, snap: list[torch.Tensor]) -> None:
        cell["check"] = max(_rel_err(x, r) for x, r in zip(snap, self.ref))
        cell["check_against"] = self.ref_name


def _memory_isolated(cell: dict, args) -> None:
    payload = {k: cell[k] for k in ("op", "mode", "hidden", "vocab", "dtype", "provider",
                                    "b_requires_grad")}
    payload.update(n=cell["tokens"], threads=args.threads, opts=_opts(args))
    res = H.run_isolated("benchmarks._memory_worker", payload, timeout=args.isolate_timeout)
    if res["status"] == "ok":
        cell["extra_mb"] = res["extra_bytes"] / H.MB
        cell["first_call_s"] = res["seconds"]
    else:
        cell["status"] = res["status"]
        cell["reason"] = res.get("reason", "")


def _opts(args) -> dict:
    return {"chunk_tokens": args.chunk_tokens} if args.chunk_tokens else {}


def run_workload(op: str, mode: str, shape, n: int, names: list[str], args,
                 deadline: H.Deadline) -> list[dict]:
    device = shape.device
    cells = {name: _cell(op, mode, shape, n, name, args) for name in names
             if (op, mode) in P.PROVIDERS[name].workloads}
    if not cells:
        return []
    head = shape.head
    flops = P.useful_flops(op, mode, n, head.hidden, head.vocab, not args.detached_b)
    tag = f"{op}/{mode} N={n} H={head.hidden} V={head.vocab} {shape.dtype}"

    # Availability first (a package, a GPU, a built backend), on tiny inputs, in this process.
    probe = P.make_inputs(op, mode, 8, 8, 64, getattr(torch, shape.dtype), device)
    for name, cell in cells.items():
        try:
            P.build(name, probe, _opts(args))
        except P.Unavailable as exc:
            cell["status"], cell["reason"] = "unavailable", str(exc)
        except Exception:  # noqa: BLE001 - it fails again, with its reason, when built for real
            pass
    del probe

    # Phase 1 (CPU): each provider's extra memory in its own process.
    if device == "cpu" and not args.no_isolate:
        for name, cell in cells.items():
            if cell["status"] != "pending":
                continue
            if deadline.expired(args.reserve_s):
                cell["status"], cell["reason"] = "skipped", "time budget"
                continue
            t0 = time.perf_counter()
            _memory_isolated(cell, args)
            _log(f"{tag} memory {name}: {'ok' if cell['status'] == 'pending' else cell['status']} "
                 f"{H.fmt(cell['extra_mb'])} MB ({time.perf_counter() - t0:.1f} s) {cell['reason']}")

    # Phase 2: one process, all providers on the same inputs.
    dtype = getattr(torch, shape.dtype)
    if device == "cuda":
        H.release_cuda_memory()
    inp = P.make_inputs(op, mode, n, head.hidden, head.vocab, dtype, device,
                        b_requires_grad=not args.detached_b)
    fns, checker = {}, _Checker(op)
    order = sorted(cells, key=lambda k: (k not in REFERENCE_PROVIDERS, REFERENCE_PROVIDERS.index(k)
                                         if k in REFERENCE_PROVIDERS else 0))
    # A full warm-up call where a first call differs from the rest: on CUDA (handles, caching
    # allocator, autotuning) and for providers that compile for the shape. The others, on CPU,
    # only run on a few rows here (imports, lazy initialization), and their check is taken on
    # the first timed call: a CPU call of theirs allocates and touches fresh memory every time.
    small = P.make_inputs(op, mode, min(n, 64), head.hidden, head.vocab, dtype, device,
                          b_requires_grad=not args.detached_b, seed=1) if device == "cpu" else None
    for name in order:
        cell = cells[name]
        if cell["status"] not in ("pending",):
            continue
        if deadline.expired(args.reserve_s):
            cell["status"], cell["reason"] = "skipped", "time budget"
            continue
        try:
            fn = P.build(name, inp, _opts(args))
        except P.Unavailable as exc:
            cell["status"], cell["reason"] = "unavailable", str(exc)
            continue
        except Exception as exc:  # noqa: BLE001
            _fail(cell, exc)
            continue
        try:
            inp.zero_grads()
            if device == "cuda" or P.PROVIDERS[name].needs_warmup:
                out = fn()
                H.sync(device)
                checker.add(cell, inp, out)
                del out
                inp.zero_grads()
            else:
                P.build(name, small, _opts(args))()
                small.zero_grads()
            if device == "cuda":
                _cuda_memory(cell, fn, inp)
        except Exception as exc:  # noqa: BLE001
            _fail(cell, exc)
            inp.zero_grads()
            if device == "cuda":
                H.release_cuda_memory()
            continue
        fns[name] = fn
        cell["status"] = "running"
        cell["plan"] = P.describe(name, inp, _opts(args))
    del small

    # Phase 3: interleaved repetitions; the provider order rotates every round.
    active = [k for k in order if k in fns]
    for rep in range(args.reps):
        if deadline.expired(args.reserve_s):
            for k in active:
                cells[k]["reason"] = f"{rep} of {args.reps} repetitions (time budget)"
            break
        rot = active[rep % len(active):] + active[:rep % len(active)] if active else []
        for name in rot:
            if name not in fns:
                continue
            inp.zero_grads()
            try:
                seconds, out = H.time_once(fns[name], device, keep=True)
                cells[name]["samples"].append(seconds)
                if cells[name]["check"] is None:  # first timed call of a provider not warmed up
                    checker.add(cells[name], inp, out)
                del out
            except Exception as exc:  # noqa: BLE001
                _fail(cells[name], exc)
                fns.pop(name)
                if device == "cuda":
                    H.release_cuda_memory()
        inp.zero_grads()
        _log(f"{tag} rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{k} {cells[k]['samples'][-1]:.3f}s" for k in rot if k in fns and cells[k]["samples"]))

    for name, cell in cells.items():
        if cell["status"] == "running":
            cell["status"] = "ok" if cell["samples"] else "skipped"
        if cell["samples"]:
            cell["time"] = H.summarize(cell["samples"])
            cell["tflops"] = flops / cell["time"]["median"] / 1e12
        if cell["kind"] == "ours" and cell["status"] == "ok":
            acc = P.dw_accumulator_bytes(inp) / H.MB
            cell["dw_acc_mb"] = acc
            if cell["extra_mb"] is not None:
                cell["extra_beyond_dw_mb"] = cell["extra_mb"] - acc
    fns.clear()
    del inp
    if device == "cuda":
        H.release_cuda_memory()
    _ratios(list(cells.values()))
    return list(cells.values())


def _cuda_memory(cell: dict, fn, inp: P.Inputs) -> None:
    """extra = max_memory_allocated of one call - (resident now + one gradient per input)."""
    H.release_cuda_memory()
    base = torch.cuda.memory_allocated() + P.grad_bytes(inp)
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    cell["extra_mb"] = (torch.cuda.max_memory_allocated() - base) / H.MB
    inp.zero_grads()
    H.release_cuda_memory()


def _ratios(cells: list[dict]) -> None:
    ok = [c for c in cells if c["status"] == "ok" and c["time"]]
    med = {c["provider"]: c["time"]["median"] for c in ok}
    floor = med.get("floor")
    same = [c for c in ok if c["kind"] == "peer" and P.outputs_match(P.PROVIDERS[c["provider"]], c["op"])]
    anyp = [c for c in ok if c["kind"] == "peer"]
    best = min(same, key=lambda c: c["time"]["median"]) if same else None
    fastest = min(anyp, key=lambda c: c["time"]["median"]) if anyp else None
    for c in ok:
        t = c["time"]["median"]
        c["vs_floor"] = t / floor if floor else None
        if best is not None:
            c["vs_best_peer"], c["best_peer"] = t / best["time"]["median"], best["provider"]
        if fastest is not None:
            c["vs_fastest_peer"] = t / fastest["time"]["median"]
            c["fastest_peer"] = fastest["provider"]


# ---------------------------------------------------------------- largest micro-batch


def slow_providers(cells: list[dict], n: int, limit: float) -> dict[str, float]:
    """Providers whose time at N=`n` exceeds `limit` x the GEMM floor in some workload: their
    worst ratio. Slow paths are measured once, at the headline N, and then not again, so a
    time-boxed GPU run covers the other token counts with the paths worth comparing."""
    worst: dict[str, float] = {}
    for c in cells:  # the floor and the accuracy reference always stay: later ratios and checks need them
        if c["tokens"] == n and c["status"] == "ok" and c["vs_floor"] is not None \
                and c.get("kind") != "floor" and c["provider"] != REFERENCE_PROVIDERS[0]:
            worst[c["provider"]] = max(worst.get(c["provider"], 0.0), c["vs_floor"])
    return {k: v for k, v in worst.items() if v > limit}


def search_max_tokens(shape, names: list[str], args, deadline: H.Deadline, cells: list[dict]) -> None:
    """Per provider, the largest N (two_view fwd_bwd) that fits: OOM-driven on CUDA; on CPU only
    with --simulated-capacity-mb (dry runs), where a run fits if inputs + grads + extra do."""
    op, mode = "two_view", "fwd_bwd"
    head, dtype = shape.head, getattr(torch, shape.dtype)
    if shape.device == "cpu" and not args.simulated_capacity_mb:
        return
    wanted = names if args.max_tokens_providers == "all" else args.max_tokens_providers.split(",")
    for name in [k for k in wanted if k in names] + [k for k in names if k not in wanted]:
        if (op, mode) not in P.PROVIDERS[name].workloads or P.PROVIDERS[name].kind == "floor":
            continue
        mine = [c for c in cells if c["provider"] == name and c["op"] == op and c["mode"] == mode]
        if not mine or all(c["status"] not in ("ok", "oom", "search") for c in mine):
            continue
        if name not in wanted:
            for c in mine:
                c["max_tokens"] = "not searched"
            continue
        if deadline.expired(args.reserve_s + min(60.0, args.max_tokens_budget_s)):
            for c in mine:
                c["max_tokens"] = "skipped (time budget)"
            continue
        budget = H.Deadline(min(deadline.left() - args.reserve_s, args.max_tokens_budget_s))

        def fits(n: int, name=name) -> bool:
            if shape.device == "cpu":
                payload = {"op": op, "mode": mode, "n": n, "hidden": head.hidden,
                           "vocab": head.vocab, "dtype": shape.dtype, "provider": name,
                           "b_requires_grad": not args.detached_b, "threads": args.threads,
                           "opts": _opts(args)}
                res = H.run_isolated("benchmarks._memory_worker", payload, args.isolate_timeout)
                if res["status"] != "ok":
                    return False
                need = res["inputs_bytes"] + res["grad_bytes"] + res["extra_bytes"]
                return need <= args.simulated_capacity_mb * H.MB
            inp = None
            try:
                H.release_cuda_memory()
                inp = P.make_inputs(op, mode, n, head.hidden, head.vocab, dtype, "cuda",
                                    b_requires_grad=not args.detached_b)
                P.build(name, inp, _opts(args))()
                torch.cuda.synchronize()
                return True
            except Exception as exc:  # noqa: BLE001
                if not H.is_oom(exc):
                    print(f"[bench] max-tokens {name} N={n}: {type(exc).__name__}: {exc}", file=sys.stderr)
                return False
            finally:
                del inp
                H.release_cuda_memory()

        t0 = time.perf_counter()
        granule = P.SEQ_LEN if shape.device == "cuda" else 64
        start = getattr(args, "search_start", None) or max(shape.tokens)
        res = H.search_max_tokens(fits, start=start, limit=args.max_tokens_limit,
                                  granule=granule, deadline=budget, reserve=0)
        value = res["max_tokens"]
        label = value if res["bound"] == "exact" else (f">= {value}" if value else "none (time budget)")
        for c in mine:
            c["max_tokens"] = label
        _log(f"max tokens {name}: {label} ({res['trials']} trials, {time.perf_counter() - t0:.0f} s)")


# ---------------------------------------------------------------- report


def _status_text(c: dict) -> str:
    if c["status"] == "ok":
        return c["reason"] or ""
    return f"{c['status']}: {c['reason']}" if c["reason"] else c["status"]


def _plan_text(plan: dict | None) -> str | None:
    """The Triton workspace plan of a cell, compact: chunk rows, ring rows x rings, dW GEMMs, MB."""
    if not plan:
        return None
    return (f"{plan['variant']}: C {plan['chunk']}, ring {plan['ring_rows']}x{plan['rings']}, "
            f"{plan['dw_gemms']} dW GEMMs, {plan['total_bytes'] / H.MB:.0f} MB")


def render_section(section: dict) -> str:
    cells = section.get("cells", [])
    peak = ("own process per provider, peak RSS" if section.get("device") == "cpu"
            else "max_memory_allocated")
    title = "Loss kernels" + (f", stage `{section['name']}`" if section.get("name", "loss") != "loss" else "")
    out = [f"## {title} (`python -m benchmarks.loss`)", "",
           f"Command: `{section.get('command', '')}`; {section.get('reps')} interleaved repetitions; "
           f"time = median wall seconds of one call (fwd, or fwd+bwd), spread = (max - min) / median; "
           f"TFLOP/s on the useful-FLOPs basis (2HV per token and view for the logits, +4HV per view "
           f"with grad); extra = peak - (inputs + one gradient per input) "
           f"({peak}); "
           f"fp32 dW acc = the fp32 accumulator of ours beyond W's own gradient (0 when W is fp32); "
           f"check = relative L2 error of loss and gradients (or outputs) vs `{REFERENCE_PROVIDERS[0]}`; "
           f"x best peer = time / the fastest peer computing the same outputs.", ""]
    if section.get("partial"):
        out += ["**Partial results** (the run was still going or was cut short).", ""]
    dropped = section.get("dropped")
    if dropped:
        slow = ", ".join(f"`{k}` ({v:.1f}x)" for k, v in dropped["providers"].items())
        out += [f"Measured at N={dropped['after_tokens']} only (slower than {dropped['limit_x_floor']}x the "
                f"GEMM floor there): {slow}.", ""]
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["shape"], c["op"], c["mode"], c["tokens"]), []).append(c)
    header = ["provider", "outputs", "time s", "spread", "TFLOP/s", "x floor", "x best peer",
              "extra MB", "fp32 dW acc MB", "max tokens", "check", "workspace", "status / note"]
    for (shape, op, mode, n), cs in groups.items():
        c0 = cs[0]
        b = "" if op != "two_view" else (
            " view b detached" if not c0["b_requires_grad"] else " both views with grad")
        out += [f"### {op} {mode}: N={n}, H={c0['hidden']}, V={c0['vocab']}, {c0['dtype']} "
                f"(head `{c0['head']}`, {c0['device']}{',' + b if b else ''})", ""]
        rows = []
        for c in cs:
            t = c["time"]
            chk = c["check"]
            rows.append([
                f"`{c['provider']}`", c["outputs"], t.get("median"),
                f"{100 * t['spread']:.0f}%" if t else None, c["tflops"], c["vs_floor"],
                c["vs_best_peer"], c["extra_mb"], c["dw_acc_mb"], c["max_tokens"],
                f"{chk:.1e}" if isinstance(chk, float) else chk, _plan_text(c.get("plan")), _status_text(c)])
        out.append(H.md_table(header, rows))
        best = next((c["best_peer"] for c in cs if c.get("best_peer")), None)
        if best:
            out += ["", f"Best same-outputs peer: `{best}`."]
        out.append("")
    notes = {c["provider"]: c["note"] for c in cells if c["note"]}
    if notes:
        out += ["Providers: " + "; ".join(f"`{k}`: {v}" for k, v in notes.items()) + "."]
    return "\n".join(out)


def _colors(plt) -> dict[str, tuple]:
    """Peers and the floor in fixed colors; ours in shades of blue (torch), green (triton) and
    teal (cpp)."""
    fixed = {"eager": "tab:red", "compile": "tab:orange", "liger": "tab:purple", "cce": "tab:brown",
             "verl": "tab:pink", "verl_torch": "tab:olive", "floor": "black"}
    shades = {"torch": plt.get_cmap("Blues"), "triton": plt.get_cmap("Greens"), "cpp": plt.get_cmap("PuBuGn")}
    out, seen = dict(fixed), {}
    for name, p in P.PROVIDERS.items():
        if p.kind == "ours":
            backend = name.split(":")[0]
            k = seen[backend] = seen.get(backend, -1) + 1
            out[name] = shades[backend](0.9 - 0.15 * k)
    return out


def plot_section(section: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cells = [c for c in section.get("cells", []) if c["status"] == "ok" and c["time"]]
    workloads = sorted({(c["op"], c["mode"], c["shape"]) for c in cells})
    if not workloads:
        return False
    color = _colors(plt)
    fig, axes = plt.subplots(len(workloads), 2, figsize=(12, 3.6 * len(workloads)), squeeze=False)
    for row, (op, mode, shape) in enumerate(workloads):
        cs = [c for c in cells if (c["op"], c["mode"], c["shape"]) == (op, mode, shape)]
        tokens = sorted({c["tokens"] for c in cs})
        names = list(dict.fromkeys(c["provider"] for c in cs))
        panels = (("time", "time per call (s)"), ("extra_mb", "extra memory (MB)"))
        for col, (key, label) in enumerate(panels):
            ax = axes[row][col]
            for name in names:
                pts = sorted((c["tokens"], c["time"]["median"] if key == "time" else c["extra_mb"])
                             for c in cs if c["provider"] == name)
                pts = [(x, y) for x, y in pts if y is not None]
                if not pts:
                    continue
                style = dict(color=color.get(name), label=name)
                if len(tokens) > 1:
                    dash = "-" if P.PROVIDERS[name].kind == "ours" else "--"
                    ax.plot(*zip(*pts), marker="o", linestyle=dash, **style)
                else:
                    ax.bar(name, pts[0][1], hatch="//" if P.PROVIDERS[name].kind == "ours" else None, **style)
            if len(tokens) > 1:
                ax.set_xscale("log", base=2)
                ax.set_xlabel("tokens per view")
                ax.set_yscale("log")
            else:
                ax.tick_params(axis="x", labelrotation=60, labelsize=7)
            ax.set_ylabel(label)
            ax.set_title(f"{op} {mode} ({shape}" + (f", N={tokens[0]}" if len(tokens) == 1 else "") + ")",
                         fontsize=9)
            ax.grid(alpha=0.3)
        if len(tokens) > 1:
            axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render_document(doc: dict) -> str:
    """Every section of a results document: "loss*" sections (one per GPU session stage) with
    this module's renderer, "step*" sections with the step benchmark's."""
    renderers = {}
    for key in doc:
        if key.startswith("loss"):
            renderers[key] = render_section
        elif key.startswith("step"):
            renderers[key] = render_step_section
    return H.render_document(doc, renderers)


def _csv_rows(cells: list[dict], env: dict) -> list[dict]:
    rows = []
    for c in cells:
        if c["status"] != "ok":
            continue
        cfg = json.dumps({k: c[k] for k in ("shape", "hidden", "vocab", "dtype", "b_requires_grad")})
        common = dict(kernel_name=c["op"], kernel_provider=c["provider"], gpu_name=env["device_name"],
                      x_name="N", x_label="tokens per view", x_value=c["tokens"],
                      extra_benchmark_config_str=cfg, timestamp=env["timestamp"],
                      kernel_operation_mode=c["mode"],
                      papo_kernels_version=env["versions"].get("papo_kernels"),
                      git_commit=env["git_commit"], device=env["device"])
        t = c["time"]
        rows.append(dict(common, metric_name="time", metric_unit="ms", y_value_50=1e3 * t["median"],
                         y_value_20=1e3 * t["p20"], y_value_80=1e3 * t["p80"]))
        if c["extra_mb"] is not None:
            rows.append(dict(common, metric_name="memory", metric_unit="MB", y_value_50=c["extra_mb"],
                             y_value_20=c["extra_mb"], y_value_80=c["extra_mb"]))
    return rows


def print_summary(cells: list[dict]) -> None:
    print()
    for c in cells:
        t = c["time"].get("median")
        print(f"{c['op']:11s} {c['mode']:7s} N={c['tokens']:<6d} {c['provider']:24s} "
              f"{c['status']:11s} t={H.fmt(t):>7s}s tf={H.fmt(c['tflops']):>6s} "
              f"xfloor={H.fmt(c['vs_floor']):>5s} xpeer={H.fmt(c['vs_best_peer']):>5s} "
              f"extra={H.fmt(c['extra_mb']):>7s}MB chk={H.fmt(c['check'])} {c['reason'][:70]}")


# ---------------------------------------------------------------- CLI


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default=None, help="shape name from benchmarks/shapes.py "
                    "(default: gpu-7b on CUDA, cpu otherwise)")
    ap.add_argument("--tokens", default=None, help="comma-separated N to run, in this order")
    ap.add_argument("--workloads", default=",".join(f"{o}/{m}" for o, m in P.WORKLOADS),
                    help="comma-separated op/mode")
    ap.add_argument("--providers", default="all", help="comma-separated provider names or 'all'")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (>= 5 for reports)")
    ap.add_argument("--detached-b", action="store_true", help="view b does not require grad")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="our fused calls' chunk rows")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--time-budget-s", type=float, default=None, help="stop starting new work after this")
    ap.add_argument("--reserve-s", type=float, default=20.0, help="budget kept for writing results")
    ap.add_argument("--no-isolate", action="store_true", help="CPU: skip the per-provider memory processes")
    ap.add_argument("--isolate-timeout", type=float, default=600.0)
    ap.add_argument("--drop-slower-than", type=float, default=0.0,
                    help="after the first N, leave out of later N (and of --max-tokens) every provider "
                         "slower than this many times the GEMM floor in any workload there (0: keep all)")
    ap.add_argument("--max-tokens", action="store_true", help="search the largest N per provider")
    ap.add_argument("--max-tokens-only", action="store_true",
                    help="only the largest-N search (two_view fwd_bwd), no timing: the first --tokens "
                         "value is where the search starts")
    ap.add_argument("--max-tokens-limit", type=int, default=1 << 18)
    ap.add_argument("--max-tokens-providers", default="all",
                    help="comma-separated, searched in this order, or 'all'")
    ap.add_argument("--max-tokens-budget-s", type=float, default=60.0, help="search time per provider")
    ap.add_argument("--simulated-capacity-mb", type=float, default=None,
                    help="CPU dry runs: the memory a 'device' has, for --max-tokens")
    ap.add_argument("--section", default="loss",
                    help="name of this run's section in the results file (one per GPU session stage)")
    ap.add_argument("--out-dir", type=Path, default=H.RESULTS_DIR)
    ap.add_argument("--mirror-dir", type=Path, default=None, help="copy result files here too ($OUT)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--csv", action="store_true", help="also append rows to results/loss.csv")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device_default = "gpu-7b" if torch.cuda.is_available() else "cpu"
    shape = get_shape(args.shape or device_default)
    if shape.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"shape {shape.name} needs CUDA; none is visible")
    tokens = [int(x) for x in args.tokens.split(",")] if args.tokens else list(shape.tokens)
    workloads = [tuple(w.split("/")) for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in P.OPS:
            raise SystemExit(f"unknown workload {'/'.join(w)}; known: {sorted('/'.join(o) for o in P.OPS)}")
    names = list(P.PROVIDERS) if args.providers == "all" else args.providers.split(",")
    for name in names:
        if name not in P.PROVIDERS:
            raise SystemExit(f"unknown provider {name!r}; known: {', '.join(P.PROVIDERS)}")
    deadline = H.Deadline(args.time_budget_s)
    env = H.environment(shape.device)
    section = {"command": "python -m benchmarks.loss " + " ".join(sys.argv[1:] if argv is None else argv),
               "device": shape.device, "shape": shape.name, "reps": args.reps, "cells": [],
               "partial": True, "started": env["timestamp"], "name": args.section}
    t_start = time.perf_counter()

    def save(final: bool = False):
        section["partial"] = not final
        section["wall_s"] = round(time.perf_counter() - t_start, 1)
        if args.no_write:
            return
        paths = H.save_section(args.section, section, env, args.out_dir, render_document, plot_section,
                               args.mirror_dir)
        if final:
            _log("wrote " + ", ".join(str(p) for p in paths.values()))

    if args.max_tokens_only:
        args.max_tokens, args.search_start = True, tokens[0]
        probe = P.make_inputs("two_view", "fwd_bwd", 8, 8, 64, getattr(torch, shape.dtype), shape.device)
        for name in names:
            p = P.PROVIDERS[name]
            if ("two_view", "fwd_bwd") in p.workloads and p.kind != "floor":
                cell = _cell("two_view", "fwd_bwd", shape, tokens[0], name, args)
                cell["status"], cell["reason"] = "search", "largest N only (--max-tokens-only)"
                try:  # a provider that cannot run here is a cell, not a search
                    P.build(name, probe, _opts(args))
                except P.Unavailable as exc:
                    cell["status"], cell["reason"] = "unavailable", str(exc)
                except Exception:  # noqa: BLE001 - the search reports it
                    pass
                section["cells"].append(cell)
        search_max_tokens(shape, names, args, deadline, section["cells"])
        tokens = []
    for i, n in enumerate(tokens):
        for op, mode in workloads:
            if deadline.expired(args.reserve_s):
                _log(f"time budget reached before {op}/{mode} N={n}")
                section["budget_reached"] = f"before {op}/{mode} N={n}"
                break
            try:
                section["cells"] += run_workload(op, mode, shape, n, names, args, deadline)
            except Exception:  # noqa: BLE001 - an input OOM must not lose earlier results
                _log(f"{op}/{mode} N={n} failed:\n{traceback.format_exc()}")
            save()
        if i == 0 and args.drop_slower_than > 0:
            dropped = slow_providers(section["cells"], n, args.drop_slower_than)
            if dropped:
                section["dropped"] = {"after_tokens": n, "limit_x_floor": args.drop_slower_than,
                                      "providers": dropped}
                names = [k for k in names if k not in dropped]
                _log("left out of later token counts: " + ", ".join(
                    f"{k} ({v:.1f}x floor)" for k, v in dropped.items()))
        if i == 0 and args.max_tokens:  # right after the first (headline) token count
            search_max_tokens(shape, names, args, deadline, section["cells"])
            save()
    save(final=True)
    if args.csv and not args.no_write:
        H.append_csv(args.out_dir / "loss.csv", _csv_rows(section["cells"], env))
    print_summary(section["cells"])
    return section["cells"]


if __name__ == "__main__":
    main()
