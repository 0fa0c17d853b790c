#!/usr/bin/env python3
"""Quantization-aware training of all-MiniLM-L6-v2 against its fp32 teacher (offline).

Starts from a post-training int4 model (g128 asymmetric; --base, GPTQ refined by default,
calibrated on int4kit.eval_data.CALIBRATION), lifts it into FakeQuantLinear layers (int4kit.qat), trains on
unlabeled sentences that ship with Python (pydoc topics and standard-library docstrings; the
evaluation sets stay unseen) to reproduce the teacher's sentence embeddings and hidden states,
converts, evaluates on the accuracy harness's sets and saves a normal int4 checkpoint.

    python bench/qat_minilm.py --recipe codes-frozen     # scales and zero points only
    python bench/qat_minilm.py --recipe full             # weights + LSQ + every other parameter
    python bench/qat_minilm.py --recipe w4a8             # full, with int8 activations (W4A8)
    python bench/qat_minilm.py --recipe w4a8 --epochs 2 --schedule cosine   # decayed rates

Writes (OUT: build/qat/RECIPE by default) OUT/train_log.csv, OUT/train.png (loss and
validation cosine per step), OUT/result.json and the checkpoint (OUT/checkpoint,
`save_pretrained`). Recipes and figures: docs/QAT.md.
"""
import argparse
import copy
import csv
import json
import os
import random
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from int4kit import QuantConfig, qat, quantize_model  # noqa: E402
from int4kit import eval as ev  # noqa: E402
from int4kit import eval_data  # noqa: E402
from int4kit.quant.calibration import progress  # noqa: E402
from bench_linear import cpu_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASES = {"gptq-refined": dict(method="gptq", clip_search=True, act_order=True, refine_rounds=10),
         "gptq": dict(method="gptq", clip_search=True, act_order=True),
         "rtn": dict(method="rtn", clip_search=True)}
