#!/usr/bin/env python3
"""End-to-end benchmark: a random-weight Llama model, bf16 dense vs int4kit W4A16 vs W4A8.

Builds a Llama-architecture model with transformers.LlamaConfig / LlamaForCausalLM (random
weights, bf16; default hidden 2048, intermediate 5632, 16 layers, 32 heads, 4 KV heads, vocab
32000 -- a TinyLlama-1.1B shape) and measures, at batch 1, for each variant:
  * prefill: one forward of a 512-token prompt into a fresh KV cache (logits of the last token
    only, as generate() does) -> tokens/s;
  * decode: greedy decoding of 64 new tokens from a short random prompt with the model's own KV
    cache -> new tokens / wall time of the whole generation (the short prompt's forward
    included), plus the median time of one single-token step. Every variant decodes exactly
    --new-tokens tokens: the manual loop (default) never stops early, and --method generate
    passes min_new_tokens = max_new_tokens;
  * the state-dict bytes of the model and how often its greedy tokens agree with bf16's:
    "greedy" compares the free-running generations position by position (after the first
    difference the contexts differ, so this drops fast), "forced" feeds every variant bf16's
    sequence once and compares its argmax at each generated position with bf16's token.
    With random weights the logits are nearly flat, so both are noisy: treat them as a sanity
    check, not as an accuracy measurement.

Variants: bf16 dense; int4kit W4A16 (quantize_model with QuantConfig(group_size=128,
symmetric=False) on a deep copy, lm_head kept dense unless --quantize-lm-head); int4kit W4A8
(QuantConfig(..., act_quant="int8"), shown as n/a when this build's QuantConfig does not take
act_quant). All variants are built first and kept in memory (default model: ~1.7 GB of bf16
weights plus ~0.8 GB per int4 copy), each is warmed up once (a prefill and a short decode), then
--repeats rounds each time every variant in turn and the medians are reported: interleaving makes
a burst of load from other work on a shared machine hit all variants alike. Absolute numbers on a
shared machine are noise: quote ratios. Unless --no-check, the int4 variants are also compared
with the same int4 weights dequantized into a bf16 dense model, which separates the kernels' error
from the quantization's.

    python bench/bench_decode.py --small                  # 4 layers, ~30 s on idle cores
    python bench/bench_decode.py                          # the 16-layer default, several minutes
    python bench/bench_decode.py --json bench/results/decode.json
    python bench/bench_decode.py --cache static --compile  # preallocated KV cache, compiled steps
"""
import argparse
import copy
import gc
import inspect
import json
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import int4kit  # noqa: E402
from int4kit.quant.model import state_dict_bytes  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import describe, environment  # noqa: E402

MiB = 1 << 20
VARIANTS = ("bf16", "w4a16", "w4a8")
LABELS = {"bf16": "bf16 dense", "w4a16": "int4kit W4A16", "w4a8": "int4kit W4A8"}


# ---- model ---------------------------------------------------------------------------------------

def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.prefill_tokens + args.prompt_tokens
                                    + args.new_tokens),
        tie_word_embeddings=False)  # a separate lm_head, so quantizing it touches nothing else
    torch.manual_seed(args.seed)
    try:
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    except TypeError:  # older transformers name the argument torch_dtype
        model = LlamaForCausalLM._from_config(config, torch_dtype=torch.bfloat16)
    model = model.to(torch.bfloat16).eval()
    model.requires_grad_(False)
    return model


def quant_config(variant):
    """The QuantConfig of a variant, or None with the reason when this build cannot make it."""
    if variant == "w4a16":
        return int4kit.QuantConfig(group_size=128, symmetric=False), None
    try:
        return int4kit.QuantConfig(group_size=128, symmetric=False, act_quant="int8"), None
    except TypeError:
        return None, "n/a (act_quant not available in this build)"


