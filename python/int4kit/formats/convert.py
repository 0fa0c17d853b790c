"""convert_checkpoint: GPTQ, AWQ and compressed-tensors checkpoints into int4kit's native format,
and native checkpoints out to GPTQ (v1, v2) and compressed-tensors, one shard at a time and
without building the model. Tensors that are not quantized layers pass through untouched;
files beside the weights (tokenizer, generation config) are copied.
"""
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch

from .. import ops
from ..nn import INPUT_STATS, dequantized_weight
from . import awq, compressed_tensors as ct, gptq, vllm
from .packing import NotRepresentable
from .files import (CONFIG_FILE, INDEX_FILE, PT_INDEX_FILE, CheckpointError, CheckpointReader, ShardWriter,
                    check_src_dst, parse_size, read_json, write_json_atomic)
from .native import (FORMAT_VERSION, METADATA_KEY, QUANT_METHOD, check_checksums_present,
                     check_layer_tensors,
                     layer_bits, layer_keys, read_quantization_config, read_layer,
                     set_config_json)

SOURCES = ("int4kit", "gptq", "gptq_v2", "awq", "compressed-tensors")
TARGETS = ("int4kit", "gptq", "gptq_v2", "compressed-tensors")
# configs other tools write beside the weights; a converted folder drops the source's own
_SIDE_CONFIGS = ("quantize_config.json", "quant_config.json")
# weight files are converted, never copied (a pickle is never passed on)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class ConvertReport:
    source: str
    target: str
    layers: int = 0
    files: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # per-layer facts worth knowing
    max_weight_error: float = 0.0  # largest |w - w_converted| over re-quantized layers (lossy)
    # exports: the TP sizes vLLM can serve the result at (formats/vllm.py summary lines)
    vllm_tp: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"int4kit: converted {self.layers} quantized layers from {self.source} to "
                 f"{self.target} ({len(self.files)} files)"]
        lines += [f"  note: {note}" for note in self.notes]
        if self.max_weight_error:
            lines.append(f"  lossy: largest weight error {self.max_weight_error:.3g}")
        if self.vllm_tp:
            lines.append("  vLLM tensor parallel:")
            lines += [f"    {line}" for line in self.vllm_tp]
        return "\n".join(lines)


@dataclass
class SourceFormat:
    name: str  # one of SOURCES
    config: dict  # the quantization config as found
    group_size: int = -1
    version: str = ""  # gptq: "gptq" | "gptq_v2"; awq: "gemm" | "gemv"


def _quant_config_of(directory: str) -> Tuple[Optional[dict], str]:
    """The quantization config a folder carries and the file it came from."""
    path = os.path.join(directory, CONFIG_FILE)
    if os.path.isfile(path):
        config = read_json(path)
        if isinstance(config, dict) and isinstance(config.get("quantization_config"), dict):
            return config["quantization_config"], path
    for name in _SIDE_CONFIGS:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            config = read_json(path)
            if isinstance(config, dict):
                return config, path
    return None, directory


def _group_size(config: dict, keys, source: str) -> int:
    for key in keys:
        if key in config:
            value = config[key]
            if not isinstance(value, int) or isinstance(value, bool) or (
                    value != -1 and value <= 0):
                raise CheckpointError(f"{source}: {key} must be -1 or a positive int, got {value!r}")
            return value
    raise CheckpointError(f"{source}: the quantization config has no {' or '.join(keys)}")


def _bits(config: dict, keys, source: str) -> None:
    for key in keys:
        if key in config and config[key] != 4:
            raise CheckpointError(f"{source}: {key}={config[key]!r}; int4kit reads 4-bit weights "
                                  f"only")


