#!/usr/bin/env python3
"""GPU kernel benchmark: int4kit's CUDA linear next to dense bf16 and torch's int4 kernel, in one run.

Implementations, all on the same random weight (RTN, asymmetric, group 128) and bf16 activations:
  * int4kit        int4kit.ops.linear on the CUDA prepacked layout (the path Int4Linear takes)
  * int4kit dq+mm  the same op forced onto its dequantize + cuBLAS path (INT4KIT_CUDA_FUSED_MAX_M=0),
                   to place the fused/dense switch-over
  * bf16 matmul    torch.matmul(x, W.t()) with W in bf16 (cuBLAS)
  * tinygemm       torch.ops.aten._weight_int4pack_mm, torch's own int4 CUDA kernel

Timing (see the device method notes): every case is captured once as a CUDA graph that calls the
op on R copies of its weight in turn, with R large enough that the copies exceed 4x the L2 cache,
so each call streams its weight from HBM; the graph is replayed and timed with CUDA events, and
the median replay over R is the time per call. The copy bandwidth (device-to-device, bytes read +
written) is measured in the same run and int4kit's weight stream is reported against it.

    python bench/bench_linear_cuda.py                       # the issue's shapes and M, ~2-3 min
    python bench/bench_linear_cuda.py --shapes 8192x8192 --m 1 16 --json out.json --markdown out.md
    python bench/bench_linear_cuda.py --tile-sweep          # int4kit with each fused tile shape
(`bench/bench_linear.py --device cuda` runs this.)

The tile sweep times the fused kernel once per tile shape (INT4KIT_CUDA_TILE, docs/CUDA.md) next
to the shape int4kit picks by M ("auto"), to place the choice on a new GPU.
"""
import argparse
import json
import os
import statistics

import torch

from int4kit import ops, reference

from bench_linear import clone, nbytes, rel_err  # the CPU benchmark's helpers (same folder)

DEFAULT_SHAPES = ("8192x8192", "8192x28672", "4096x11008")  # K x N
DEFAULT_MS = (1, 4, 16, 32, 64, 128, 512)
IMPLS = ("int4kit", "int4kit_dq", "bf16", "tinygemm")
LABELS = {"int4kit": "int4kit", "int4kit_dq": "int4kit dq+mm", "bf16": "bf16 matmul",
          "tinygemm": "tinygemm"}


