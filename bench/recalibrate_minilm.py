#!/usr/bin/env python3
"""Re-calibration under distribution shift on all-MiniLM-L6-v2: GPTQ calibrated on int4kit's
encyclopedic calibration sentences, then int4kit.recalibrate with 64 chat messages and reviews
(eval_data.RECALIBRATION_OUT_OF_DOMAIN, written apart from the evaluation sets), mixed with the
original calibration sentences, in both modes (qparams fitting the teacher's weights or its
layer outputs). Prints the accuracy harness's mean / min cosine
in and out of domain, the share of the in-domain / out-of-domain gap recovered out of domain,
and shift_report's divergence of the evaluation sets before and after.

    python bench/recalibrate_minilm.py          # ~3 minutes
"""
import argparse
import copy
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--refine-rounds", type=int, default=10)
    args = p.parse_args(argv)

    import int4kit
    from int4kit import QuantConfig
    from int4kit import eval as ev
    from int4kit import eval_data

    tokenizer, fp = ev.load_minilm()
    score = ev.scorer(tokenizer, fp)
    calib = ev.batches(tokenizer, eval_data.CALIBRATION)
    new = ev.batches(tokenizer, eval_data.RECALIBRATION_OUT_OF_DOMAIN)
    config = QuantConfig(group_size=args.group_size, symmetric=False, method="gptq",
                         clip_search=True, act_order=True, refine_rounds=args.refine_rounds)
    base = copy.deepcopy(fp)
    report = int4kit.quantize_model(base, config, calib)
    eval_batches = {name: ev.batches(tokenizer, s) for name, s in ev.EVAL_SETS.items()}
    print(f"all-MiniLM-L6-v2, gptq g{args.group_size} asymmetric (clip search, act-order, "
          f"refine_rounds={args.refine_rounds}); calibration {len(eval_data.CALIBRATION)} "
          f"encyclopedic sentences; new data {len(eval_data.RECALIBRATION_OUT_OF_DOMAIN)} chat "
          f"messages and reviews; {torch.get_num_threads()} threads")
    print("| model | in-domain mean / min cos | out-of-domain mean / min cos | gap recovered "
          "out of domain | in-domain change | divergence in / out | seconds |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    rows = {}

    def show(label, model, rep, seconds):
        row = score(model, rep)
        rows[label] = row
        first = rows["calibrated in-domain"]
        gap = first["in-domain mean cos"] - first["out-of-domain mean cos"]
        recovered = (row["out-of-domain mean cos"] - first["out-of-domain mean cos"]) / gap
        shift = {n: int4kit.shift_report(model, b).divergence for n, b in eval_batches.items()}
        print(f"| {label} | {row['in-domain mean cos']:.4f} / {row['in-domain min cos']:.4f} | "
              f"{row['out-of-domain mean cos']:.4f} / {row['out-of-domain min cos']:.4f} | "
              f"{recovered:.0%} | {row['in-domain mean cos'] - first['in-domain mean cos']:+.4f}"
              f" | {shift['in-domain']:.3f} / {shift['out-of-domain']:.3f} | {seconds:.0f} |",
              flush=True)

    show("calibrated in-domain", base, report, report.seconds)
    for mode, fit in (("qparams", "weights"), ("qparams", "outputs"), ("full", "weights")):
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        result = int4kit.recalibrate(model, new, fp, mode=mode, calib_data=calib, config=config,
                                     fit=fit)
        rep = result.quant_report if mode == "full" else report
        show(f"recalibrate {mode}" + (f", fit {fit}" if mode == "qparams" else ""), model, rep,
             time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