def detect_format(directory: str, reader: CheckpointReader) -> SourceFormat:
    """Which quantized format a checkpoint folder holds, with the settings its config gives."""
    config, source = _quant_config_of(directory)
    if config is None:
        read_quantization_config(reader)  # raises "not an int4kit checkpoint" when it is not
        return SourceFormat("int4kit", {})
    method = str(config.get("quant_method", "")).lower()
    if method == "" and "w_bit" in config:  # AutoAWQ's quant_config.json
        method = "awq"
    if method == "" and "desc_act" in config:  # AutoGPTQ's quantize_config.json
        method = "gptq"
    if method == QUANT_METHOD:
        return SourceFormat("int4kit", config)
    if method == "gptq":
        _bits(config, ("bits",), source)
        fmt = str(config.get("checkpoint_format", "gptq")).lower()
        if fmt == "marlin" or config.get("is_marlin_format"):
            raise CheckpointError(f"{source}: legacy Marlin-format GPTQ checkpoints (repacked for "
                                  f"the Marlin kernel) are not supported; convert the original "
                                  f"GPTQ checkpoint instead")
        if fmt not in gptq.VERSIONS:
            raise CheckpointError(f"{source}: GPTQ checkpoint_format {fmt!r} is not supported "
                                  f"(supported: {', '.join(gptq.VERSIONS)})")
        return SourceFormat("gptq" if fmt == "gptq" else "gptq_v2", config,
                            _group_size(config, ("group_size",), source), fmt)
    if method == "awq":
        _bits(config, ("bits", "w_bit"), source)
        version = str(config.get("version", "gemm")).lower()
        if version not in awq.VERSIONS:
            raise CheckpointError(f"{source}: AWQ version {version!r} is not supported "
                                  f"(supported: {', '.join(awq.VERSIONS)})")
        if config.get("zero_point", True) is False:
            raise CheckpointError(f"{source}: AWQ without zero points is not supported")
        return SourceFormat("awq", config, _group_size(config, ("group_size", "q_group_size"),
                                                       source), version)
    if method == "compressed-tensors":
        ct.check_config(config, source)
        return SourceFormat("compressed-tensors", config)
    raise CheckpointError(f"{source}: quant_method {config.get('quant_method')!r} is not one "
                          f"int4kit converts (gptq, awq, compressed-tensors, int4kit)")


# ---- foreign -> native ----------------------------------------------------------------------------

def _layer_index(reader: CheckpointReader, marker: str, suffixes) -> Dict[str, str]:
    """Tensor name -> its layer's prefix, for every layer that has a `marker` tensor."""
    prefixes = {key[: -len(marker) - 1] for key in reader.keys() if key.endswith("." + marker)}
    return {f"{prefix}.{suffix}": prefix for prefix in prefixes for suffix in suffixes
            if f"{prefix}.{suffix}" in reader}


def _layers_in_shard_order(reader: CheckpointReader, layer_of: Dict[str, str],
                           writer: ShardWriter):
    """Walks the source one shard at a time: tensors of no quantized layer go to `writer` as they
    are; each layer's name is yielded once, where its first tensor is met (its other tensors
    may lie in other shards: the reader fetches them)."""
    done = set()
    for keys in reader.keys_by_file().values():
        for key in keys:
            layer = layer_of.get(key)
            if layer is None:
                writer.add(key, reader.get(key))
            elif layer not in done:
                done.add(layer)
                yield layer


