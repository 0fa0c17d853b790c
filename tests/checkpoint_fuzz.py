#!/usr/bin/env python3
"""Hostile-checkpoint fuzzer: every file int4kit's checkpoint code reads, mutated, then read.

Seeds (written fresh by `make_seeds`): a native single-file checkpoint, a sharded one with its
index, a Hugging Face folder written by save_pretrained (config.json), and GPTQ (safetensors and
pytorch_model.bin), AWQ and compressed-tensors-style sources. Each case copies one seed, applies
one mutation to one of its files and runs what reads it (load_quantized into a meta skeleton,
convert_checkpoint, `int4kit info`'s describe_checkpoint). The outcome must be one of:

  clear      an exception of the documented kinds (CheckpointError / ValueError / OSError /
             TypeError) with a message: the file was refused;
  identical  the read succeeded and gave exactly the unmutated checkpoint's tensors (the mutation
             hit bytes that carry no meaning, e.g. header padding);
  unguarded  the read succeeded with different values, and the mutation only changed the bytes
             of a tensor that its file has no checksum for (formats without one: GPTQ, AWQ,
             compressed-tensors sources, and the dense tensors transformers writes). Counted and
             reported, not a failure: nothing in such a file can tell;
and never a crash (the runner is a separate process), a hang (a per-case alarm), any other
exception type, or different values where a checksum or the structure could tell.

    python tests/checkpoint_fuzz.py --cases 2000 --seed 1     # a longer local run
tests/test_hostile_files.py runs a fixed-seed, time-bounded profile of it in CI.
"""
import argparse
import json
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import int4kit  # noqa: E402
from int4kit.formats import files as ckfiles  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from int4kit.cli import UserError  # noqa: E402

CLEAR = (int4kit.CheckpointError, ValueError, OSError, TypeError, UserError)
CASE_SECONDS = 30


