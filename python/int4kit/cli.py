"""The `int4kit` command.

    int4kit quantize MODEL_DIR OUT_DIR --method gptq --group-size 128 [--symmetric] [--act-order]
                     [--calib FILE] [--scale-dtype bfloat16] [--bits 8] [--bits-per-weight 4.5]
                     [--stream]
    int4kit convert SRC DST [--to int4kit|gptq|gptq_v2|compressed-tensors] [--lossy]
    int4kit info CHECKPOINT
    int4kit shift CHECKPOINT --data FILE
    int4kit eval [--methods rtn,gptq] [--settings "g128 asym"]
    int4kit bench [--quick] [--plot FILE] [bench/bench_linear.py options]

A user mistake (a missing folder, a bad option, a checkpoint that is not what it claims) ends with
one line on stderr and exit code 2, never a traceback.
"""
import argparse
import json
import os
import sys
from typing import List, Optional

EXIT_USER_ERROR = 2
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line."""


def _offline():
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---- quantize ----------------------------------------------------------------------------------

def read_calibration_text(path: Optional[str], option: str = "--calib") -> List[str]:
    """Calibration samples: one per non-empty line of a text file, or a JSON list of strings
    (.json); int4kit's built-in English sentences when no file is given. Errors name
    `option`."""
    if path is None:
        from .eval_data import CALIBRATION
        return list(CALIBRATION)
    if not os.path.isfile(path):
        raise UserError(f"{option} {path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            samples = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{option} {path!r}: not valid JSON ({error})") from None
        if not isinstance(samples, list) or not all(isinstance(s, str) for s in samples):
            raise UserError(f"{option} {path!r}: expected a JSON list of strings")
    else:
        samples = [line.strip() for line in text.splitlines() if line.strip()]
    if not samples:
        raise UserError(f"{option} {path!r}: holds no text")
    return samples


def cmd_quantize(args) -> int:
    _offline()
    import torch
    import transformers
    from . import QuantConfig, hf, quantize_model

    if not os.path.isdir(args.model_dir):
        raise UserError(f"MODEL_DIR {args.model_dir!r} is not a folder")
    try:
        config = transformers.AutoConfig.from_pretrained(args.model_dir)
    except (OSError, ValueError) as error:
        raise UserError(f"MODEL_DIR {args.model_dir!r} is not a Hugging Face model folder "
                        f"({str(error).splitlines()[0]})") from None
    if args.stream and args.bits_per_weight is not None:
        raise UserError("--bits-per-weight measures the loaded model; it does not combine with "
                        "--stream")
    quant_config = QuantConfig(group_size=args.group_size, symmetric=args.symmetric,
                               method=args.method, act_order=args.act_order,
                               clip_search=args.clip_search, refine_rounds=args.refine_rounds,
                               reconstruction=args.reconstruction, show_progress=True,
                               scale_dtype=None if args.scale_dtype is None
                               else getattr(torch, args.scale_dtype), bits=args.bits)
    if args.stream:
        return _quantize_streaming(args, quant_config)
    model = hf.model_class(config).from_pretrained(args.model_dir, dtype=torch.float32).eval()
    calib = None
    tokenizer = None
    if quant_config.needs_calibration or args.calib or args.bits_per_weight is not None:
        tokenizer, calib = _text_batches(args.model_dir, args.calib, "--calib", args)
    plan = None
    if args.bits_per_weight is not None:
        plan = _mixed_precision_plan(model, quant_config, calib, args)
    report = quantize_model(model, quant_config,
                            calib_data=calib if quant_config.needs_calibration or plan else None,
                            skip=args.skip, layer_configs=plan)
    model.save_pretrained(args.out_dir, max_shard_size=args.max_shard_size)
    _copy_tokenizer(tokenizer, args)
    print(report)
    print(f"saved {args.out_dir}")
    return 0


def _text_batches(folder: str, path: Optional[str], option: str, args):
    """(the tokenizer of `folder`, token batches of the text file at `path`, read as
    read_calibration_text reads it; --batch-size, --max-length)."""
    import transformers
    from .eval import batches
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    samples = read_calibration_text(path, option)
    return tokenizer, batches(tokenizer, samples, batch_size=args.batch_size,
                              max_length=args.max_length)


def _quantize_streaming(args, quant_config) -> int:
    """--stream: quantize_checkpoint, block by block from the files (docs/SCALE.md)."""
    from . import quantize_checkpoint
    tokenizer, calib = (_text_batches(args.model_dir, args.calib, "--calib", args)
                        if quant_config.needs_calibration else (None, None))
    report = quantize_checkpoint(args.model_dir, args.out_dir, quant_config, calib,
                                 skip=args.skip, max_shard_size=args.max_shard_size)
    _copy_tokenizer(tokenizer, args)
    print(report)
    allocator = os.environ.get(STREAM_ALLOCATOR[0])
    print(f"streamed block by block (glibc {STREAM_ALLOCATOR[0]}={allocator})" if allocator
          else "streamed block by block")
    print(f"saved {args.out_dir}")
    return 0


def _copy_tokenizer(tokenizer, args) -> None:
    import transformers
    try:
        (tokenizer or transformers.AutoTokenizer.from_pretrained(args.model_dir)).save_pretrained(
            args.out_dir)
    except (OSError, ValueError):
        pass  # a model folder without a tokenizer: nothing to copy


# --stream runs with this glibc setting from the process's start: every allocation of 64 KiB or
# more gets its own mapping, so what a block frees goes back to the system (without it the peak
# is ~160 MiB higher on a 2048-wide Llama, and it cannot be set once the heap holds freed
# chunks: docs/SCALE.md)
STREAM_ALLOCATOR = ("MALLOC_MMAP_THRESHOLD_", "65536")


# group sizes --bits-per-weight chooses among (with --group-size's, int8 per channel, and dense)
MIXED_GROUP_SIZES = (128, 64, 32)


def _mixed_precision_plan(model, quant_config, calib, args):
    """--bits-per-weight: the sensitivity of every layer to the configured method at
    --group-size and MIXED_GROUP_SIZES, as int8 per channel where the method quantizes int8
    (rtn, gptq), and dense; then the plan within the budget."""
    import dataclasses
    from . import measure_sensitivity, plan_mixed_precision
    from .quant.config import INT8_METHODS
    if quant_config.bits != 4:
        raise UserError("--bits-per-weight plans int4 layers (with int8 and dense ones); "
                        "use --bits 4 with it")
    sizes = dict.fromkeys([args.group_size, *MIXED_GROUP_SIZES])
    candidates = [dataclasses.replace(quant_config, group_size=g, show_progress=False)
                  for g in sizes]
    if quant_config.method in INT8_METHODS:
        candidates.append(dataclasses.replace(quant_config, bits=8, group_size=-1,
                                              refine_rounds=0, show_progress=False))
    table = measure_sensitivity(model, candidates, calib, skip=args.skip)
    try:
        plan = plan_mixed_precision(table, bits_per_weight=args.bits_per_weight)
    except ValueError as error:
        raise UserError(f"--bits-per-weight: {error}") from None
    print(plan)
    return plan


# ---- convert, info -------------------------------------------------------------------------------

def cmd_convert(args) -> int:
    from .formats import convert_checkpoint
    report = convert_checkpoint(args.src, args.dst, to=args.to, lossy=args.lossy,
                                max_shard_size=args.max_shard_size)
    print(report)
    print(f"saved {args.dst}")
    return 0


def describe_checkpoint(path: str) -> str:
    """What `int4kit info` prints: format, layers, methods, bits per weight, size, version."""
    from .formats import vllm
    from .formats.convert import detect_format
    from .formats.files import CheckpointReader
    from .formats.native import layer_bits, layer_keys, read_quantization_config
    if not os.path.exists(path):
        raise UserError(f"CHECKPOINT {path!r} does not exist")
    reader = CheckpointReader(path)
    fmt = detect_format(reader.directory, reader)
    size = sum(os.path.getsize(f) for f in reader.files())
    lines = [f"{path}: {fmt.name} checkpoint, {len(reader.files())} file(s), "
             f"{size / 2**20:.2f} MiB"]
    if fmt.name != "int4kit":
        lines.append(f"  quantization config: {json.dumps(fmt.config, sort_keys=True)}")
        if fmt.name != "awq":
            lines += _vllm_lines(vllm.foreign_layer_shapes(reader, fmt), reader,
                                 "vLLM tensor parallel")
        lines.append("  convert it with: int4kit convert SRC DST")
        return "\n".join(lines)
    config = read_quantization_config(reader)
    layers = config["layers"]
    weights = quantized_bytes = 0
    for name, settings in layers.items():
        weights += settings["in_features"] * settings["out_features"]
        quantized_bytes += sum(reader.nbytes(key) for key in layer_keys(name, settings)
                               if not key.endswith((".bias", ".input_sq_mean")))
    total_tensor_bytes = sum(reader.nbytes(key) for key in reader.keys())
    count_by = {}
    for settings in layers.values():
        kind = ("W8A16" if layer_bits(settings) == 8 else
                "W4A8" if settings["act_quant"] == "int8" else "W4A16")
        key = (settings["method"] or "unknown", settings["group_size"],
               "sym" if settings["symmetric"] else "asym", settings["scale_dtype"], kind)
        count_by[key] = count_by.get(key, 0) + 1
    lines += [f"  format version {config['format_version']}, {len(layers)} quantized layers, "
              f"{weights / 1e6:.2f} M quantized weights",
              f"  bits per quantized weight: {8 * quantized_bytes / max(weights, 1):.3f} "
              f"(codes, scales, zero points, input_scale/input_perm)",
              f"  quantized layers {quantized_bytes / 2**20:.2f} MiB, other tensors "
              f"{(total_tensor_bytes - quantized_bytes) / 2**20:.2f} MiB"]
    for (method, group, sym, dtype, act), count in sorted(count_by.items(), key=str):
        lines.append(f"  {count:4d} x method {method}, group size {group}, {sym}, "
                     f"{dtype} scales, {act}")
    int8 = [name for name, settings in layers.items() if layer_bits(settings) == 8]
    if int8:
        lines.append(f"  not exportable to GPTQ or compressed-tensors (vLLM): {len(int8)} int8 "
                     f"layer(s), e.g. {int8[0]}")
    else:
        lines += _vllm_lines(vllm.native_layer_shapes(reader), reader,
                             "vLLM tensor parallel, once exported to GPTQ or compressed-tensors")
    return "\n".join(lines)


def _vllm_lines(shapes, reader, title: str) -> List[str]:
    """The TP sizes vLLM can serve these layers at (formats/vllm.py), as `info` lines."""
    from .formats import vllm
    support = vllm.tp_support(shapes, vllm.hf_config_of(reader.directory))
    return [f"  {title}:"] + [f"    {line}" for line in vllm.summary(support).splitlines()]


def cmd_info(args) -> int:
    print(describe_checkpoint(args.checkpoint))
    return 0


def cmd_shift(args) -> int:
    """How far --data is from the calibration data of a quantized checkpoint (shift_report)."""
    _offline()
    import transformers
    from . import hf, shift_report
    if not os.path.isdir(args.checkpoint):
        raise UserError(f"CHECKPOINT {args.checkpoint!r} is not a folder")
    config = transformers.AutoConfig.from_pretrained(args.checkpoint)
    model = hf.model_class(config).from_pretrained(args.checkpoint).eval()
    _, data = _text_batches(args.checkpoint, args.data, "--data", args)
    print(shift_report(model, data))
    return 0


# ---- eval, bench ---------------------------------------------------------------------------------

def cmd_eval(args) -> int:
    _offline()
    from . import eval as ev
    try:
        methods, settings = ev.pick(args.methods, "methods"), ev.pick(args.settings, "settings")
    except ValueError as error:
        raise UserError(str(error)) from None
    rows = ev.run(methods, settings)
    print()
    print(ev.markdown_table(rows))
    return 0


def cmd_bench(args, rest: List[str]) -> int:
    script_dir = os.path.join(ROOT, "bench")
    if not os.path.isfile(os.path.join(script_dir, "bench_linear.py")):
        raise UserError("int4kit bench runs bench/bench_linear.py from int4kit's source folder, "
                        "which this installation does not have")
    sys.path.insert(0, script_dir)
    import bench_linear
    argv = list(rest) + ["--plot", args.plot]
    if args.quick:
        argv += ["--quick", "--mode", "hot", "--m", "1", "4", "16", "64", "128"]
    return bench_linear.main(argv) or 0


# ---- entry point ---------------------------------------------------------------------------------

# quant.config.METHODS, spelled out: importing it would import torch before --help prints
QUANT_METHODS = ("rtn", "hqq", "gptq", "awq", "awq+gptq", "adaround")


def _group_size(text: str):
    """--group-size: an int, or 'tensor'."""
    if text == "tensor":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'tensor', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="int4kit", description="INT4 weight quantization: "
                                     "quantize, convert, inspect, evaluate, benchmark")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a Hugging Face model folder and save it")
    q.add_argument("model_dir", metavar="MODEL_DIR")
    q.add_argument("out_dir", metavar="OUT_DIR")
    q.add_argument("--method", default="gptq", choices=QUANT_METHODS)
    q.add_argument("--reconstruction", default="layer", choices=("layer", "block"),
                   help="adaround: learn each layer's rounding alone, or a block's at once")
    q.add_argument("--group-size", type=_group_size, default=128,
                   help="-1: per output channel; tensor: one scale per weight matrix")
    q.add_argument("--symmetric", action="store_true", help="zero point fixed at 8")
    q.add_argument("--act-order", action="store_true", help="GPTQ visits columns by Hessian size")
    q.add_argument("--clip-search", action="store_true", help="MSE-optimal clipping of each group")
    q.add_argument("--refine-rounds", type=int, default=0,
                   help="least-squares refits of the group scales and zero points (gptq, "
                        "awq+gptq, layer-wise adaround)")
    q.add_argument("--stream", action="store_true",
                   help="quantize block by block from the files without loading the model "
                        "(models larger than memory; resumes after an interruption; "
                        "calibrated methods need --skip lm_head: docs/SCALE.md)")
    q.add_argument("--bits", type=int, default=4, choices=(4, 8),
                   help="8: weight-only int8 (Int8Linear; methods rtn and gptq)")
    q.add_argument("--bits-per-weight", type=float, metavar="BITS",
                   help="mixed precision: measure each layer's sensitivity to the method at "
                        "--group-size, 128, 64 and 32, as int8 per channel (rtn, gptq) and "
                        "dense, and keep the model within BITS bits per weight over its linear "
                        "layers (docs/MIXED_PRECISION.md)")
    q.add_argument("--scale-dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the stored scales and zero points (default: the model's, "
                        "float32; 16-bit ones save 0.25 bits per weight at group size 128)")
    q.add_argument("--calib", metavar="FILE", help="calibration text: one sample per line, or a "
                   "JSON list of strings (default: int4kit's built-in English sentences)")
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--max-length", type=int, default=128, help="tokens per calibration sample")
    q.add_argument("--skip", nargs="*", default=[], metavar="LAYER",
                   help="layer names or fnmatch patterns to keep dense")
    q.add_argument("--max-shard-size", default="5GB")

    c = sub.add_parser("convert", help="GPTQ / AWQ / compressed-tensors <-> int4kit checkpoints")
    c.add_argument("src", metavar="SRC")
    c.add_argument("dst", metavar="DST")
    c.add_argument("--to", default="int4kit",
                   choices=("int4kit", "gptq", "gptq_v2", "compressed-tensors"))
    c.add_argument("--lossy", action="store_true",
                   help="re-quantize layers the target cannot hold exactly")
    c.add_argument("--max-shard-size", default="5GB")

    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("checkpoint", metavar="CHECKPOINT")

    sh = sub.add_parser("shift", help="how far text is from a quantized model's calibration "
                                      "data, per layer (docs/ACCURACY.md)")
    sh.add_argument("checkpoint", metavar="CHECKPOINT")
    sh.add_argument("--data", required=True, metavar="FILE",
                    help="text: one sample per line, or a JSON list of strings")
    sh.add_argument("--batch-size", type=int, default=32)
    sh.add_argument("--max-length", type=int, default=128)

    e = sub.add_parser("eval", help="the accuracy harness on all-MiniLM-L6-v2")
    e.add_argument("--methods", help="comma-separated method labels (default: all)")
    e.add_argument("--settings", help="comma-separated setting labels (default: all)")

    b = sub.add_parser("bench", help="kernel benchmark table and a PNG of speedup vs batch size; "
                       "other options go to bench/bench_linear.py")
    b.add_argument("--plot", default="int4kit_bench.png", metavar="FILE")
    b.add_argument("--quick", action="store_true", help="hot weights, M = 1..128, short runs")
    return parser


def _restart_with_stream_allocator() -> None:
    """Runs this command again in a process that starts with STREAM_ALLOCATOR in its
    environment (once: a user's own setting is kept)."""
    name, value = STREAM_ALLOCATOR
    if name in os.environ or not sys.platform.startswith("linux"):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "int4kit.cli", *sys.argv[1:]],
              dict(os.environ, **{name: value}))


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if argv is None and args.command == "quantize" and args.stream:
        _restart_with_stream_allocator()
    from .formats.files import CheckpointError
    try:
        if args.command == "bench":
            return cmd_bench(args, rest)
        return {"quantize": cmd_quantize, "convert": cmd_convert, "info": cmd_info,
                "shift": cmd_shift, "eval": cmd_eval}[args.command](args)
    except (UserError, CheckpointError, ValueError, TypeError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"int4kit {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