def _import(reader: CheckpointReader, fmt: SourceFormat, writer: ShardWriter,
            report: ConvertReport) -> dict:
    if fmt.name in ("gptq", "gptq_v2"):
        marker, suffixes = "qweight", ("qweight", "qzeros", "scales", "g_idx", "bias")
        required = ("qweight", "qzeros", "scales")
    elif fmt.name == "awq":
        marker, suffixes = "qweight", ("qweight", "qzeros", "scales", "bias")
        required = ("qweight", "qzeros", "scales")
    else:
        marker, suffixes = "weight_packed", ct.SUFFIXES
        required = ("weight_packed", "weight_scale", "weight_shape")
    layer_of = _layer_index(reader, marker, suffixes)
    # a layer's other tensors without its marker: a damaged name, never a dense tensor
    orphans = [key for key in reader.keys() if key not in layer_of and
               key.rpartition(".")[2] in set(required[1:]) | {"g_idx", "weight_g_idx",
                                                             "weight_zero_point"}]
    if orphans:
        raise CheckpointError(f"{reader.file_of(orphans[0])}: tensor {orphans[0]!r} belongs to a "
                              f"quantized layer, which has no {marker!r} tensor")
    layers: Dict[str, dict] = {}
    overflowed = {}
    for prefix in _layers_in_shard_order(reader, layer_of, writer):
        where = f"{reader.file_of(f'{prefix}.{marker}')}: {prefix}"
        missing = [s for s in required if f"{prefix}.{s}" not in reader]
        if missing:
            raise CheckpointError(f"{where}: the layer lacks {', '.join(missing)} (a {fmt.name} "
                                  f"layer has {', '.join(required)})")
        tensors = {s: reader.get(f"{prefix}.{s}") for s in suffixes if f"{prefix}.{s}" in reader}
        try:
            if fmt.name == "awq":
                out, settings = awq.awq_to_canonical(tensors, fmt.group_size, fmt.version, where)
            elif fmt.name == "compressed-tensors":
                out, settings = ct.ct_to_canonical(tensors, ct.scheme_of(fmt.config, prefix, where),
                                                   where)
            else:
                out, settings, count = gptq.gptq_to_canonical(tensors, fmt.group_size,
                                                              fmt.version, where)
                if count:
                    overflowed[prefix] = count
        except (ValueError, ZeroDivisionError) as error:
            raise CheckpointError(str(error)) from None
        # what the layer became must be a valid native layer (bias shape, finite scales, ...)
        check_layer_tensors(out, settings, lambda short: f"{where}: its {short}")
        for short, tensor in out.items():
            writer.add(f"{prefix}.{short}", tensor)
        layers[prefix] = settings
    if overflowed:
        report.notes.append(
            f"{sum(overflowed.values())} zero points in {len(overflowed)} layers (e.g. "
            f"{next(iter(overflowed))}) read as 16: the GPTQ v1 packer stored a zero point of 0 "
            f"as -1, which also overwrote the zero points above it in its word; kept as every "
            f"v1 reader computes them")
    if not layers:
        raise CheckpointError(f"{reader.directory}: no quantized layer (no '*.{marker}' tensor) "
                              f"in a {fmt.name} checkpoint")
    report.layers = len(layers)
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": 4,
            "layers": layers, "aliases": {}}


# ---- native -> foreign ----------------------------------------------------------------------------

def _requantize(tensors, settings, symmetric: bool, report: ConvertReport, where: str):
    """Lossy: the layer's weight quantized again with round-to-nearest, without input_perm or
    input_scale; returns canonical tensors and records the largest weight error."""
    dense = dequantized_weight(tensors["qweight"], tensors["scales"], tensors.get("zeros"),
                               settings["group_size"], settings["in_features"],
                               tensors.get("input_scale"), tensors.get("input_perm"))
    scale_dtype = tensors["scales"].dtype
    qweight, scales, zeros = ops.quantize(dense.to(scale_dtype), settings["group_size"], symmetric)
    out = {"qweight": qweight, "scales": scales}
    if not symmetric:
        out["zeros"] = zeros
    if "bias" in tensors:
        out["bias"] = tensors["bias"]
    error = (ops.dequantize(qweight, scales, out.get("zeros"), settings["group_size"],
                            settings["in_features"], torch.float32) - dense).abs().max().item()
    report.max_weight_error = max(report.max_weight_error, error)
    report.notes.append(f"{where}: re-quantized (round-to-nearest), largest weight error {error:.3g}")
    return out


