#!/usr/bin/env python3
"""Kernel benchmark: int4kit's fused int4 linear next to its peers, side by side in one process.

Peers (DESIGN.md, section Benchmarks):
  * int4kit      int4kit.ops.linear on a prepacked weight (what Int4Linear.forward calls on CPU)
  * int8 W8A16   int4kit.ops.linear_int8 on the weight quantized to int8 (Int8Linear on CPU)
  * F.linear     dense, weight in bf16 (x bf16) and in fp32 (x fp32)
  * torch int4   torch.ops.aten._weight_int4pack_mm_for_cpu on the *same* quantized weights

Shapes are K x N (K = in_features), M rows of activations, group size 128, asymmetric weights,
quantized from the weight in the row's dtype as a model in that dtype is: bf16 rows run on bf16
scales and zeros (for int4kit and torch int4 alike), fp32 rows on fp32 ones.
Two modes: "hot" reuses one weight on every call (it may sit in the 480 MiB L3), "cold" rotates
over enough copies of each implementation's weight that the set is > 1.1 GiB, so every call
streams its weight from DRAM. Each timing is the median of single calls (time.perf_counter) after
a warm-up, within a per-case time budget. On a shared 2-core machine absolute times are noise:
quote medians and ratios.

    python bench/bench_linear.py                       # hot + cold, bf16 + fp32, ~5 minutes
    python bench/bench_linear.py --quick --mode hot --shapes 4096x4096 --m 1 16
    python bench/bench_linear.py --json bench/results/linear.json --plot bench/results/linear.png
    python bench/bench_linear.py --cpu-class avx2        # a CPU without AVX-512, on this one
    python bench/bench_linear.py --plot-classes a.json b.json --plot classes.png  # per class

`run(...)` returns the result rows (dicts) and `format_table(rows)` renders them, for bench/demo.py.
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import int4kit
from int4kit import ops, reference

GiB = 1 << 30
DEFAULT_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (K, N)
DEFAULT_MS = (1, 16, 128)
COLD_BYTES = int(1.1 * GiB)       # each implementation's rotation set in cold mode exceeds this
COLD_MAX_COPIES = 256             # sanity cap (a 4096x4096 int4 weight is ~8.5 MB: 133 copies)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# --cpu-class: the environment that makes this machine measure a class of CPU it may be more than:
# int4kit's path and torch's oneDNN / MKL / own ATen kernels (the torch int4 peer is one of them)
# limited to the same instructions (they read these when they load, so the benchmark runs in a
# child process started with them)
CPU_CLASSES = {
    "amx": {"INT4KIT_CPU_ISA": "amx"},
    "avx512bf16": {"INT4KIT_CPU_ISA": "avx512bf16", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "avx512": {"INT4KIT_CPU_ISA": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
    "avx2": {"INT4KIT_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
IMPLS = ("int4kit", "int4kit_a8", "int8", "dense_bf16", "dense_fp32", "torch_int4")
PEERS = ("dense_bf16", "dense_fp32", "torch_int4")  # what int4kit (W4A16) is compared with
LABELS = {"int4kit": "int4kit", "int4kit_a8": "int4kit W4A8", "int8": "int4kit W8A16",
          "dense_bf16": "F.lin bf16",
          "dense_fp32": "F.lin fp32", "torch_int4": "torch int4"}


# ---- environment ----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "int4kit_cpu_isa": int4kit.cpu_isa(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "int4kit": int4kit.__version__,
            "cpu_class": next((c for c, env in CPU_CLASSES.items()
                               if all(os.environ.get(k) == v for k, v in env.items())), None),
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


def describe(env: dict) -> str:
    s = (f"date {env['date']} | CPU {env['cpu']} | torch threads {env['threads']} | "
         f"int4kit CPU path {env['int4kit_cpu_isa']} | torch {env['torch']} "
         f"(ATen kernels {env.get('torch_cpu_capability', '?')}) | "
         f"load avg {env['loadavg'][0]:.2f}")
    if "gpu" in env:
        s += f" | GPU {env['gpu']}"
    return s


# ---- weights for each implementation --------------------------------------------------------------

class Weights:
    """One random [N, K] weight, quantized (RTN, asymmetric) once per run dtype from the weight in
    that dtype: quantized[dt] = (qweight, scales, zeros), scales and zeros in dt."""

    def __init__(self, K: int, N: int, group_size: int, dtypes, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.K, self.N, self.G = K, N, group_size
        self.w = torch.randn(N, K, generator=g) * 0.02
        self.quantized = {dt: ops.quantize(self.w.to(DTYPES[dt]), group_size, False) for dt in dtypes}
        # the same weight as int8 (Int8Linear), per channel: the precision a mixed plan keeps
        # its sensitive layers at
        self.quantized8 = {dt: reference.quantize(self.w.to(DTYPES[dt]), -1, False, bits=8)
                           for dt in dtypes}
        # weight bytes int4kit's kernels read: its prepacked layout (codes, scales and zeros)
        self.int4_bytes = {dt: ops.prepacked_bytes(N, K, group_size, DTYPES[dt], "cpu") for dt in dtypes}

    def prepacked(self, dt: str) -> torch.Tensor:
        return ops.prepack(*self.quantized[dt], self.G, self.K)

    # torch's int4 CPU op: dequantized weight = (q - 8) * scale + zero, "zero" an additive float
    # offset, so int4kit's (q - z) * s becomes scale = s, zero = (8 - z) * s.
    def torch_int4_cpu(self, dt: str):
        qweight, scales, zeros = self.quantized[dt]
        codes = ops.unpack(qweight, self.K).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        offset = (8 - zeros.float()) * scales.float()
        scales_and_zeros = torch.stack([scales.float().t(), offset.t()], dim=-1)  # [K/G, N, 2]
        return packed, scales_and_zeros.contiguous().to(DTYPES[dt])


def nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(nbytes(o) for o in obj)
    if isinstance(obj, torch.nn.Module):
        return sum(nbytes(b) for b in obj.buffers()) + sum(nbytes(p) for p in obj.parameters())
    raise TypeError(type(obj))


def clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple):
        return tuple(clone(o) for o in obj)
    if isinstance(obj, torch.nn.Module):
        import copy
        return copy.deepcopy(obj)
    raise TypeError(type(obj))


def cpu_variants(W: Weights, dtypes):
    """name -> (build the weight object, call(x, weight) -> y).

    The int4 variants are named impl/dtype and run that dtype's rows on that dtype's quantized
    weight. The dense variants do not depend on the run's dtype: they are measured once per case
    and their time appears in both the bf16 and the fp32 rows."""
    K, N, G = W.K, W.N, W.G
    v = {
        "dense_bf16": (lambda: W.w.to(torch.bfloat16), lambda x, w: F.linear(x, w)),
        "dense_fp32": (lambda: W.w.clone(), lambda x, w: F.linear(x, w)),
    }
    for dt in dtypes:
        v[f"int4kit/{dt}"] = (lambda d=dt: W.prepacked(d), lambda x, p: ops.linear(x, p, N, K, G))
        v[f"int4kit_a8/{dt}"] = (lambda d=dt: W.prepacked(d),
                                 lambda x, p: ops.linear_w4a8(x, p, N, K, G))
        v[f"int8/{dt}"] = (lambda d=dt: ops.prepack_int8(*W.quantized8[d], -1),
                           lambda x, p: ops.linear_int8(x, p, N, K, -1))
        v[f"torch_int4/{dt}"] = (
            (lambda d=dt: W.torch_int4_cpu(d)),
            lambda x, pw: torch.ops.aten._weight_int4pack_mm_for_cpu(x, pw[0], G, pw[1]))
    return v


# ---- correctness check of every implementation's preparation ---------------------------------------

def rel_err(y, ref) -> float:
    ref = ref.double()
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def verify(dtypes=("bf16", "fp32"), K: int = 512, N: int = 256,
           group_size: int = 128, M: int = 8, log=print) -> dict:
    """Compares each implementation once against int4kit.reference.linear on a small shape."""
    W = Weights(K, N, group_size, dtypes, seed=1)
    g = torch.Generator().manual_seed(2)
    x64 = torch.randn(M, K, generator=g)
    tol = {"bf16": 3e-2, "fp32": 1e-4}
    variants = cpu_variants(W, dtypes)
    errs, problems = {}, []
    for dt in dtypes:
        x = x64.to(DTYPES[dt])
        for name in (f"int4kit/{dt}", f"torch_int4/{dt}", f"int8/{dt}"):
            if name not in variants:
                continue
            ref = (reference.linear(x, *W.quantized8[dt], -1, bits=8) if name.startswith("int8")
                   else reference.linear(x, *W.quantized[dt], group_size))
            build, call = variants[name]
            try:
                y = call(x, build())
                e = rel_err(y, ref)
            except Exception as exc:  # noqa: BLE001  (reported, the timing marks it n/a)
                e = float("nan")
                problems.append(f"{name} ({dt}) raised {type(exc).__name__}: {exc}")
            errs[f"{name.split('/')[0]}/{dt}"] = e
            if not e <= tol[dt]:
                problems.append(f"{name} ({dt}) relative error {e:.2e} > {tol[dt]:.0e}")
    log("check vs int4kit.reference.linear (K=%d N=%d M=%d, group %d): " % (K, N, M, group_size)
        + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    for p in problems:
        log(f"  WARNING: {p}")
    return {"errors": errs, "problems": problems}


# ---- timing -----------------------------------------------------------------------------------------

def time_calls(call, weights, x, budget_s, min_reps, max_reps, warmup):
    """Median seconds of single calls, rotating over `weights` (one entry: hot)."""
    n = len(weights)
    i = 0
    start = time.perf_counter()
    while i < warmup and (i == 0 or time.perf_counter() - start < budget_s):
        call(x, weights[i % n])
        i += 1
        first = time.perf_counter() - start
        if i == 1 and first > 2 * budget_s:
            # a single call outlasts the budget several times over (torch's int4 op with fp32 x
            # takes seconds): one-time costs are noise next to it, so that call is the timing
            time_calls.last_min = first
            return first, 1
        if i == 1 and first > budget_s:
            min_reps = 1
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        w = weights[i % n]
        i += 1
        t0 = time.perf_counter()
        call(x, w)
        times.append(time.perf_counter() - t0)
    time_calls.last_min = min(times)
    return statistics.median(times), len(times)


def _parse_shape(s):
    if isinstance(s, (tuple, list)):
        return int(s[0]), int(s[1])
    k, n = s.lower().split("x")
    return int(k), int(n)


def read_bandwidth_gbps(nbytes: int = GiB, reps: int = 7) -> float:
    """The machine's streaming read bandwidth as torch reaches it: the best of a few torch.sum
    passes over a buffer of twice the L3 size, so every pass reads from DRAM."""
    t = torch.ones(nbytes // 4, dtype=torch.float32)
    t.sum()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def run(modes=("hot", "cold"), shapes=DEFAULT_SHAPES, ms=DEFAULT_MS, dtypes=("bf16", "fp32"),
        quick=False, group_size=128, budget_s=None, cold_bytes=COLD_BYTES,
        check=True, log=print):
    """Runs the benchmark; returns one row (dict) per (mode, shape, M, dtype).

    A row holds ms[impl] (median milliseconds, None when the implementation is unavailable),
    ms_min[impl] (fastest call, a hint of the noise on a shared machine),
    reps[impl], copies[impl] (weights rotated over), weight_bytes and gbps (int4kit's int4 weight
    bytes over its time), speedup[peer] = peer ms / int4kit ms (> 1: int4kit is faster).
    """
    if isinstance(modes, str):
        modes = ("hot", "cold") if modes == "both" else (modes,)
    if isinstance(dtypes, str):
        dtypes = ("bf16", "fp32") if dtypes == "both" else (dtypes,)
    dtypes = tuple(dtypes)
    shapes = [_parse_shape(s) for s in shapes]
    if budget_s is None:
        budget_s = 0.25 if quick else 1.0
    min_reps, max_reps, warmup = (3, 50, 1) if quick else (3, 400, 2)
    if check:
        verify(dtypes, group_size=group_size, log=log)

    read_gbps = read_bandwidth_gbps() if "cold" in modes else None
    if read_gbps:
        log(f"read bandwidth (torch.sum over 1 GiB, best of 7): {read_gbps:.1f} GB/s")
    rows = []
    for mode in modes:
        for K, N in shapes:
            W = Weights(K, N, group_size, dtypes)
            variants = cpu_variants(W, dtypes)
            gen = torch.Generator().manual_seed(3)
            xs = {(M, dt): torch.randn(M, K, generator=gen).to(DTYPES[dt])
                  for M in ms for dt in dtypes}
            x32 = {M: xs[(M, dtypes[0])].float() for M in ms}
            results, copies, unavailable = {}, {}, {}
            for name, (build, call) in variants.items():
                try:
                    first = build()
                except Exception as exc:  # noqa: BLE001
                    unavailable[name] = f"{type(exc).__name__}: {exc}"
                    continue
                n = 1
                if mode == "cold":
                    n = min(COLD_MAX_COPIES, max(2, math.ceil(cold_bytes / nbytes(first))))
                weights = [first] + [clone(first) for _ in range(n - 1)]
                copies[name] = (n, nbytes(first))
                for M in ms:
                    if name.startswith("dense"):
                        runs = [(None, (x32[M] if name == "dense_fp32" else x32[M].bfloat16()))]
                    else:
                        dt = name.split("/")[1]
                        runs = [(dt, xs[(M, dt)])]
                    for dt, x in runs:
                        try:
                            with torch.inference_mode():
                                t, reps = time_calls(call, weights, x, budget_s, min_reps,
                                                     max_reps, warmup)
                            results[(name.split("/")[0], M, dt)] = (t, reps,
                                                                    time_calls.last_min)
                        except Exception as exc:  # noqa: BLE001
                            unavailable[name] = f"{type(exc).__name__}: {exc}"
                del weights, first
            for name, why in unavailable.items():
                log(f"  note: {name} unavailable for {K}x{N} ({why.splitlines()[0][:160]})")
            for M in ms:
                for dt in dtypes:
                    row = {"mode": mode, "K": K, "N": N, "M": M, "dtype": dt,
                           "group_size": group_size, "ms": {}, "ms_min": {}, "reps": {},
                           "copies": {}}
                    for impl in IMPLS:
                        key = (impl, M, None if impl.startswith("dense") else dt)
                        vname = impl if impl.startswith("dense") else f"{impl}/{dt}"
                        if key in results:
                            t, reps, tmin = results[key]
                            row["ms"][impl] = t * 1e3
                            row["ms_min"][impl] = tmin * 1e3
                            row["reps"][impl] = reps
                            row["copies"][impl] = copies[vname][0]
                        else:
                            row["ms"][impl] = row["ms_min"][impl] = None
                    row["weight_bytes"] = W.int4_bytes[dt]
                    t4 = row["ms"]["int4kit"]
                    row["gbps"] = W.int4_bytes[dt] / (t4 * 1e-3) / 1e9 if t4 else None
                    if mode == "cold" and read_gbps and row["gbps"]:
                        row["read_bw_fraction"] = row["gbps"] / read_gbps
                    row["speedup"] = {p: (row["ms"][p] / t4 if t4 and row["ms"][p] else None)
                                      for p in PEERS}
                    a8, bf16 = row["ms"]["int4kit_a8"], row["ms"]["dense_bf16"]
                    row["a8_vs_bf16"] = bf16 / a8 if a8 and bf16 else None
                    w8 = row["ms"]["int8"]
                    row["w8_vs_bf16"] = bf16 / w8 if w8 and bf16 else None
                    rows.append(row)
            if mode == "cold":
                log(f"  cold {K}x{N}: copies rotated: " + ", ".join(
                    f"{k} {n} ({n * b / GiB:.2f} GiB)" for k, (n, b) in copies.items()))
            del W, variants
    return rows


# ---- output -----------------------------------------------------------------------------------------

def _f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def format_table(rows, title=None) -> str:
    """Fixed-width table: one line per (shape, M, dtype); ratios are peer ms / int4kit ms."""
    if not rows:
        return "(no results)"
    head = (f"{'K x N':>12} {'M':>4} {'dtype':>5} | {'int4kit':>8} {'W4A8':>8} {'W8A16':>8} "
            f"{'F.lin bf16':>10} {'F.lin fp32':>10} {'torch int4':>10} | {'int4kit':>7} | "
            f"{'vs bf16':>7} {'vs fp32':>7} {'vs tint4':>8} | {'W4A8 vs bf16':>12} "
            f"{'W8A16 vs bf16':>13}")
    sub = (f"{'':>12} {'':>4} {'':>5} | {'ms':>8} {'ms':>8} {'ms':>8} {'ms':>10} {'ms':>10} "
           f"{'ms':>10} | {'GB/s':>7} | {'x':>7} {'x':>7} {'x':>8} | {'x':>12} {'x':>13}")
    lines = []
    if title:
        lines.append(title)
    lines += [head, sub, "-" * len(head)]
    prev = None
    for r in rows:
        shape = f"{r['K']}x{r['N']}"
        if prev is not None and prev != shape:
            lines.append("")
        prev = shape
        ms, sp = r["ms"], r["speedup"]
        lines.append(
            f"{shape:>12} {r['M']:>4} {r['dtype']:>5} | {_f(ms['int4kit'], '8.3f')} "
            f"{_f(ms['int4kit_a8'], '8.3f')} {_f(ms.get('int8'), '8.3f')} "
            f"{_f(ms['dense_bf16'], '10.3f')} "
            f"{_f(ms['dense_fp32'], '10.3f')} {_f(ms['torch_int4'], '10.3f')} | "
            f"{_f(r['gbps'], '7.1f')} | {_f(sp['dense_bf16'], '7.2f')} "
            f"{_f(sp['dense_fp32'], '7.2f')} {_f(sp['torch_int4'], '8.2f')} | "
            f"{_f(r['a8_vs_bf16'], '12.2f')} {_f(r.get('w8_vs_bf16'), '13.2f')}")
    return "\n".join(lines)


def print_tables(rows, log=print):
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mrows = [r for r in rows if r["mode"] == mode]
        note = ("one weight reused every call (may sit in L3)" if mode == "hot" else
                "rotating over > 1.1 GiB of weight copies per implementation (streams from DRAM)")
        log("")
        log(format_table(mrows, title=f"== {mode}: {note} =="))
        for r in mrows:
            if r.get("read_bw_fraction") and r["M"] == 1:
                log(f"  {r['K']}x{r['N']} M=1 {r['dtype']}: int4kit streams its weights at "
                    f"{r['gbps']:.1f} GB/s = {100 * r['read_bw_fraction']:.0f}% of the read "
                    f"bandwidth measured above")
    log("")
    log("ms: median of single calls. GB/s: int4kit's prepacked weight bytes (N*K/2 codes + scales "
        "and zeros in the row's dtype) per second.\nvs X: X's ms / int4kit's ms (> 1 means int4kit is faster). "
        "F.linear: dense weight and x in that dtype, measured once per (shape, M) and shown in "
        "both dtype rows.\ntorch int4: aten._weight_int4pack_mm_for_cpu on the same int4 codes, "
        "with x and scales/offsets in the row's dtype.\nW4A8: int4kit with x quantized per row to "
        "int8 at run time (ops.linear_w4a8); W4A8 vs bf16 = F.linear bf16 ms / W4A8 ms.\nW8A16: "
        "the weight as int8 per channel (ops.linear_int8, Int8Linear); W8A16 vs bf16 = F.linear "
        "bf16 ms / W8A16 ms.")


LINE_IMPLS = (("int4kit", "W4A16", "-"), ("int4kit_a8", "W4A8", "--"))


def _speedup_lines(ax, rows, baseline: str, title: str):
    """One axes: int4kit's speedup over `baseline` against M (both log scale), a line per shape
    and variant (W4A16 solid, W4A8 dashed)."""
    shapes = list(dict.fromkeys(f"{r['K']}x{r['N']}" for r in rows))
    ms = sorted({r["M"] for r in rows})
    lo, hi = 1.0, 1.0
    for k, shape in enumerate(shapes):
        for impl, label, style in LINE_IMPLS:
            pts = sorted((r["M"], r["ms"][baseline] / r["ms"][impl]) for r in rows
                         if f"{r['K']}x{r['N']}" == shape and r["ms"].get(impl) and r["ms"].get(baseline))
            if not pts:
                continue
            ax.plot([m for m, _ in pts], [v for _, v in pts], style, marker="o", ms=3,
                    color=f"C{k}", label=f"{label} {shape}")
            lo, hi = min(lo, *(v for _, v in pts)), max(hi, *(v for _, v in pts))
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(ms, [str(m) for m in ms])
    ticks = [t for t in (0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32) if lo / 1.2 <= t <= hi * 1.2]
    ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("M (rows of x)")
    ax.set_ylabel(f"speedup over {LABELS[baseline]}")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path):
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def plot(rows, path):
    """int4kit's speedup over F.linear bf16 against M: a panel per mode and dtype of x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    dts = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(len(modes), len(dts), figsize=(6 * len(dts), 4.2 * len(modes)),
                             squeeze=False)
    for (i, mode), (j, dt) in ((a, b) for a in enumerate(modes) for b in enumerate(dts)):
        _speedup_lines(axes[i][j], [r for r in rows if r["mode"] == mode and r["dtype"] == dt],
                       "dense_bf16", f"{mode} weights, {dt} activations")
    _save(fig, path)
    plt.close(fig)


