"""Static GPU check without a GPU: every default launch config of every Triton kernel the
workspace path (and the in-register forward kept for comparison) uses compiles for sm_90a and
sm_80 with no register spill, no local memory, shared memory within the architecture's limit,
the instructions we count on in its SASS: every tl.dot on tensor cores (wgmma, `HGMMA`, on
sm_90a; `HMMA` on sm_80) for half inputs, and 16-byte loads of the fp32 logits in the
memory-bound epilogues.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` builds PTX and a cubin on a
CPU-only machine; the ptxas shipped inside the triton package, run with -v, reports registers,
spills and barriers; Triton's own metadata gives the dynamic shared memory, its cuobjdump the
SASS. Each kernel is compiled in its heaviest variant (two views, every upstream gradient,
T != 1) for bf16 and fp32 inputs, with the integer arguments divisible by 16 as Triton
specializes them at the real shapes (H 3584, V 152,064, chunks of 384 rows). The compile runs in
a subprocess without TRITON_INTERPRET (the test process has the interpreter on). Run
`python tests/test_triton_static.py` for the table alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

# Opt-in shared memory per block: sm_90 227 KB, sm_80 163 KB.
SMEM_LIMIT = {90: 232_448, 80: 166_912}
ARCHS = {90: "sm_90a", 80: "sm_80"}

# Pointer arguments in fp32 unless named here; None = the argument is absent (a None pointer).
_HIDDEN_PTRS = {"HA", "HB", "W"}
# Integer arguments spelled in capitals (shapes); every other capitalized argument is a pointer.
_INT_ARGS = {"N", "V", "H", "SPLITS"}


def _variants():
    """Every kernel the workspace path and the in-register forward use, in its heaviest variant
    (two views, every upstream gradient, T != 1): (label, kernel, config name, dtype, pointer
    dtypes other than fp32, absent (None) pointers, constexprs). The statistics and combine
    kernels read fp32 logits whatever the input dtype, so they are compiled once."""
    from papo_kernels.kernels import grad_workspace, stats_combine, stats_inregister, stats_workspace

    finals = {"LOGP_A", "ENT_A", "LSE_A", "LOGP_B", "ENT_B", "LSE_B", "KL_AB", "KL_BA"}
    out = [
        ("workspace_stats/split", stats_workspace._workspace_stats_kernel, "workspace_stats", "fp32",
         {}, finals, dict(TEMPERATURE=0.7, LANE_SUMS=True)),
        ("workspace_stats", stats_workspace._workspace_stats_kernel, "workspace_stats", "fp32",
         {}, {"PART"}, dict(TEMPERATURE=0.7, LANE_SUMS=True)),
        ("workspace_stats_v1", stats_workspace._workspace_stats_kernel, "workspace_stats_v1", "fp32",
         {}, {"PART"}, dict(TEMPERATURE=0.7, LANE_SUMS=False)),
        ("stats_combine", stats_combine._stats_combine_kernel, "stats_combine", "fp32",
         {}, set(), dict(TWO_VIEW=True)),
    ]
    for dtype in ("bf16", "fp32"):
        common = dict(TEMPERATURE=0.7, UPCAST=False, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
        out += [
            # dZ of the workspace is written in the GEMM (= input) dtype on GPUs
            ("workspace_dz", grad_workspace._workspace_dz_kernel, "workspace_dz", dtype,
             {"DZA": dtype, "DZB": dtype}, set(), dict(TEMPERATURE=0.7)),
            ("inregister_stats", stats_inregister._inregister_stats_kernel, "inregister_stats", dtype,
             {}, {"PART"}, common),
            ("inregister_stats/split", stats_inregister._inregister_stats_kernel, "inregister_stats", dtype,
             {}, finals, common),
        ]
    return out


def _ptxas_report(ptx: str, arch: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    cc = int(re.sub(r"\D", "", arch))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(cc).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o",
               os.path.join(tmp, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr

    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return dict(
        registers=num(r"Used (\d+) registers"),
        spill_stores=num(r"(\d+) bytes spill stores"),
        spill_loads=num(r"(\d+) bytes spill loads"),
        stack=num(r"(\d+) bytes stack frame"),
        static_smem=num(r"(\d+) bytes smem"),
        barriers=num(r"used (\d+) barriers"),
    )


def compile_variant(variant, cc: int, cfg) -> dict:
    """Compile one kernel variant with launch config `cfg` for compute capability `cc`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label, kernel, _, dtype, ptr_dtypes, absent, consts = variant
    heuristics = getattr(kernel, "values", {})
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # unwrap triton.heuristics
    block = dict(BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_D=cfg.BLOCK_D)
    args = {}
    for p in fn.params:
        name = p.name
        if name in consts:
            args[name] = consts[name]
        elif name in block and p.is_constexpr:
            args[name] = block[name]
        elif p.is_constexpr:
            args[name] = None  # filled by a heuristic below
        elif name[0].isupper() and name not in _INT_ARGS:
            args[name] = None if name in absent else "ptr"
        else:
            args[name] = "int"
    for name, heur in heuristics.items():
        args[name] = heur(dict(args))
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name, value = p.name, args[p.name]
        if p.is_constexpr or value is None:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif value == "ptr":
            ty = ptr_dtypes.get(name, dtype if name in _HIDDEN_PTRS else "fp32")
            signature[name] = "*i64" if name == "TARGETS" else f"*{ty}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name.startswith("stride") or name in ("N", "V", "H"):
                attrs[(i,)] = [["tt.divisibility", 16]]  # H = 3584, V = 152,064, C = 384
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    rep = _ptxas_report(ck.asm["ptx"], ARCHS[cc])
    sass = ck.asm["sass"]
    rep.update(kernel=label, dtype=dtype, arch=ARCHS[cc], shared=int(ck.metadata.shared),
               config=f"{cfg.BLOCK_N}x{cfg.BLOCK_V}x{cfg.BLOCK_D} w{cfg.num_warps} s{cfg.num_stages}",
               dots=len(re.findall(r"\btt\.dot\b", ck.asm["ttir"])),
               wgmma_dots=len(re.findall(r"\bttng\.warp_group_dot\b", ck.asm["ttgir"])),
               hgmma=len(re.findall(r"\bHGMMA\b", sass)), hmma=len(re.findall(r"\bHMMA\b", sass)),
               ldg128=len(re.findall(r"\bLDG\.E\.128\b", sass)),
               local=len(re.findall(r"\b(?:LDL|STL)\b", sass)))
    return rep