# recipe -> (qparams mode, act_fake_quant, default learning rates: weights, qparams, other)
RECIPES = {"codes-frozen": ("codes_frozen", None, (0, 1e-5, 0)),
           "full": ("learned", None, (1e-4, 1e-5, 0)),
           "w4a8": ("learned", "int8", (1e-4, 1e-5, 0))}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="full")
    p.add_argument("--base", choices=sorted(BASES), default="gptq-refined",
                   help="the post-training method QAT starts from (g128 asymmetric)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=None, help="overrides --epochs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--sentences", type=int, default=None, help="training sentences (default all)")
    p.add_argument("--val-size", type=int, default=256)
    p.add_argument("--calibration-share", type=float, default=0.25,
                   help="share of the training sentences drawn from the calibration set")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--weight-lr", type=float, default=None,
                   help="latent weights of the int4 layers (0 freezes them)")
    p.add_argument("--qparam-lr", type=float, default=None,
                   help="scales and zero points (0 freezes them)")
    p.add_argument("--other-lr", type=float, default=None,
                   help="every other parameter: biases, norms, embeddings (0 freezes them)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rates constant, or decayed to 0 over the steps on a cosine")
    p.add_argument("--cosine", type=float, default=1.0, help="weight of the embedding cosine term")
    p.add_argument("--hidden", type=float, default=1.0,
                   help="weight of the hidden-state MSE term (all 6 layers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="default: build/qat/RECIPE")
    p.add_argument("--no-save", action="store_true", help="skip writing the checkpoint")
    return p.parse_args(argv)


def pooled_cosine(student, teacher_embeddings, batches) -> float:
    cos = [(ev.embed(student, b) * t).sum(1) for b, t in zip(batches, teacher_embeddings)]
    return float(torch.cat(cos).mean())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    mode, act, (weight_lr, qparam_lr, other_lr) = RECIPES[args.recipe]
    weight_lr = args.weight_lr if args.weight_lr is not None else weight_lr
    qparam_lr = args.qparam_lr if args.qparam_lr is not None else qparam_lr
    other_lr = args.other_lr if args.other_lr is not None else other_lr
    args.out = args.out or os.path.join(ROOT, "build", "qat", args.recipe)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    tokenizer, teacher = ev.load_minilm()
    text = eval_data.offline_sentences(seed=args.seed)
    val_text, train_text = text[:args.val_size], text[args.val_size:]
    if args.sentences:
        train_text = train_text[:args.sentences]
    if args.calibration_share:  # the calibration sentences (encyclopedic), repeated in the mix
        repeats = max(1, round(args.calibration_share * len(train_text) /
                               ((1 - args.calibration_share) * len(eval_data.CALIBRATION))))
        train_text = train_text + list(eval_data.CALIBRATION) * repeats
        random.Random(args.seed).shuffle(train_text)
    print(f"{len(train_text)} training and {len(val_text)} validation sentences (pydoc topics and "
          f"standard-library docstrings)", flush=True)

    base = QuantConfig(group_size=128, symmetric=False, act_quant=act, **BASES[args.base])
    ptq = copy.deepcopy(teacher)
    t0 = time.perf_counter()
    ptq_report = quantize_model(ptq, base, ev.batches(tokenizer, eval_data.CALIBRATION))
    print(f"post-training {args.base} (g128 asymmetric): {time.perf_counter() - t0:.0f} s",
          flush=True)
    score = ev.scorer(tokenizer, teacher)
    ptq_metrics = score(ptq, ptq_report)

    student = copy.deepcopy(ptq)
    report = qat.prepare_qat(student, qat.QATConfig(base, mode, act_fake_quant=act))
    student.eval()  # no dropout: the student learns the teacher's deterministic outputs
    for name, p in student.named_parameters():  # a learning rate of 0 (or None) freezes
        is_qparam = name.endswith((".scale", ".zero_point"))
        is_weight = isinstance(student.get_submodule(name.rpartition(".")[0]),
                               qat.FakeQuantLinear) and name.endswith(".weight")
        lr = qparam_lr if is_qparam else weight_lr if is_weight else other_lr
        p.requires_grad_(bool(lr) and p.requires_grad)
    groups = qat.param_groups(student, weight_lr, qparam_lr, other_lr)
    optimizer = torch.optim.AdamW(groups, lr=qparam_lr, weight_decay=0.0)
    print(report, "\n" + ", ".join(f"{g['name']}: {sum(p.numel() for p in g['params'])} "
                                   f"(lr {g.get('lr', qparam_lr)})" for g in groups), flush=True)

    train_batches = ev.batches(tokenizer, train_text, args.batch_size, args.max_length)
    val_batches = ev.batches(tokenizer, val_text, 64, args.max_length)
    val_teacher = [ev.embed(teacher, b) for b in val_batches]
    steps = args.steps or max(1, int(args.epochs * len(train_batches)))
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(len(train_batches), generator=generator)
                       for _ in range(steps // len(train_batches) + 1)])[:steps]
    log = [dict(step=0, loss="", val_cos=pooled_cosine(student, val_teacher, val_batches),
                seconds=0.0)]
    print(f"step 0: validation cosine {log[0]['val_cos']:.4f}", flush=True)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
                 if args.schedule == "cosine" else None)
    t_train = time.perf_counter()
    bar = progress(range(1, steps + 1), True, desc=args.recipe)
    for step in bar:
        batch = train_batches[int(order[step - 1])]
        with torch.no_grad():
            target = teacher(**batch, output_hidden_states=True)
        out = student(**batch, output_hidden_states=True)
        loss = qat.distill_loss(out, target, cosine=args.cosine, hidden=args.hidden,
                                hidden_layers=list(range(1, 7)),
                                attention_mask=batch["attention_mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        row = dict(step=step, loss=float(loss.detach()), val_cos="",
                   seconds=time.perf_counter() - t_train)
        if step % args.eval_every == 0 or step == steps:
            row["val_cos"] = pooled_cosine(student, val_teacher, val_batches)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{row['loss']:.4f}", val_cos=f"{row['val_cos']:.4f}")
        log.append(row)
    train_seconds = time.perf_counter() - t_train

    qat.convert(student)
    metrics = score(student, ptq_report)
    if not args.no_save:
        student.save_pretrained(os.path.join(args.out, "checkpoint"))
        tokenizer.save_pretrained(os.path.join(args.out, "checkpoint"))
    with open(os.path.join(args.out, "train_log.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "val_cos", "seconds"])
        writer.writeheader()
        writer.writerows(log)
    plot(log, os.path.join(args.out, "train.png"), args.recipe)
    result = dict(recipe=args.recipe, base=args.base, steps=steps, batch_size=args.batch_size,
                  train_sentences=len(train_text), lr=dict(weights=weight_lr, qparams=qparam_lr,
                                                           other=other_lr, schedule=args.schedule),
                  loss=dict(cosine=args.cosine, hidden=args.hidden),
                  train_seconds=round(train_seconds), total_seconds=round(
                      time.perf_counter() - t_start),
                  cpu=cpu_model(),
                  threads=torch.get_num_threads(), post_training=ptq_metrics, qat=metrics)
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{'':22}{'mean cos in':>12}{'min cos in':>11}{'NN in':>7}{'mean cos out':>13}"
          f"{'min cos out':>12}{'NN out':>7}")
    for label, m in (("post-training (start)", ptq_metrics), (f"QAT {args.recipe}", metrics)):
        print(f"{label:<22}{m['in-domain mean cos']:>12.4f}{m['in-domain min cos']:>11.4f}"
              f"{m['in-domain nn agree']:>7.3f}{m['out-of-domain mean cos']:>13.4f}"
              f"{m['out-of-domain min cos']:>12.4f}{m['out-of-domain nn agree']:>7.3f}")
    print(f"{steps} steps of {args.batch_size} in {train_seconds:.0f} s; total "
          f"{result['total_seconds']} s on {result['cpu']}, {result['threads']} threads; "
          f"written to {args.out}")
    return 0


def plot(log, path, recipe):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    steps = [r["step"] for r in log if r["loss"] != ""]
    losses = [r["loss"] for r in log if r["loss"] != ""]
    val = [(r["step"], r["val_cos"]) for r in log if r["val_cos"] != ""]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, losses, lw=0.6, alpha=0.5, label="per step")
    window = 20
    if len(losses) > window:
        smooth = [sum(losses[i - window:i]) / window for i in range(window, len(losses) + 1)]
        a.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    a.set(xlabel="step", ylabel="distillation loss", yscale="log", title=f"QAT {recipe}: loss")
    a.legend()
    b.plot([s for s, _ in val], [c for _, c in val], marker="o", ms=3)
    b.set(xlabel="step", ylabel="mean cosine to fp32", title="held-out docstring sentences")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