def class_baseline(env: dict) -> str:
    """The dense peer a CPU class is compared with: F.linear bf16, except without AVX-512, where
    torch's bf16 GEMM is emulated and F.linear fp32 is what users run (#15's AVX2 targets)."""
    return "dense_fp32" if env.get("int4kit_cpu_isa") == "avx2" else "dense_bf16"


def plot_classes(runs, path):
    """Speedup against M per CPU class: runs is [(environment, rows)] from --json files of
    --cpu-class runs; a column per class (bf16 x), a row per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for _, rows in runs for r in rows))
    fig, axes = plt.subplots(len(modes), len(runs), figsize=(5.5 * len(runs), 4.2 * len(modes)),
                             squeeze=False)
    for j, (env, rows) in enumerate(runs):
        for i, mode in enumerate(modes):
            title = (f"{env.get('cpu_class') or env['int4kit_cpu_isa']} path on {env['cpu']}\n"
                     f"{mode} weights, bf16 x, {env['threads']} threads")
            _speedup_lines(axes[i][j], [r for r in rows if r["mode"] == mode and r["dtype"] == "bf16"],
                           class_baseline(env), title)
    _save(fig, path)
    plt.close(fig)


def _run_as_cpu_class(cpu_class: str, argv) -> int:
    """Runs this benchmark (argv without --cpu-class) in a child process whose environment limits
    int4kit and torch to `cpu_class`; returns its exit status."""
    import subprocess
    settings = CPU_CLASSES[cpu_class]
    if not ops.cpu_isa_supported(settings["INT4KIT_CPU_ISA"]):
        print(f"--cpu-class {cpu_class}: this CPU cannot run int4kit's "
              f"{settings['INT4KIT_CPU_ISA']} path (it can emulate the classes below it)",
              file=sys.stderr)
        return 2
    child, skip_next = [], False
    for arg in argv:
        if skip_next or arg.startswith("--cpu-class="):
            skip_next = False
            continue
        skip_next = arg == "--cpu-class"
        if not skip_next:
            child.append(arg)
    print(f"cpu class {cpu_class}: " + " ".join(f"{k}={v}" for k, v in settings.items()),
          flush=True)
    return subprocess.run([sys.executable, os.path.abspath(__file__), *child],
                          env={**os.environ, **settings}).returncode


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("hot", "cold", "both"), default="both")
    p.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in DEFAULT_SHAPES],
                   help="K x N shapes (K = in_features), e.g. 4096x4096 4096x11008")
    p.add_argument("--m", nargs="+", type=int, default=list(DEFAULT_MS), help="activation rows M")
    p.add_argument("--dtype", choices=("bf16", "fp32", "both"), default="both")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="fewer repeats, shorter time budget")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per case (default 1.0, --quick 0.25)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda runs bench/bench_linear_cuda.py (its own shapes and M unless given)")
    p.add_argument("--json", metavar="PATH", help="save the rows and the environment as JSON")
    p.add_argument("--plot", metavar="PATH", help="save a PNG of int4kit's speedup over bf16")
    p.add_argument("--plot-classes", nargs="+", metavar="JSON",
                   help="measure nothing: plot speedup against M per CPU class from the --json "
                        "files of earlier runs (one per --cpu-class) into --plot's PATH")
    p.add_argument("--markdown", metavar="PATH", help="(--device cuda) save the table as Markdown")
    p.add_argument("--cpu-class", choices=tuple(CPU_CLASSES),
                   help="measure a class of CPU: int4kit's path and torch's oneDNN / MKL limited "
                        "to it (avx512bf16: AVX-512 BF16 without AMX, as Zen 4/5; avx512: no BF16 "
                        "either, as Ice Lake; avx2: no AVX-512)")
    args = p.parse_args(argv)
    if args.plot_classes:
        if not args.plot:
            p.error("--plot-classes needs --plot PATH")
        runs = []
        for path in args.plot_classes:
            with open(path) as f:
                saved = json.load(f)
            if not isinstance(saved, dict) or not {"environment", "rows"} <= saved.keys():
                p.error(f"--plot-classes: {path} is not a --json file of this benchmark "
                        "(expected the keys 'environment' and 'rows')")
            runs.append((saved["environment"], saved["rows"]))
        plot_classes(runs, args.plot)
        print(f"saved {args.plot}")
        return 0
    if args.cpu_class is not None:
        return _run_as_cpu_class(args.cpu_class, sys.argv[1:] if argv is None else list(argv))
    shapes = [s for tok in args.shapes for s in tok.split(",") if s]
    if args.device == "cuda":
        import bench_linear_cuda
        given = sys.argv[1:] if argv is None else argv
        cuda_argv = ((["--shapes", *shapes] if "--shapes" in given else [])
                     + (["--m", *map(str, args.m)] if "--m" in given else [])
                     + (["--json", args.json] if args.json else [])
                     + (["--markdown", args.markdown] if args.markdown else []))
        return bench_linear_cuda.main(cuda_argv)

    env = environment()
    print(describe(env))
    t0 = time.perf_counter()
    rows = run(modes=args.mode, shapes=shapes, ms=args.m, dtypes=args.dtype, quick=args.quick,
               group_size=args.group_size, budget_s=args.budget)
    if not rows:
        return 0
    print_tables(rows)
    # the benchmark's own threads raise the load average, so only the one taken before the run
    # (printed in the header) says whether other work shared the cores
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
        print(f"saved {args.json}")
    if args.plot:
        plot(rows, args.plot)
        print(f"saved {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