def _why(exc) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def make_variant(base, variant, quantize_lm_head, log):
    """(model, info) for a variant; model None when it cannot be built (info["unavailable"])."""
    info = {"variant": variant, "label": LABELS[variant]}
    if variant == "bf16":
        info["lm_head"] = "bf16"
        return base, info
    config, why = quant_config(variant)
    if config is None:
        info["unavailable"] = why
        return None, info
    model = copy.deepcopy(base)
    skip = () if quantize_lm_head else ("lm_head",)
    t0 = time.perf_counter()
    try:
        report = int4kit.quantize_model(model, config, skip=skip)
    except Exception as exc:  # noqa: BLE001  (reported in the table as n/a)
        del model
        gc.collect()
        info["unavailable"] = f"n/a (quantize_model raised {_why(exc)})"
        return None, info
    info["quantize_s"] = time.perf_counter() - t0
    info["swapped"] = len(report.swapped)
    info["skipped"] = [name for name, _ in report.skipped]
    info["lm_head"] = "int4" if "lm_head" in report.swapped else "bf16"
    info["config"] = repr(config)
    if variant == "w4a8":
        # the option is new: check that it reached the layers, where the module exposes it
        seen = {getattr(m, "act_quant", None) for m in model.modules()
                if isinstance(m, int4kit.Int4Linear)}
        info["layer_act_quant"] = sorted(str(s) for s in seen)
        if seen != {"int8"}:
            log(f"  WARNING: W4A8: the Int4Linear layers report act_quant "
                f"{sorted(map(str, seen))}, not int8 -- this row may be W4A16")
    log(f"  {LABELS[variant]}: swapped {info['swapped']} Linear layers in "
        f"{info['quantize_s']:.1f} s, lm_head "
        f"{'kept dense (bf16)' if info['lm_head'] == 'bf16' else 'quantized too'}; "
        f"{report.bytes_before / MiB:.0f} -> {report.bytes_after / MiB:.0f} MiB")
    return model, info


# ---- measurements --------------------------------------------------------------------------------

def _cache_kw(model) -> str:
    """transformers >= 5.2x calls the KV cache argument `cache`, earlier ones `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def decode_loop(model, prompt, new_tokens, cache_len=None, step_forward=None):
    """Greedy decoding with the model's KV cache; returns (tokens, total s, [s per step]).

    cache_len: None grows transformers' default (dynamic) cache by concatenation every step; a
    length preallocates a StaticCache of that many positions, written in place (the model reads
    the next position from the cache itself). step_forward: what runs the single-token steps (a
    torch.compile'd model.forward; needs the static cache, whose shapes never change)."""
    kw = _cache_kw(model)
    step_forward = step_forward or model
    first = {}
    if cache_len is not None:
        from transformers import StaticCache
        first = {kw: StaticCache(config=model.config, max_cache_len=cache_len)}
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **first)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [tok]
    steps = []
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        out = step_forward(input_ids=tok, use_cache=True, logits_to_keep=1, **{kw: _cache_of(out)})
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - t)
        tokens.append(tok)
    total = time.perf_counter() - t0
    return torch.cat(tokens, dim=1)[0].tolist(), total, steps


def decode_generate(model, prompt, new_tokens, cache="dynamic"):
    """The same through model.generate (no early stop: min_new_tokens = max_new_tokens)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0, use_cache=True, cache_implementation=cache)
        total = time.perf_counter() - t0
    tokens = out[0, prompt.shape[1]:].tolist()
    if len(tokens) != new_tokens:
        raise RuntimeError(f"generate produced {len(tokens)} tokens, expected {new_tokens}")
    return tokens, total, []


def prefill(model, ids):
    """One forward of ids into a fresh KV cache, last-token logits only; returns (s, logits)."""
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    t = time.perf_counter() - t0
    return t, out.logits[0, -1].float()


def forced_logits(model, prompt, tokens):
    """Logits [len(tokens), vocab] at each generated position when the model is fed `tokens`."""
    ids = torch.cat([prompt, torch.tensor([tokens[:-1]], dtype=prompt.dtype)], dim=1)
    return model(input_ids=ids, use_cache=False, logits_to_keep=len(tokens)).logits[0].float()


def agreement(tokens, ref):
    same = [a == b for a, b in zip(tokens, ref)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return sum(same) / len(same), first


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


def fake_quant_model(base, group_size=128, symmetric=False, quantize_lm_head=False):
    """A bf16 dense copy of `base` whose Linear weights are the int4 RTN weights, dequantized:
    what int4kit W4A16 computes, run by torch's own bf16 matmul."""
    from int4kit import ops
    model = copy.deepcopy(base)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (quantize_lm_head or name != "lm_head"):
            w = module.weight.data
            qweight, scales, zeros = ops.quantize(w, group_size, symmetric)
            module.weight.data = ops.dequantize(qweight, scales, None if symmetric else zeros,
                                                group_size, module.in_features,
                                                torch.float32).to(w.dtype)
    return model