def _export_layer(tensors, settings, to: str, lossy: bool, report: ConvertReport, where: str):
    """One native layer -> (the target's tensors by short name, the settings they hold: a
    re-quantized layer has no input_perm or input_scale and may have changed symmetry)."""
    K, G = settings["in_features"], settings["group_size"]
    if settings["act_quant"]:
        report.notes.append(f"{where}: act_quant={settings['act_quant']!r} is a run-time setting "
                            f"of int4kit; {to} stores the weights only")

    def convert(t):
        if to == "compressed-tensors":
            return ct.canonical_to_ct(t["qweight"], t["scales"], t.get("zeros"), G, K,
                                      t.get("input_perm"), where)
        return gptq.canonical_to_gptq(t["qweight"], t["scales"], t.get("zeros"), G, K,
                                      t.get("input_perm"), to, where)

    try:
        if "input_scale" in tensors:
            raise NotRepresentable(f"{where}: has an input_scale (AWQ's unfolded 1/s), which "
                                   f"{to} cannot store")
        out = convert(tensors)
    except NotRepresentable as error:
        if not lossy:
            raise NotRepresentable(f"{error}; pass lossy=True to re-quantize") from None
        # the layer keeps its symmetry, except for v1, which holds zero points 1..16 only:
        # symmetric (z = 8) always fits there
        symmetric = settings["symmetric"] or to == "gptq"
        tensors = _requantize(tensors, settings, symmetric, report, where)
        settings = dict(settings, symmetric=symmetric, input_perm=False, input_scale=False)
        out = convert(tensors)
    if "bias" in tensors:
        out["bias"] = tensors["bias"]
    return out, settings


def _check_group_sizes(to: str, layers: Dict[str, dict], source: str) -> None:
    sizes = {s["group_size"] for s in layers.values()}
    if to != "compressed-tensors" and len(sizes) != 1:
        raise CheckpointError(f"{source}: GPTQ has one group size per checkpoint; these layers "
                              f"use {sorted(sizes)}")


def _target_config(to: str, layers: Dict[str, dict]) -> dict:
    """The target's quantization_config for the layers as written (after any re-quantization)."""
    if to == "compressed-tensors":
        return ct.make_config(layers)
    return {"quant_method": "gptq", "bits": 4,
            "group_size": next(iter(layers.values()))["group_size"],
            "desc_act": any(s["input_perm"] for s in layers.values()),
            "sym": all(s["symmetric"] for s in layers.values()), "static_groups": False,
            "true_sequential": True, "checkpoint_format": to, "damp_percent": 0.01,
            "lm_head": False}


def _export(reader: CheckpointReader, to: str, lossy: bool, writer: ShardWriter,
            report: ConvertReport) -> dict:
    native = read_quantization_config(reader)
    layers = native["layers"]
    int8 = [name for name, s in layers.items() if layer_bits(s) != 4]
    if int8:
        raise CheckpointError(f"{reader.directory}: layer {int8[0]!r} is int8 (bits 8), which "
                              f"{to} files cannot hold (int4kit exports int4 layers only); "
                              f"quantize it to int4 or keep the native format")
    check_checksums_present(reader, layers)
    _check_group_sizes(to, layers, reader.directory)
    written: Dict[str, dict] = {}
    layer_of = {key: name for name, s in layers.items() for key in layer_keys(name, s)}
    for name in _layers_in_shard_order(reader, layer_of, writer):
        tensors = read_layer(reader, name, layers[name])
        where = f"{reader.file_of(layer_keys(name, layers[name])[0])}: {name}"
        try:
            out, written[name] = _export_layer(tensors, layers[name], to, lossy, report, where)
        except ValueError as error:
            raise CheckpointError(str(error)) from None
        for short, tensor in out.items():
            writer.add(f"{name}.{short}" if name else short, tensor)
    for alias, original in native.get("aliases", {}).items():
        writer.add(alias, reader.get(original))  # other tools expect every name present
    with_stats = sum(bool(s.get(INPUT_STATS)) for s in layers.values())
    if with_stats:
        report.notes.append(f"{with_stats} layers' calibration statistics ({INPUT_STATS}, for "
                            f"int4kit.shift_report) stay behind: {to} has no place for them")
    report.layers = len(layers)
    shapes = {name: vllm.LayerShape(s["out_features"], s["in_features"], s["group_size"])
              for name, s in written.items()}
    report.vllm_tp = vllm.summary(vllm.tp_support(
        shapes, vllm.hf_config_of(reader.directory))).splitlines()
    return _target_config(to, written)