class Payload:
    """Unpickling this would create a file: weights-only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 32)
        self.a = nn.Linear(32, 48)
        self.b = nn.Linear(48, 32, bias=False)
        self.register_buffer("pos", torch.arange(4), persistent=False)


def small_skeleton():
    with int4kit.skeleton():
        return Small()


def llama():
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      vocab_size=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def llama_skeleton(folder):
    import transformers
    config = transformers.AutoConfig.from_pretrained(folder)
    config.quantization_config = None
    with int4kit.skeleton():
        return transformers.LlamaForCausalLM(config)


# ---- seeds -------------------------------------------------------------------------------------

def make_seeds(root):
    """Writes the seed checkpoints; returns {name: (folder, reader kind)}."""
    import foreign_formats as ff
    seeds = {}
    torch.manual_seed(0)
    model = Small()
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=16, symmetric=False))
    int4kit.save_quantized(model, os.path.join(root, "native"))
    int4kit.save_quantized(model, os.path.join(root, "sharded"), max_shard_size=1500)
    seeds["native"] = (os.path.join(root, "native"), "small")
    seeds["sharded"] = (os.path.join(root, "sharded"), "small")
    hf_model = llama()
    int4kit.quantize_model(hf_model, int4kit.QuantConfig(group_size=16, symmetric=False))
    hf_model.save_pretrained(os.path.join(root, "hf"), max_shard_size="20KB")
    seeds["hf"] = (os.path.join(root, "hf"), "llama")
    # foreign sources of the same tiny Llama
    base = llama()
    tensors_gptq, tensors_awq = {}, {}
    for name, lin in base.named_modules():
        if isinstance(lin, nn.Linear) and name != "lm_head":
            K = lin.in_features
            g_idx = torch.randperm(K) // 16 if "q_proj" in name else torch.arange(K) // 16
            codes, zeros, scales = ff.quantize_asym(lin.weight.detach(), 16, g_idx, False,
                                                    torch.float16)
            zeros[0, 0] = 0
            qweight, qzeros = ff.gptq_pack(codes, zeros, True)
            tensors_gptq.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros,
                                 f"{name}.scales": scales, f"{name}.g_idx": g_idx.to(torch.int32)})
            if "q_proj" not in name:
                qweight, qzeros = ff.awq_pack_gemm(codes, zeros)
                tensors_awq.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros,
                                    f"{name}.scales": scales})
    gptq_config = {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True,
                   "sym": False, "checkpoint_format": "gptq"}
    ff.write_hf_folder(os.path.join(root, "gptq"), base, tensors_gptq, gptq_config)
    seeds["gptq"] = (os.path.join(root, "gptq"), "convert")
    os.makedirs(os.path.join(root, "gptq_bin"))
    torch.save(safetensors.torch.load_file(os.path.join(root, "gptq", "model.safetensors")),
               os.path.join(root, "gptq_bin", "pytorch_model.bin"))
    shutil.copy(os.path.join(root, "gptq", "config.json"), os.path.join(root, "gptq_bin"))
    seeds["gptq_bin"] = (os.path.join(root, "gptq_bin"), "convert")
    ff.write_hf_folder(os.path.join(root, "awq"), base,
                       tensors_awq, {"quant_method": "awq", "bits": 4, "group_size": 16,
                                     "zero_point": True, "version": "gemm"})
    seeds["awq"] = (os.path.join(root, "awq"), "convert")
    # AutoGPTQ's and AutoAWQ's own config files instead of config.json's quantization_config
    ff.write_hf_folder(os.path.join(root, "gptq_legacy"), base, tensors_gptq, None,
                       side_config=("quantize_config.json", {k: v for k, v in gptq_config.items()
                                                              if k != "quant_method"}))
    seeds["gptq_legacy"] = (os.path.join(root, "gptq_legacy"), "convert")
    ff.write_hf_folder(os.path.join(root, "awq_legacy"), base, tensors_awq, None,
                       side_config=("quant_config.json", {"w_bit": 4, "q_group_size": 16,
                                                          "zero_point": True,
                                                          "version": "GEMM"}))
    seeds["awq_legacy"] = (os.path.join(root, "awq_legacy"), "convert")
    # pytorch_model.bin in two shards with their index
    folder = os.path.join(root, "gptq_bin_sharded")
    os.makedirs(folder)
    state = safetensors.torch.load_file(os.path.join(root, "gptq", "model.safetensors"))
    keys = sorted(state)
    parts = {"pytorch_model-00001-of-00002.bin": keys[::2],
             "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in parts.items():
        torch.save({k: state[k] for k in part}, os.path.join(folder, name))
    with open(os.path.join(folder, ckfiles.PT_INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for n, part in parts.items()
                                                  for k in part}}, f)
    shutil.copy(os.path.join(root, "gptq", "config.json"), folder)
    seeds["gptq_bin_sharded"] = (folder, "convert")
    # compressed-tensors, written by compressed-tensors itself
    try:
        import ct_oracle
    except ImportError:  # compressed-tensors not installed: that seed is left out
        return seeds
    ct_oracle.write_ct_checkpoint(llama(), os.path.join(root, "ct"), strategy="group",
                                  group_size=16, symmetric=False, scale_dtype=torch.bfloat16)
    seeds["ct"] = (os.path.join(root, "ct"), "convert")
    return seeds


# ---- reading -------------------------------------------------------------------------------------

def read(folder, kind, scratch, seed_folder):
    """What int4kit's checkpoint code makes of a folder: {tensor name: tensor}. The skeleton
    comes from the unmutated seed (building it is transformers' business, not the reader's)."""
    from int4kit.cli import describe_checkpoint
    describe_checkpoint(folder)
    if kind == "convert":  # what users do with a foreign checkpoint: convert, then load
        out = os.path.join(scratch, "converted")
        shutil.rmtree(out, ignore_errors=True)
        int4kit.convert_checkpoint(folder, out)
        folder = out
    model = small_skeleton() if kind == "small" else llama_skeleton(seed_folder)
    int4kit.load_quantized(model, folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
        for k in a)


# ---- mutations -------------------------------------------------------------------------------------

def header_of(data):
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def with_header(data, header):
    n, _ = header_of(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def data_range(data, header, name):
    n, _ = header_of(data)
    begin, end = header[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


WIDTH = {"F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "I64": 8,
         "F64": 8}


def flip_bits(data, positions, rng):
    for i in positions:
        data = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
    return data


def unchecked_ranges(data):
    """Byte ranges of the tensors a safetensors file has no recorded checksum for."""
    _, header = header_of(data)
    checks = json.loads((header.get("__metadata__") or {}).get(ckfiles.CHECKSUM_KEY, "{}"))
    return [data_range(data, header, k) for k in header
            if k != "__metadata__" and k not in checks]


def mutate(folder, rng, marker):
    """Applies one random mutation to one file of `folder`. Returns (description, unguarded):
    unguarded when it changed nothing but the bytes of tensors their file keeps no checksum for
    (so a different result cannot be told from a real one)."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    target = rng.choice([n for n in names if n.endswith((".safetensors", ".bin", ".json"))])
    path = os.path.join(folder, target)
    data = open(path, "rb").read()
    if target.endswith(".json"):
        kinds = ["truncate", "bitflip", "deep_json", "lie_config", "lie_index"]
    elif target.endswith(".bin"):
        kinds = ["truncate", "bitflip", "pickle"]
    else:
        kinds = ["truncate", "bitflip", "pickle", "header_flip", "inflate", "lie_shape",
                 "lie_dtype", "lie_offsets", "deep_metadata", "data_flip", "pickle_as_bin"]
    kind = rng.choice(kinds)
    unguarded = False
    if kind == "truncate":
        data = data[:rng.randrange(len(data))]
    elif kind in ("bitflip", "data_flip"):
        if kind == "data_flip":
            _, header = header_of(data)
            spans = [data_range(data, header, k) for k in header if k != "__metadata__"]
            begin, end = rng.choice([(b, e) for b, e in spans if e > b])
            positions = [rng.randrange(begin, end)]
        else:
            positions = [rng.randrange(len(data)) for _ in range(rng.randint(1, 8))]
        if target.endswith(".safetensors"):
            ranges = unchecked_ranges(data)
            unguarded = all(any(b <= i < e for b, e in ranges) for i in positions)
        else:
            unguarded = target.endswith(".bin")  # raw tensors in a zip: nothing to check against
        data = flip_bits(data, positions, rng)
    elif kind == "pickle":  # a pickle carrying code where a weight file is expected
        torch.save({"w": torch.zeros(1), "payload": Payload(marker)}, path)
        return f"pickle in place of {target}", False
    elif kind == "pickle_as_bin":  # the folder's only weights: a pytorch_model.bin with code
        for name in names:
            if name.endswith(".safetensors") or name.endswith(".index.json"):
                os.remove(os.path.join(folder, name))
        torch.save({"w": torch.zeros(1), "payload": Payload(marker)},
                   os.path.join(folder, ckfiles.PT_SINGLE_FILE))
        return "a pickle with code as the folder's pytorch_model.bin", False
    elif kind == "header_flip":
        n, _ = header_of(data)
        data = flip_bits(data, [rng.randrange(8, 8 + n)], rng)
    elif kind == "inflate":
        data = struct.pack("<Q", rng.choice([2**63, 2**40, len(data), len(data) + 1,
                                             100 * 2**20])) + data[8:]
    elif kind in ("lie_shape", "lie_dtype", "lie_offsets", "deep_metadata"):
        _, header = header_of(data)
        name = rng.choice(sorted(k for k in header if k != "__metadata__"))
        if kind == "lie_shape":
            shape = header[name]["shape"]
            header[name]["shape"] = [s + rng.choice([-1, 1]) for s in shape] if shape else [2]
        elif kind == "lie_dtype":
            old = header[name]["dtype"]
            header[name]["dtype"] = rng.choice(["F32", "F16", "BF16", "U8", "I64", "I32", "F64",
                                                "BOOL", "F8_E4M3", "X99"])
            # the same width reinterprets the bytes: a data change, which only a checksum sees
            checks = json.loads((header.get("__metadata__") or {}).get(ckfiles.CHECKSUM_KEY,
                                                                       "{}"))
            unguarded = name not in checks and WIDTH.get(old) == WIDTH.get(header[name]["dtype"])
        elif kind == "lie_offsets":
            begin, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = rng.choice(
                [[begin, end + 10**9], [end, begin], [-1, end], [begin + 1, end + 1],
                 [0, 0], [begin, 2**64 - 1]])
        else:
            meta = header.setdefault("__metadata__", {})
            key = rng.choice([int4kit.formats.native.METADATA_KEY, ckfiles.CHECKSUM_KEY])
            meta[key] = "[" * 100000 + "]" * 100000
        data = with_header(data, header)
    elif kind == "deep_json":
        data = b"[" * 200000 + b"]" * 200000
    elif kind == "lie_config":
        content = json.loads(data)
        config = content.get("quantization_config", content) if isinstance(content, dict) else {}
        if isinstance(config, dict) and config.get("layers"):
            layer = rng.choice(sorted(config["layers"]))
            field = rng.choice(["in_features", "out_features", "group_size", "symmetric",
                                "scale_dtype", "bias", "input_perm"])
            value = config["layers"][layer][field]
            config["layers"][layer][field] = (not value if isinstance(value, bool) else
                                             "float64" if field == "scale_dtype" else
                                             rng.choice([-1, 0, 2, 7, 10**12]))
        elif isinstance(config, dict):
            config[rng.choice(["bits", "group_size", "format_version", "quant_method"])] = \
                rng.choice([3, 8, -5, 0, "awq", 2**70, None])
        data = json.dumps(content).encode()
    elif kind == "lie_index":
        content = json.loads(data)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not weight_map:
            return f"lie_index on {target} (not an index: unchanged)", False
        key = rng.choice(sorted(weight_map))
        weight_map[key] = rng.choice(["../outside.safetensors", "/etc/passwd", "nope.safetensors",
                                      sorted(set(weight_map.values()))[0]])
        data = json.dumps(content).encode()
    with open(path, "wb") as f:
        f.write(data)
    return f"{kind} on {target}", unguarded