# ---- benchmark -----------------------------------------------------------------------------------

def run(args, log=print):
    """Builds the model and its variants, times them in interleaved rounds -> (rows, shape)."""
    t_start = time.perf_counter()
    base = build_model(args)
    shape = (f"Llama: hidden {args.hidden}, intermediate {args.intermediate}, "
             f"{args.layers} layers, {args.heads} heads ({args.kv_heads} KV), vocab {args.vocab}, "
             f"random weights, bf16")
    log(f"{shape}; built in {time.perf_counter() - t_start:.1f} s, "
        f"{state_dict_bytes(base) / MiB:.0f} MiB")
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(3, args.vocab, (1, args.prompt_tokens), generator=g)
    long_ids = torch.randint(3, args.vocab, (1, args.prefill_tokens), generator=g)
    cache_len = args.prompt_tokens + args.new_tokens if args.cache == "static" else None
    step_forwards = {}  # --compile: one compiled forward per variant, compiled in its warm-up

    def decode(model, prompt, new_tokens):
        if args.method == "generate":
            return decode_generate(model, prompt, new_tokens, args.cache)
        return decode_loop(model, prompt, new_tokens, cache_len, step_forwards.get(id(model)))

    rows, models = [], {}
    for variant in ["bf16"] + [v for v in VARIANTS[1:] if v in args.variants]:
        model, info = make_variant(base, variant, args.quantize_lm_head, log)
        rows.append(info)
        if model is None:
            log(f"  {info['label']}: {info['unavailable']}")
            continue
        info["weight_bytes"] = state_dict_bytes(model)
        models[variant] = model
        if args.compile:
            step_forwards[id(model)] = torch.compile(model.forward, dynamic=False)
        info.update(prefill_s=[], decode_s=[], step_s=[], runs_tokens=[])

    # every variant stays in memory, so the rounds can interleave them: a burst of load from
    # other work on a shared machine then hits all variants alike instead of one of them
    with torch.inference_mode():
        for info in rows:
            if info["variant"] in models:
                t0 = time.perf_counter()
                model = models[info["variant"]]
                try:
                    prefill(model, long_ids)                                 # M = prefill_tokens
                    # at least one single-token step when compiling, so it compiles here
                    warm = max(args.warmup_tokens, 2 if args.compile else 1)
                    decode(model, prompt, min(args.new_tokens, warm))  # prompt, then M = 1
                except Exception as exc:  # noqa: BLE001  (a new path failing: report, go on)
                    if info["variant"] == "bf16":
                        raise
                    info["unavailable"] = f"n/a (forward raised {_why(exc)})"
                    log(f"  {info['label']}: {info['unavailable']}")
                    del models[info["variant"]], model
                    continue
                info["warmup_s"] = time.perf_counter() - t0
        for r in range(args.repeats):
            for info in rows:
                if info["variant"] not in models:
                    continue
                model = models[info["variant"]]
                info["prefill_s"].append(prefill(model, long_ids)[0])
                tokens, total, steps = decode(model, prompt, args.new_tokens)
                info["decode_s"].append(total)
                info["step_s"] += steps
                info["runs_tokens"].append(tokens)
            log(f"  round {r + 1}/{args.repeats}: " + ", ".join(
                f"{i['label']} {args.prefill_tokens / i['prefill_s'][-1]:.0f} / "
                f"{args.new_tokens / i['decode_s'][-1]:.1f}"
                for i in rows if i["variant"] in models)
                + " tok/s (prefill / decode)")

        # agreement with bf16 and a check of the kernels against torch's own matmul
        ref_tokens = rows[0]["runs_tokens"][0]
        ref_prompt_logits = prefill(models["bf16"], long_ids)[1]
        fake = (fake_quant_model(base, quantize_lm_head=args.quantize_lm_head)
                if args.check and len(models) > 1 else None)
        fake_logits = forced_logits(fake, prompt, ref_tokens) if fake is not None else None
        del fake
        for info in rows:
            if info["variant"] not in models:
                continue
            model = models[info["variant"]]
            info["tokens"] = info["runs_tokens"][0]
            if len({tuple(t) for t in info.pop("runs_tokens")}) > 1:
                log(f"  WARNING: {info['label']}: repeated greedy decodes gave different tokens")
            if info["variant"] == "bf16":
                continue
            info["greedy_agree"], info["first_diff"] = agreement(info["tokens"], ref_tokens)
            logits = forced_logits(model, prompt, ref_tokens)
            info["forced_agree"], _ = agreement(logits.argmax(-1).tolist(), ref_tokens)
            info["prefill_logits_rel_err"] = rel_err(prefill(model, long_ids)[1], ref_prompt_logits)
            if fake_logits is not None:
                info["vs_dequantized_rel_err"] = rel_err(logits, fake_logits)
                info["vs_dequantized_top1"] = float(
                    (logits.argmax(-1) == fake_logits.argmax(-1)).float().mean())

    for info in rows:
        if info["variant"] not in models:
            continue
        info["prefill_tok_s"] = args.prefill_tokens / statistics.median(info["prefill_s"])
        info["decode_tok_s"] = args.new_tokens / statistics.median(info["decode_s"])
        steps = info.pop("step_s")
        info["step_ms"] = statistics.median(steps) * 1e3 if steps else None
        info["step_ms_min"] = min(steps) * 1e3 if steps else None
    bf16 = rows[0]
    for info in rows:
        if info["variant"] in models:
            info["prefill_ratio"] = info["prefill_tok_s"] / bf16["prefill_tok_s"]
            info["decode_ratio"] = info["decode_tok_s"] / bf16["decode_tok_s"]
            info["size_ratio"] = bf16["weight_bytes"] / info["weight_bytes"]
    models.clear()
    del base
    gc.collect()
    return rows, shape