def convert_checkpoint(src: Union[str, os.PathLike], dst: Union[str, os.PathLike],
                       to: str = "int4kit", lossy: bool = False,
                       max_shard_size: Union[int, str] = "5GB") -> ConvertReport:
    """Converts the quantized checkpoint folder `src` into `dst`.

    to="int4kit" (default): src may be GPTQ (v1 "gptq" or "gptq_v2", act-order included), AWQ
      (GEMM or GEMV) or compressed-tensors pack-quantized; the result loads with
      load_quantized / from_pretrained, exactly as the source format dequantizes.
    to="gptq" | "gptq_v2" | "compressed-tensors": src must be an int4kit checkpoint; exact where
      the target can hold the weights, else a CheckpointError naming the layer and the reason,
      unless lossy=True, which re-quantizes those layers (round-to-nearest) and reports the
      largest weight error.
    The model is never built; one source shard and one layer are in memory at a time.
    """
    if to not in TARGETS:
        raise ValueError(f"to must be one of {', '.join(TARGETS)}, got {to!r}")
    src, dst = check_src_dst(src, dst)
    max_bytes = parse_size(max_shard_size)
    reader = CheckpointReader(src)
    fmt = detect_format(src, reader)
    if to == "int4kit" and fmt.name == "int4kit":
        raise ValueError(f"{src} is already an int4kit checkpoint; to= names the target format "
                         f"(gptq, gptq_v2, compressed-tensors)")
    if to != "int4kit" and fmt.name != "int4kit":
        raise ValueError(f"{src} is a {fmt.name} checkpoint; convert it to int4kit first, "
                         f"then to {to}")
    report = ConvertReport(fmt.name, to)
    with ShardWriter(dst, max_bytes) as writer:
        if to == "int4kit":
            config = _import(reader, fmt, writer, report)
            set_config_json(dst, None)  # a config.json from an earlier save must not outlive it
            report.files = writer.finish({METADATA_KEY: json.dumps(config, separators=(",", ":"))})
        else:
            config = _export(reader, to, lossy, writer, report)
            set_config_json(dst, None)
            report.files = writer.finish()
    report.files += write_side_files(src, dst, config, to)
    return report


def write_side_files(src: str, dst: str, config: dict, to: str) -> List[str]:
    """config.json with the new quantization_config, the files beside the weights copied;
    returns the names of the config files written."""
    written = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if (not os.path.isfile(path) or name.endswith(_WEIGHT_SUFFIXES)
                or name in (INDEX_FILE, PT_INDEX_FILE, CONFIG_FILE) or name in _SIDE_CONFIGS
                or name.startswith(".")):
            continue
        shutil.copyfile(path, os.path.join(dst, name))
    src_config = os.path.join(src, CONFIG_FILE)
    # other tools find a checkpoint's quantization in config.json: a folder without one (saved
    # by save_quantized from a model that is not a transformers model) gets a minimal one
    if os.path.isfile(src_config) or to != "int4kit":
        hf_config = read_json(src_config) if os.path.isfile(src_config) else {}
        hf_config["quantization_config"] = config
        write_json_atomic(os.path.join(dst, CONFIG_FILE), hf_config)
        written.append(CONFIG_FILE)
    if to in ("gptq", "gptq_v2"):  # AutoGPTQ-era tools read it from its own file
        write_json_atomic(os.path.join(dst, "quantize_config.json"), config)
        written.append("quantize_config.json")
    return written