# ---- runner ------------------------------------------------------------------------------------

class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def differing(a, b):
    keys = sorted(a.keys() ^ b.keys()) or [k for k in a if not (
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]))]
    return ", ".join(keys[:4])


def run(cases, seed, budget_s=None, log=print, keep=None):
    """Runs `cases` mutations (or until budget_s); returns the outcome counts and the failures."""
    rng = random.Random(seed)
    counts = {"clear": 0, "identical": 0, "unguarded": 0}
    kind_counts, seed_counts = {}, {}
    failures = []
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory() as root:
        seeds = make_seeds(os.path.join(root, "seeds"))
        scratch = os.path.join(root, "scratch")
        os.makedirs(scratch)
        originals = {name: read(folder, kind, scratch, folder)
                     for name, (folder, kind) in seeds.items()}
        marker = os.path.join(root, "payload-ran")
        t0 = time.perf_counter()
        for case in range(cases):
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                break
            name = rng.choice(sorted(seeds))
            folder, kind = seeds[name]
            work = os.path.join(root, "case")
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(folder, work)
            what, unguarded = mutate(work, rng, marker)
            kind_counts[what.split(" ")[0]] = kind_counts.get(what.split(" ")[0], 0) + 1
            seed_counts[name] = seed_counts.get(name, 0) + 1
            signal.alarm(CASE_SECONDS)
            try:
                result = read(work, kind, scratch, folder)
                outcome = ("identical" if same(result, originals[name]) else
                           "unguarded" if unguarded else
                           f"SILENTLY DIFFERENT: {differing(result, originals[name])}")
            except Hang:
                outcome = "HANG"
            except CLEAR as error:
                outcome = "clear" if str(error) else "EMPTY MESSAGE"
            except Exception as error:  # noqa: BLE001  (any other type is a finding)
                outcome = f"UNEXPECTED {type(error).__name__}: {str(error)[:200]}"
                traceback.print_exc(limit=3)
            finally:
                signal.alarm(0)
            if os.path.exists(marker):
                outcome = "PICKLED CODE RAN"
                os.remove(marker)
            if outcome in counts:
                counts[outcome] += 1
            else:
                if keep:  # the mutated folder, to turn into a regular test
                    shutil.copytree(work, os.path.join(keep, f"case{case}-{name}"))
                failures.append({"case": case, "seed": name, "mutation": what,
                                 "outcome": outcome})
                log(f"case {case} ({name}, {what}): {outcome}")
    return {"cases": sum(counts.values()) + len(failures), "counts": counts,
            "mutations": kind_counts, "seeds": seed_counts, "failures": failures,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--keep", metavar="DIR", help="copy each failing case's folder here")
    args = parser.parse_args(argv)
    summary = run(args.cases, args.seed, args.budget, keep=args.keep)
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