# ---- output --------------------------------------------------------------------------------------

def _f(v, fmt):
    width = "".join(c for c in fmt.split(".")[0] if c.isdigit())
    return format("n/a", f">{width}") if v is None else format(v, fmt)


def format_table(rows) -> str:
    head = (f"{'variant':<14} | {'prefill':>8} {'vs':>5} | {'decode':>7} {'vs':>5} "
            f"{'ms/step':>7} | {'weights':>7} {'vs':>5} | {'greedy':>6} {'first':>5} {'forced':>6}")
    sub = (f"{'':<14} | {'tok/s':>8} {'bf16':>5} | {'tok/s':>7} {'bf16':>5} {'median':>7} | "
           f"{'MiB':>7} {'bf16':>5} | {'agree':>6} {'diff':>5} {'agree':>6}")
    lines = [head, sub, "-" * len(head)]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"{r['label']:<14} | {r['unavailable']}")
            continue
        ref = r["variant"] == "bf16"
        first = "-" if ref or r.get("first_diff") is None else str(r["first_diff"])
        agree = lambda key: f"{'(ref)' if ref else _f(r.get(key), '.2f'):>6}"  # noqa: E731
        lines.append(
            f"{r['label']:<14} | {r['prefill_tok_s']:8.1f} {r['prefill_ratio']:5.2f} | "
            f"{r['decode_tok_s']:7.2f} {r['decode_ratio']:5.2f} {_f(r['step_ms'], '7.1f')} | "
            f"{r['weight_bytes'] / MiB:7.0f} {r['size_ratio']:5.2f} | {agree('greedy_agree')} "
            f"{first:>5} {agree('forced_agree')}")
    return "\n".join(lines)


