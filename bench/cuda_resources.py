#!/usr/bin/env python3
"""Registers, shared memory and spills of every CUDA kernel, per architecture, from ptxas -v.

Compiles each torch-free csrc/cuda/*.cu on its own (no GPU needed, a few seconds per arch) and
prints a Markdown table; docs/CUDA.md keeps the current one.

    python bench/cuda_resources.py                  # INT4KIT_CUDA_ARCHS or 8.0;8.6;8.9;9.0a
    python bench/cuda_resources.py --archs 9.0a --markdown docs/cuda_resources.md
"""
import argparse
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


def ptxas_report(source, arch, nvcc):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-std=c++20", "-O3", f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}",
               gencode(arch), "-Xptxas=-v", "-c", str(source), "-o", str(Path(tmp) / "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True)
    if log.returncode != 0:
        sys.exit(f"nvcc failed on {source.name} for {arch}:\n{log.stderr}")
    rows, current = [], None
    for line in log.stderr.splitlines():
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default=os.environ.get("INT4KIT_CUDA_ARCHS", "8.0;8.6;8.9;9.0a"))
    p.add_argument("--markdown", metavar="PATH", help="also write the table here")
    args = p.parse_args(argv)
    nvcc = str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
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
