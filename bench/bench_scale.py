#!/usr/bin/env python3
"""Quantizing a checkpoint larger than the memory one wants to spend on it: quantize_checkpoint on
a synthetic Llama written by this script (bf16, 16 blocks, hidden 2048, intermediate 5632,
vocabulary 8192: about 1.7 GB), with GPTQ and with RTN, each in a fresh process that reports its
peak resident memory growth (Linux VmHWM, reset through /proc/self/clear_refs after imports and
calibration data) as a share of the checkpoint's size; then RTN's output against the in-memory
quantize_model on the loaded model, tensor by tensor.

    python bench/bench_scale.py                       # writes build/scale/src once, ~25 minutes
    python bench/bench_scale.py --layers 2 --hidden 256 --intermediate 704   # a quick look
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib(field: str) -> float:
    status = open("/proc/self/status").read()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def llama_config(args):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_attention_heads=args.hidden // 128 or 1,
                       num_key_value_heads=args.kv_heads or args.hidden // 128 or 1,
                       num_hidden_layers=args.layers, vocab_size=args.vocab,
                       max_position_embeddings=4096, torch_dtype="bfloat16",
                       architectures=["LlamaForCausalLM"], attn_implementation="sdpa")


def write_checkpoint(directory: str, args) -> int:
    """Random bf16 weights (normal, std 0.02; norms 1) written tensor by tensor in shards of
    200 MB, so that writing never holds the model. Returns the bytes of tensors written."""
    import int4kit
    from int4kit.formats.files import ShardWriter
    from transformers import LlamaForCausalLM
    config = llama_config(args)
    with int4kit.skeleton():
        model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    with ShardWriter(directory, 200 * 10**6) as writer:
        for key, param in model.state_dict(keep_vars=True).items():
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if key.endswith("norm.weight"):
                value = torch.ones(param.shape, dtype=torch.bfloat16)
            else:
                value = (torch.randn(param.shape, generator=g) * 0.02).bfloat16()
            writer.add(key, value)
        writer.finish()
    config.save_pretrained(directory)
    return writer.total_bytes


def calibration(args):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, args.vocab, (args.calib_batch, args.calib_tokens),
                                        generator=g)}
            for _ in range(args.calib_batches)]


def run_one(args) -> None:
    """Child process: one quantize_checkpoint run, a JSON line with its peak and time."""
    import int4kit
    import int4kit.parallel
    import transformers
    transformers.LlamaForCausalLM  # noqa: B018 (imports the modeling code before measuring)
    config = int4kit.QuantConfig(method=args.run, group_size=128, symmetric=False)
    batches = calibration(args) if config.needs_calibration else None
    open("/proc/self/clear_refs", "w").write("5")
    base = rss_mib("VmRSS")
    t0 = time.perf_counter()
    report = int4kit.quantize_checkpoint(args.src, args.out, config, batches, skip=["lm_head"],
                                         max_shard_size="200MB")
    seconds = time.perf_counter() - t0
    print(json.dumps({"method": args.run, "peak_mib": rss_mib("VmHWM") - base,
                      "seconds": seconds, "layers": len(report.swapped)}), flush=True)


def same_as_in_memory(src: str, out: str) -> int:
    """Child process: the in-memory quantize_model (RTN, same options) on the loaded model
    against quantize_checkpoint's files: how many stored tensors differ."""
    import int4kit
    from int4kit.formats.files import CheckpointReader
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=128, symmetric=False),
                           skip=["lm_head"])
    state = model.state_dict()
    reader = CheckpointReader(out)
    return sum(not torch.equal(reader.get(key), state[key]) for key in reader.keys())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=os.path.join(ROOT, "build", "scale"))
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--kv-heads", type=int, default=None,
                   help="key/value heads (default: as many as query heads, hidden / 128)")
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--calib-batch", type=int, default=4)
    p.add_argument("--calib-tokens", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=["gptq", "gptq:mmap", "rtn"],
                   help="METHOD or METHOD:mmap (glibc told to mmap every allocation >= 64 KiB, "
                        "MALLOC_MMAP_THRESHOLD_=65536: freed buffers go straight back)")
    p.add_argument("--run", help=argparse.SUPPRESS)  # child process: one method
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compare:
        print(json.dumps({"differing": same_as_in_memory(args.src, args.out)}), flush=True)
        return 0
    if args.run:
        run_one(args)
        return 0
    shape = f"{args.layers}x{args.hidden}x{args.intermediate}x{args.vocab}x{args.kv_heads or 0}"
    src = os.path.join(args.dir, f"src-{shape}")
    if not os.path.isfile(os.path.join(src, "config.json")):
        print(f"writing {src} ...", flush=True)
        write_checkpoint(src, args)
    from int4kit.formats.files import CheckpointReader
    reader = CheckpointReader(src)
    size = sum(reader.nbytes(key) for key in reader.keys())
    print(f"checkpoint: {args.layers} blocks, hidden {args.hidden}, intermediate "
          f"{args.intermediate}, vocab {args.vocab}, bf16: {size / 2**20:.0f} MiB; calibration "
          f"{args.calib_batches} x {args.calib_batch} x {args.calib_tokens} tokens; group 128 "
          f"asymmetric, lm_head kept; {torch.get_num_threads()} threads")
    print("| method | peak RSS growth (MiB) | share of checkpoint | time | same as in-memory |\n"
          "|---|---|---|---|---|", flush=True)
    common = [sys.executable, os.path.abspath(__file__), "--layers", str(args.layers),
              "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
              "--vocab", str(args.vocab), "--kv-heads", str(args.kv_heads or 0),
              "--calib-batches", str(args.calib_batches),
              "--calib-batch", str(args.calib_batch), "--calib-tokens", str(args.calib_tokens),
              "--src", src]
    for variant in args.methods:
        method, _, allocator = variant.partition(":")
        env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if allocator else {}))
        out = os.path.join(args.dir, f"out-{method}-{shape}")
        shutil.rmtree(out, ignore_errors=True)
        result = subprocess.run(common + ["--run", method, "--out", out], check=True,
                                capture_output=True, text=True, env=env)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        same = "-"
        if method == "rtn":
            compared = subprocess.run(common + ["--compare", "--out", out], check=True,
                                      capture_output=True, text=True)
            differing = json.loads(compared.stdout.strip().splitlines()[-1])["differing"]
            same = "yes, every tensor" if differing == 0 else f"NO: {differing} tensors differ"
        print(f"| {variant} | {row['peak_mib']:.0f} | {row['peak_mib'] * 2**20 / size:.1%} | "
              f"{row['seconds']:.0f} s | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
