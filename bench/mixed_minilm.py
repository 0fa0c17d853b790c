#!/usr/bin/env python3
"""Mixed precision on all-MiniLM-L6-v2: measure each layer's sensitivity to each candidate format,
plan under a size budget, quantize with the plan, and compare with uniform group sizes of the
same size (the accuracy harness of docs/ACCURACY.md: mean cosine of the sentence embeddings
against fp32, in-domain and out-of-domain).

    python bench/mixed_minilm.py                        # gptq and rtn bases, ~10 minutes
    python bench/mixed_minilm.py --bases rtn --budgets 4.5
    python bench/mixed_minilm.py --int8                 # int8 per channel as a candidate too

Candidates per base method: group sizes 128, 64, 32 and 16 with 16-bit (bfloat16) scales and
zero points, and dense. Budgets are in bits per weight over the 37 linear layers (codes, scales,
zero points, bias: QuantReport.total_bits_per_weight); each plan is compared with the uniform
group size of the nearest size at or below it. With --int8, weight-only int8 per channel (the
base method without refine_rounds, bfloat16 scales) is a candidate too, and measured uniformly.
"""
import argparse
import copy
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

BASES = {
    "gptq": dict(method="gptq", clip_search=True, act_order=True, refine_rounds=10),
    "rtn": dict(method="rtn", clip_search=True),
}
GROUPS = (128, 64, 32, 16)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    p.add_argument("--budgets", nargs="+", type=float, default=[4.5, 5.0],
                   help="bits per weight; each plan also runs at the size of its uniform peer")
    p.add_argument("--metric", default="output", choices=("output", "cosine"),
                   help="damage: the default (relative squared error of the last hidden state "
                        "on the calibration data) or 1 - mean cosine of the sentence embeddings "
                        "on the calibration data (an eval_fn)")
    p.add_argument("--skip-uniform", action="store_true",
                   help="only the plans (budgets from --budgets)")
    p.add_argument("--groups", nargs="+", type=int, default=list(GROUPS),
                   help="the candidates' group sizes (with dense)")
    p.add_argument("--table-dir", help="write each sensitivity table here as JSON")
    p.add_argument("--int8", action="store_true",
                   help="add int8 per channel (Int8Linear) to the candidates, and run it uniformly")
    args = p.parse_args(argv)

    import int4kit
    from int4kit import QuantConfig
    from int4kit import eval as ev
    from int4kit import eval_data

    torch.manual_seed(0)
    tokenizer, model = ev.load_minilm()
    calib = ev.batches(tokenizer, eval_data.CALIBRATION)
    score = ev.scorer(tokenizer, model)
    print(f"all-MiniLM-L6-v2, {torch.get_num_threads()} threads; calibration "
          f"{len(eval_data.CALIBRATION)} sentences; evaluation "
          f"{len(ev.EVAL_SETS['in-domain'])} in-domain / "
          f"{len(ev.EVAL_SETS['out-of-domain'])} out-of-domain sentences", flush=True)
    print("| base | model | bits per weight | in-domain mean / min cos | out-of-domain mean / "
          "min cos | calibration output error | seconds |\n|---|---|---|---|---|---|---|",
          flush=True)
    fp_hidden = _hidden_states(model, calib)

    def output_error(q_model):
        """The default damage metric of the whole model: relative squared error of the last
        hidden state on the calibration data, padding left out."""
        hidden = _hidden_states(q_model, calib)
        return (sum(float((h - r).pow(2).sum()) for h, r in zip(hidden, fp_hidden))
                / sum(float(r.pow(2).sum()) for r in fp_hidden))

    def run(base, label, config, layer_configs=None, extra=0.0):
        q_model = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = int4kit.quantize_model(q_model, config, calib if config.needs_calibration
                                        else (calib if layer_configs is not None else None),
                                        layer_configs=layer_configs)
        seconds = time.perf_counter() - t0 + extra
        row = score(q_model, report)
        print(f"| {base} | {label} | {report.total_bits_per_weight:.3f} | "
              f"{row['in-domain mean cos']:.4f} / {row['in-domain min cos']:.4f} | "
              f"{row['out-of-domain mean cos']:.4f} / {row['out-of-domain min cos']:.4f} | "
              f"{output_error(q_model):.3e} | {seconds:.0f} |", flush=True)
        return report

    eval_fn = None
    if args.metric == "cosine":
        fp_embeddings = [ev.embed(model, batch) for batch in calib]

        def embedding_cosine_loss(m):
            """1 - mean cosine of the sentence embeddings against fp32, calibration data."""
            return float(sum((1 - (ev.embed(m, b) * ref).sum(1)).sum()
                             for b, ref in zip(calib, fp_embeddings))
                         / sum(len(ref) for ref in fp_embeddings))
        eval_fn = embedding_cosine_loss

    for base in args.bases:
        configs = {g: QuantConfig(group_size=g, symmetric=False, scale_dtype=torch.bfloat16,
                                  **BASES[base]) for g in args.groups}
        uniform = ({} if args.skip_uniform else
                   {g: run(base, f"uniform g{g}", configs[g]).total_bits_per_weight
                    for g in args.groups})
        candidates = list(configs.values())
        if args.int8:
            int8 = QuantConfig(bits=8, group_size=-1, symmetric=False, scale_dtype=torch.bfloat16,
                               **dict(BASES[base], refine_rounds=0))
            candidates.append(int8)
            if not args.skip_uniform:
                run(base, "uniform int8 channel", int8)
        t0 = time.perf_counter()
        table = int4kit.measure_sensitivity(model, candidates, calib,
                                            eval_fn=eval_fn, show_progress=False)
        measure_s = time.perf_counter() - t0
        if args.table_dir:
            os.makedirs(args.table_dir, exist_ok=True)
            table.save(os.path.join(args.table_dir, f"minilm-{base}.json"))
        budgets = sorted(set(args.budgets) | {round(uniform[g], 6) for g in (64, 32)
                                               if g in uniform})
        for bits in budgets:
            t0 = time.perf_counter()
            plan = int4kit.plan_mixed_precision(table, bits_per_weight=bits)
            plan_s = time.perf_counter() - t0
            report = run(base, f"mixed <= {bits:.3f} (sensitivity {measure_s:.0f} s, plan "
                               f"{plan_s:.2f} s)", configs[max(configs)], plan)
            check = report.plan_check
            measured = ("not measured" if check["measured_error"] is None
                        else f"measured {check['measured_error']:.3e}")
            print(f"|  | predicted damage {check['predicted_error']:.3e}, {measured}; " + ", ".join(
                      f"{label}: {n}" for label, n in _counts(plan).items()) + " | | | | | |",
                  flush=True)
    return 0


def _hidden_states(model, batches):
    with torch.no_grad():
        return [model(**b).last_hidden_state[b["attention_mask"] != 0].double() for b in batches]


def _counts(plan):
    counts = {}
    for label in plan.labels.values():
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    raise SystemExit(main())
