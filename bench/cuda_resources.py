#!/usr/bin/env python3
"""Registers, shared memory and spills of every CUDA kernel, per architecture, from ptxas -v.

Compiles each torch-free csrc/cuda/*.cu on its own (no GPU needed, a few seconds per arch) and
prints a Markdown table; docs/CUDA.md keeps the current one. With --loops, the length and
instruction mix of each kernel's main loop in the SASS instead (cuobjdump --dump-sass): where there
is no GPU, the instructions per iteration are what can be measured of a kernel's issue cost.

    python bench/cuda_resources.py                  # INT4KIT_CUDA_ARCHS or 8.0;8.6;8.9;9.0a
    python bench/cuda_resources.py --archs 9.0a --markdown docs/cuda_resources.md
    python bench/cuda_resources.py --archs 9.0a --loops --filter linear_kernel
"""
import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def gencode(arch):
    num = arch.replace(".", "")
    return f"-gencode=arch=compute_{num},code=sm_{num}"


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return [short(n) for n in out]


def short(name):
    """int4kit::cuda::(anonymous namespace)::linear_kernel<__half, 2, 1, 8, 4>(...) -> the kernel
    and its template arguments."""
    name = re.sub(r"^(void )?int4kit::cuda::(\(anonymous namespace\)|fused_linear)::", "", name)
    name = re.sub(r"\(.*\)$", "", name)
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def compile_object(source, arch, nvcc, obj):
    """nvcc -c of one source for one arch into obj; ptxas -v's report (stderr)."""
    cmd = [nvcc, "-std=c++20", "-O3", f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}",
           gencode(arch), "-Xptxas=-v", "-c", str(source), "-o", str(obj)]
    log = subprocess.run(cmd, capture_output=True, text=True)
    if log.returncode != 0:
        sys.exit(f"nvcc failed on {source.name} for {arch}:\n{log.stderr}")
    return log.stderr


def ptxas_report(source, arch, nvcc):
    with tempfile.TemporaryDirectory() as tmp:
        report = compile_object(source, arch, nvcc, Path(tmp) / "k.o")
    rows, current = [], None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = {"kernel": m.group(1), "stack": 0, "spill_st": 0, "spill_ld": 0, "smem": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    for row, name in zip(rows, demangle([r["kernel"] for r in rows])):
        row["kernel"] = name
    return rows


def cuobjdump():
    """The toolkit's cuobjdump, else the copy triton ships (this machine's toolkit has none)."""
    own = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"
    if own.exists():
        return str(own)
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    sys.exit("cuobjdump not found (CUDA_HOME/bin, or triton's backends/nvidia/bin)")


def main_loops(sass):
    """{mangled kernel: (instructions, Counter of opcodes)} of each function's main loop: the
    longest span from a backward branch's target to the branch."""
    loops = {}
    for function in re.split(r"\n\s*Function : ", sass)[1:]:
        name = function.split("\n", 1)[0].strip()
        code = [(int(m.group(1), 16), m.group(2).strip())
                for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", function)]
        spans = [(int(b.group(1), 16), addr) for addr, text in code
                 if (b := re.search(r"BRA (?:`\(.*?\)\s*)?0x([0-9a-f]+)", text)) and int(b.group(1), 16) < addr]
        if not spans:
            continue
        start, end = max(spans, key=lambda span: span[1] - span[0])
        body = [text for addr, text in code if start <= addr <= end]
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
        loops[name] = (len(body), ops)
    return loops


def loop_report(source, arch, nvcc, name_filter):
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "k.o"
        compile_object(source, arch, nvcc, obj)
        sass = subprocess.run([cuobjdump(), "--dump-sass", str(obj)], capture_output=True, text=True,
                              check=True).stdout
    loops = {k: v for k, v in main_loops(sass).items() if name_filter in k}
    names = demangle(list(loops))
    return [(name, *loops[k]) for name, k in zip(names, loops)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default=os.environ.get("INT4KIT_CUDA_ARCHS", "8.0;8.6;8.9;9.0a"))
    p.add_argument("--markdown", metavar="PATH", help="also write the table here")
    p.add_argument("--loops", action="store_true",
                   help="the main loop of each kernel in the SASS: instructions and their mix")
    p.add_argument("--filter", default="", help="with --loops: kernels whose name contains this")
    args = p.parse_args(argv)
    nvcc = str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if args.loops:
        lines = ["| arch | kernel | loop instructions | mix (most frequent first) |", "|---|---|---|---|"]
        for arch in [a for a in args.archs.replace(",", ";").split(";") if a]:
            for source in SOURCES:
                for name, count, ops in loop_report(source, arch, nvcc, args.filter):
                    mix = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
                    lines.append(f"| sm_{arch.replace('.', '')} | `{name}` | {count} | {mix} |")
        print("\n".join(lines))
        return 0
    lines = ["| arch | file | kernel | registers | static smem | stack | spill st/ld |",
             "|---|---|---|---|---|---|---|"]
    for arch in [a for a in args.archs.replace(",", ";").split(";") if a]:
        for source in SOURCES:
            for r in ptxas_report(source, arch, nvcc):
                lines.append(f"| sm_{arch.replace('.', '')} | {source.name} | `{r['kernel']}` "
                             f"| {r['regs']} | {r['smem']} | {r['stack']} "
                             f"| {r['spill_st']}/{r['spill_ld']} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