def legend(args, rows) -> str:
    lm = "int4" if any(r.get("lm_head") == "int4" for r in rows) else "bf16"
    lines = [
        f"prefill: one forward of {args.prefill_tokens} tokens at batch 1 into a fresh KV cache "
        f"(last-token logits only).",
        f"decode: {args.new_tokens} greedy tokens from a {args.prompt_tokens}-token prompt "
        f"({'model.generate' if args.method == 'generate' else 'manual loop'}, {args.cache} KV "
        f"cache{', single-token steps compiled with torch.compile' if args.compile else ''}), new "
        f"tokens / wall time of the whole generation; ms/step: median single-token forward.",
        f"Medians of {args.repeats} rounds that interleave the variants, after one warm-up each. "
        f"vs bf16: tok/s over bf16's (> 1: faster);\nweights: state-dict bytes, bf16's over the "
        f"variant's (vs bf16 > 1: smaller).",
        f"lm_head: {'quantized to int4' if lm == 'int4' else 'kept dense in bf16'} in the int4 "
        f"variants{'' if lm == 'int4' else ' (--quantize-lm-head quantizes it)'}; the embedding "
        f"table is bf16 in every variant.",
        "greedy agree: fraction of generated tokens identical to bf16's at the same position "
        "(first diff: index of the first that differs);\nforced agree: the same with each variant "
        "fed bf16's sequence. Random weights give near-flat logits: agreement is noisy.",
    ]
    errs = [f"{r['label']} {r['prefill_logits_rel_err']:.3f}" for r in rows
            if "prefill_logits_rel_err" in r]
    if errs:
        lines.append("relative error of the prefill's last-token logits vs bf16: "
                     + ", ".join(errs))
    checks = [f"{r['label']} rel err {r['vs_dequantized_rel_err']:.4f}, top-1 "
              f"{r['vs_dequantized_top1']:.2f}" for r in rows if "vs_dequantized_rel_err" in r]
    if checks:
        lines.append("vs the same int4 weights dequantized into a bf16 dense model, fed bf16's "
                     "sequence (the kernels' error, W4A8's activation rounding and the bf16 "
                     "rounding of the\nreference's weights; the rest of the error vs bf16 is RTN "
                     "quantization): " + "; ".join(checks))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="4 layers instead of 16 (a quick run)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=None, help="default 16 (4 with --small)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length for decode")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens to decode")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds (one prefill and one decode per variant each); medians")
    p.add_argument("--warmup-tokens", type=int, default=4,
                   help="tokens decoded in each variant's warm-up")
    p.add_argument("--method", choices=("loop", "generate"), default="loop",
                   help="manual greedy loop over model.forward (default) or model.generate")
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                   help="KV cache: transformers' default (grown by concatenation every step) or a "
                        "StaticCache preallocated for prompt + new tokens (written in place)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each variant's forward for the single-token decode steps "
                        "(needs --cache static and --method loop; compiled in the warm-up)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="variants to run; bf16 always runs, as the reference")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize lm_head to int4 too (default: keep it dense in bf16)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the comparison with the dequantized weights in a bf16 dense model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="save the results and the environment as JSON")
    args = p.parse_args(argv)
    if args.layers is None:
        args.layers = 4 if args.small else 16
    if args.compile and (args.cache != "static" or args.method != "loop"):
        p.error("--compile needs --cache static and --method loop (static shapes, one compile)")
    if min(args.new_tokens, args.repeats, args.prompt_tokens, args.prefill_tokens) < 1:
        p.error("--new-tokens, --repeats, --prompt-tokens and --prefill-tokens must be >= 1")

    env = environment()
    print(describe(env))
    print(f"torch threads {torch.get_num_threads()} | int4kit.cpu_isa() {int4kit.cpu_isa()}")
    t0 = time.perf_counter()
    rows, shape = run(args)
    env["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]

    print("")
    print(f"== {shape}; batch 1; {env['threads']} threads, int4kit CPU path "
          f"{env['int4kit_cpu_isa']} ==")
    print(format_table(rows))
    print("")
    print(legend(args, rows))
    print(f"\nload avg before {env['loadavg'][0]:.2f}, after {env['loadavg_after'][0]:.2f} (the "
          f"benchmark itself adds ~{env['threads']}); total {time.perf_counter() - t0:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump({"environment": env, "config": config, "shape": shape, "rows": rows}, f,
                      indent=1)
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