def compile_all() -> list[dict]:
    """Compile every variant with its default config for every architecture."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    from papo_kernels.kernels import _config

    results = []
    for variant in _variants():
        cfg_name, dtype = variant[2], variant[3]
        for cc in ARCHS:
            family = "sm90" if cc >= 90 else "sm80"
            cfg = _config.DEFAULT_CONFIGS[f"{family}/{'fp32' if dtype == 'fp32' else 'half'}"][cfg_name]
            results.append(compile_variant(variant, cc, cfg))
    return results


def _table(results) -> str:
    lines = [f"{'kernel':24} {'dtype':5} {'arch':7} {'config':20} {'regs':>4} {'spill':>5} {'smem':>7} "
             f"{'dots':>4} {'wgmma':>5} {'HGMMA':>5} {'HMMA':>5} {'LDG128':>6}"]
    for r in results:
        lines.append(f"{r['kernel']:24} {r['dtype']:5} {r['arch']:7} {r['config']:20} {r['registers']:4d} "
                     f"{r['spill_stores'] + r['spill_loads']:5d} {r['shared']:7d} {r['dots']:4d} "
                     f"{r['wgmma_dots']:5d} {r['hgmma']:5d} {r['hmma']:5d} {r['ldg128']:6d}")
    return "\n".join(lines)


# Kernels whose hot loop streams the fp32 logit workspace: their loads must be 16 bytes wide.
_STREAMING = ("workspace_stats", "workspace_stats/split", "workspace_stats_v1", "workspace_dz")


def test_default_configs_compile_for_sm90a_and_sm80_without_spills():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print("\n" + _table(results))
    assert len(results) == len(ARCHS) * len(_variants())
    for r in results:
        where = f"{r['kernel']} {r['dtype']} {r['arch']} ({r['config']})"
        assert r["registers"] > 0, f"{where}: no ptxas report"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where}: register spills {r}"
        assert r["stack"] == 0 and r["local"] == 0, f"{where}: local memory (stack {r['stack']} B)"
        cc = 90 if r["arch"] == "sm_90a" else 80
        assert r["shared"] + r["static_smem"] <= SMEM_LIMIT[cc], f"{where}: shared memory {r['shared']} B"
        if r["dtype"] == "bf16" and r["dots"]:  # half dots belong on tensor cores
            if cc == 90:
                assert r["wgmma_dots"] == r["dots"], f"{where}: {r['dots'] - r['wgmma_dots']} dots not wgmma"
                assert r["hgmma"] > 0, f"{where}: no HGMMA in the SASS"
            else:
                assert r["hmma"] > 0, f"{where}: no HMMA in the SASS"
        if r["kernel"] in _STREAMING:
            assert r["ldg128"] > 0, f"{where}: no 16-byte loads of the logits"


if __name__ == "__main__":
    res = compile_all()
    if "--json" in sys.argv:
        print(json.dumps(res))
    else:
        print(_table(res))
