#!/usr/bin/env python3
"""Accuracy of every int4kit quantization method on all-MiniLM-L6-v2 (offline).

Calibrates on encyclopedic sentences and evaluates on held-out encyclopedic sentences (in-domain)
and on chat messages and reviews (out-of-domain); see int4kit.eval for the metrics. Prints the
table and writes it to docs/ACCURACY.md (between the markers there, or a new file).

    python bench/eval_accuracy.py [--threads N] [--methods rtn,gptq] [--settings "g128 asym"]
"""
import argparse
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from int4kit import eval as ev  # noqa: E402
from bench_linear import cpu_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- eval_accuracy: begin -->", "<!-- eval_accuracy: end -->"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--methods", default=None, help="comma-separated labels of "
                        "int4kit.eval.METHODS (default: all) or SLOW_METHODS (adaround...)")
    parser.add_argument("--settings", default=None, help="comma-separated labels of SETTINGS")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "ACCURACY.md"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        methods, settings = ev.pick(args.methods, "methods"), ev.pick(args.settings, "settings")
    except ValueError as error:
        parser.error(str(error))
    t0 = time.perf_counter()
    rows = ev.run(methods, settings)
    table = ev.markdown_table(rows)
    total = time.perf_counter() - t0
    footer = (f"\n\n{len(rows)} runs in {total:.0f} s on {cpu_model()}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads.")
    print()
    print(table + footer)
    if args.no_write:
        return 0
    block = f"{BEGIN}\n{table}{footer}\n{END}"
    if os.path.exists(args.out):
        text = open(args.out).read()
        if BEGIN in text and END in text:
            text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = "# int4kit accuracy\n\n" + block + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
