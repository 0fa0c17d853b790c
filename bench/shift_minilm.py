#!/usr/bin/env python3
"""Distribution shift on all-MiniLM-L6-v2: quantize with GPTQ calibrated on int4kit's
encyclopedic calibration sentences, then score the in-domain evaluation set (more encyclopedic
sentences) and the out-of-domain set (chat messages and reviews) with int4kit.shift_report, per
layer group, next to the accuracy each set gets (mean embedding cosine against fp32).

    python bench/shift_minilm.py            # ~1 minute
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args(argv)

    import int4kit
    from int4kit import QuantConfig
    from int4kit import eval as ev
    from int4kit import eval_data

    tokenizer, model = ev.load_minilm()
    fp = {name: ev.embed(model, ev.batches(tokenizer, s, batch_size=len(s))[0])
          for name, s in ev.EVAL_SETS.items()}
    config = QuantConfig(group_size=args.group_size, symmetric=False, method="gptq",
                         clip_search=True, act_order=True)
    int4kit.quantize_model(model, config, ev.batches(tokenizer, eval_data.CALIBRATION))
    reports, cosines = {}, {}
    for name, sentences in ev.EVAL_SETS.items():
        batches = ev.batches(tokenizer, sentences)
        reports[name] = int4kit.shift_report(model, batches)
        cosines[name] = float((ev.embed(model, ev.batches(tokenizer, sentences,
                                                          batch_size=len(sentences))[0])
                               * fp[name]).sum(1).mean())
    names = list(ev.EVAL_SETS)
    print(f"all-MiniLM-L6-v2, gptq g{args.group_size} asymmetric calibrated on "
          f"{len(eval_data.CALIBRATION)} encyclopedic sentences; {torch.get_num_threads()} "
          f"threads")
    print("| layer group | " + " | ".join(f"{n} divergence | {n} error ratio" for n in names)
          + " |\n|---|" + "---|---|" * len(names))
    groups = {n: reports[n].groups() for n in names}
    for group in groups[names[0]]:
        print(f"| {group} | " + " | ".join(
            f"{groups[n][group].divergence:.4f} | {groups[n][group].error_ratio:.3f}"
            for n in names) + " |")
    print("| all (weighted) | " + " | ".join(
        f"{reports[n].divergence:.4f} | {reports[n].error_ratio:.3f}" for n in names) + " |")
    print("mean cosine against fp32: " + ", ".join(f"{n} {cosines[n]:.4f}" for n in names))
    if len(names) == 2:
        a, b = names
        above = [g for g in groups[a] if groups[b][g].divergence > groups[a][g].divergence]
        print(f"{b} diverges more than {a} in {len(above)} of {len(groups[a])} layer groups")
    for n in names:
        print(f"{n}: most affected " + ", ".join(
            f"{layer} ({reports[n].layers[layer].error_ratio:.2f}x)"
            for layer in reports[n].worst(3)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