class Case:
    """One [N, K] weight quantized once, in the layout of every implementation."""

    def __init__(self, K, N, G=128, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.K, self.N, self.G = K, N, G
        w = torch.randn(N, K, device="cuda", generator=g) * 0.02
        self.qweight, self.scales, self.zeros = ops.quantize(w.bfloat16(), G, False)
        self.w_bf16 = w.bfloat16()
        del w

    def build(self, impl):
        """(weight object, call(x, weight)) for one implementation."""
        K, N, G = self.K, self.N, self.G
        if impl in ("int4kit", "int4kit_dq"):
            packed = ops.prepack(self.qweight, self.scales, self.zeros, G, K)
            return packed, lambda x, p: ops.linear(x, p, N, K, G)
        if impl == "bf16":
            return self.w_bf16.clone(), lambda x, w: torch.matmul(x, w.t())
        codes = ops.unpack(self.qweight, K).to(torch.int32)
        u8 = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # even k in the high nibble
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
        # tinygemm dequantizes (q - 8) * scale + offset: int4kit's (q - z) * s has offset (8 - z) s
        s = self.scales.float()
        sz = torch.stack([s.t(), ((8 - self.zeros.float()) * s).t()], dim=-1).contiguous().bfloat16()
        return (packed, sz), lambda x, pw: torch.ops.aten._weight_int4pack_mm(x, pw[0], G, pw[1])


def l2_bytes():
    return torch.cuda.get_device_properties(0).L2_cache_size


def time_graph(call, weights, x, replays=15):
    """Median ms per call: a CUDA graph of one call per weight copy, replayed `replays` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights[:2]:
            call(x, w)  # warm-up outside the capture (workspaces, attributes, lazy init)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            call(x, w)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(weights))
    del graph
    return statistics.median(times)


def copy_bandwidth_gbps(nbytes=1 << 30, reps=10):
    """Device-to-device copy, counting bytes read plus bytes written, best of `reps`."""
    src = torch.ones(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    return 2 * nbytes / best / 1e9


def check(log=print, K=4096, N=1024):
    """Every implementation once against the float64 reference (relative error)."""
    case = Case(K, N, seed=1)
    ref_q = [t.cpu() for t in (case.qweight, case.scales, case.zeros)]
    errs = {}
    for impl in IMPLS:
        w, call = case.build(impl)
        for M in (1, 16, 100, 300):
            x = torch.randn(M, K, device="cuda").bfloat16()
            with fused_max_m(0 if impl == "int4kit_dq" else None):
                y = call(x, w)
            ref = (reference.linear(x.cpu(), *ref_q, case.G) if impl != "bf16"
                   else x.cpu().double() @ case.w_bf16.cpu().double().t())
            err = rel_err(y.cpu(), ref)
            errs[impl] = max(errs.get(impl, 0.0), err)
    log("max relative error vs float64 reference (M = 1, 16, 100, 300): "
        + ", ".join(f"{LABELS[k]} {v:.1e}" for k, v in errs.items()))
    return errs


class env_var:
    """Sets environment variable `name` for the block (None: leave it as it is); the CUDA glue
    reads INT4KIT_CUDA_FUSED_MAX_M and INT4KIT_CUDA_TILE on every call."""

    def __init__(self, name, value):
        self.name, self.value, self.saved = name, value, os.environ.get(name)

    def __enter__(self):
        if self.value is not None:
            os.environ[self.name] = str(self.value)

    def __exit__(self, *exc):
        if self.value is None:
            return
        if self.saved is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.saved


def fused_max_m(value):
    return env_var("INT4KIT_CUDA_FUSED_MAX_M", value)


def tile_shapes(case):
    """The fused kernel's tile shapes as the glue lists them for an index it does not know:
    [(index, description, fits this case's group size)]."""
    x = torch.zeros(1, case.K, device="cuda", dtype=torch.bfloat16)
    packed, call = case.build("int4kit")
    with env_var("INT4KIT_CUDA_TILE", -1):
        try:
            call(x, packed)
        except RuntimeError as e:
            lines = str(e).split("the shapes are:", 1)[-1].strip().splitlines()
            shapes = [line.strip() for line in lines if ":" in line]
            return [(i, s, "needs one group per" not in s) for i, s in enumerate(shapes)]
    raise RuntimeError("INT4KIT_CUDA_TILE=-1 was accepted; cannot list the tile shapes")


SWEEP_SHAPES = ("8192x8192", "8192x28672")
SWEEP_MS = (1, 4, 8, 16, 32, 64, 128, 256, 512)  # 512: whether the fused kernel beats dq+mm there


def tile_sweep(shapes=SWEEP_SHAPES, ms=SWEEP_MS, log=print):
    """ms per call of the fused kernel under each tile shape that fits, and with the one picked by
    M ("auto"); each forced shape's output is first checked against the automatic one's."""
    rows = []
    for shape in shapes:
        K, N = (int(v) for v in shape.lower().split("x"))
        case = Case(K, N)
        tiles = tile_shapes(case)
        if not rows:
            log("tile shapes (INT4KIT_CUDA_TILE):\n" + "\n".join(f"  {s}" for _, s, _ in tiles))
        first, call = case.build("int4kit")
        copies = max(2, -(-4 * l2_bytes() // nbytes(first)))
        weights = [first] + [clone(first) for _ in range(copies - 1)]
        for M in ms:
            x = torch.randn(M, K, device="cuda").bfloat16()
            row = {"K": K, "N": N, "M": M, "ms": {}}
            with fused_max_m(1 << 30), torch.inference_mode():
                expected = call(x, first).float()
                for tile, _, fits in [("auto", "", True)] + tiles:
                    if not fits:
                        row["ms"][str(tile)] = None
                        continue
                    with env_var("INT4KIT_CUDA_TILE", None if tile == "auto" else tile):
                        err = rel_err(call(x, first).float(), expected)
                        if err > 1e-2:
                            raise RuntimeError(f"tile {tile} at M={M}: output differs from the "
                                               f"automatic tile's by {err:.2g} (relative)")
                        row["ms"][str(tile)] = time_graph(call, weights, x)
            rows.append(row)
            log(tile_markdown([row], len(tiles), header=len(rows) == 1), end="", flush=True)
        del weights, first, case
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "tiles": [s for _, s, _ in tiles], "rows": rows}


def tile_markdown(rows, tile_count, header=True):
    cols = ["auto"] + [str(i) for i in range(tile_count)]
    head = ("| K x N | M | " + " | ".join(f"tile {c}" for c in cols) + " | best |\n|"
            + "---|" * (len(cols) + 3) + "\n") if header else ""
    lines = []
    for r in rows:
        times = {c: r["ms"].get(c) for c in cols}
        best = min(((t, c) for c, t in times.items() if t is not None and c != "auto"),
                   default=(None, "-"))[1]
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | "
                     + " | ".join("-" if t is None else f"{t:.4f}" for t in times.values())
                     + f" | {best} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="K x N, e.g. 8192x8192")
    p.add_argument("--m", nargs="+", type=int, default=list(DEFAULT_MS), help="activation rows M")
    p.add_argument("--json", metavar="PATH", help="save the rows as JSON")
    p.add_argument("--markdown", metavar="PATH", help="save the table as Markdown")
    p.add_argument("--tile-sweep", action="store_true",
                   help="time the fused kernel under each tile shape instead (default shapes "
                        f"{' '.join(SWEEP_SHAPES)}, M {' '.join(map(str, SWEEP_MS))})")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device is available here; nothing to benchmark")
        return 0
    if args.tile_sweep:
        shapes = args.shapes if args.shapes != list(DEFAULT_SHAPES) else list(SWEEP_SHAPES)
        ms = args.m if args.m != list(DEFAULT_MS) else list(SWEEP_MS)
        result = tile_sweep(shapes, ms)
        table = tile_markdown(result["rows"], len(result["tiles"]))
    else:
        result = run(args.shapes, args.m)
        table = markdown(result)
    print("all shapes:\n" + table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
