"""Independent compressed-tensors (0.20.1) oracle for "pack-quantized" int checkpoints.

Uses only compressed-tensors' own API (the llm-compressor save path and the
compressed-tensors model-free dequantizer), no hand-written packing.

  write_ct_checkpoint(model, out_dir, weights_by_layer, ...) -> dict report
  read_ct_checkpoint(dir, dtype=None) -> {f"{module}.weight": dense tensor}

weights_by_layer: {module_name: spec}, spec is either
  * a float tensor [N, K]: the dense weight; scale/zp come from CT's
    calculate_qparams on per-group/per-channel min/max (== llm-compressor's
    memoryless MinMax observer), or
  * a dict with "weight" (float [N,K]) or "q" (int, signed -8..7, [N,K]) and
    optional "weight_scale" [N, G] / "weight_zero_point" (signed int, [N, G]).
    With "q", the weight is set to (q - zp) * scale so that CT's quantize()
    reproduces q exactly (checked in the self-test).
Targeted Linear modules not named in weights_by_layer keep their current weight
and get calculate_qparams scales.
"""
import json
import os

import torch
from safetensors.torch import load_file, save_file

from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
    CompressedTensorsDequantizer,
)
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams
from compressed_tensors.utils.safetensors_load import get_checkpoint_files

__all__ = ["write_ct_checkpoint", "read_ct_checkpoint", "make_qconfig"]


def make_qconfig(num_bits=4, strategy="group", group_size=32, symmetric=True,
                 ignore=("lm_head",), targets=("Linear",)):
    args = QuantizationArgs(
        num_bits=num_bits, type="int", symmetric=symmetric, dynamic=False,
        strategy=strategy, group_size=group_size if strategy == "group" else None,
    )
    scheme = QuantizationScheme(targets=list(targets), weights=args,
                                format="pack-quantized")
    return QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore))


def _minmax_qparams(w, args):
    w = w.detach().float()
    if args.strategy == "group":
        g = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
        mn, mx = g.amin(-1), g.amax(-1)
    elif args.strategy == "channel":
        mn, mx = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    else:
        raise ValueError(args.strategy)
    return calculate_qparams(mn, mx, args)  # (scale fp32, zp int8)


@torch.no_grad()
def write_ct_checkpoint(model, out_dir, weights_by_layer=None, num_bits=4,
                        strategy="group", group_size=32, symmetric=True,
                        scale_dtype=torch.bfloat16, ignore=("lm_head",)):
    weights_by_layer = dict(weights_by_layer or {})
    qcfg = make_qconfig(num_bits, strategy, group_size, symmetric, ignore)
    # 1) attach schemes + empty weight_scale/weight_zero_point (needed first!)
    apply_quantization_config(model, qcfg, show_progress=False)
    quantized = [n for n, m in model.named_modules()
                 if getattr(m, "quantization_scheme", None) is not None]
    unknown = set(weights_by_layer) - set(quantized)
    if unknown:
        raise KeyError(f"not targeted/quantized: {sorted(unknown)}")
    for name in quantized:
        m = model.get_submodule(name)
        args = m.quantization_scheme.weights
        spec = weights_by_layer.get(name)
        if spec is not None and not isinstance(spec, dict):
            spec = {"weight": spec}
        spec = spec or {}
        scale, zp = spec.get("weight_scale"), spec.get("weight_zero_point")
        if "q" in spec:
            assert scale is not None, "q requires weight_scale"
            q = spec["q"].to(torch.int32)
            zpe = zp if zp is not None else torch.zeros_like(scale, dtype=torch.int8)
            if args.strategy == "group":
                s_e = scale.float().repeat_interleave(args.group_size, -1)
                z_e = zpe.to(torch.int32).repeat_interleave(args.group_size, -1)
            else:
                s_e, z_e = scale.float(), zpe.to(torch.int32)
            w = (q - z_e).float() * s_e
        elif "weight" in spec:
            w = spec["weight"]
        else:
            w = m.weight.data
        if scale is None:
            scale, calc_zp = _minmax_qparams(w, args)
            if zp is None and not symmetric:
                zp = calc_zp
        if symmetric:
            zp = torch.zeros(scale.shape, dtype=torch.int8)
        # weight stays in the model dtype; scale in scale_dtype; zp int8 (signed)
        m.weight.data = w.to(m.weight.dtype).reshape(m.weight.shape).contiguous()
        m.weight_scale = torch.nn.Parameter(
            scale.to(scale_dtype).reshape(m.weight_scale.shape).contiguous(),
            requires_grad=False)
        m.weight_zero_point = torch.nn.Parameter(
            zp.to(torch.int8).reshape(m.weight_zero_point.shape).contiguous(),
            requires_grad=False)
        m.quantization_status = QuantizationStatus.FROZEN  # "calibrated"
    # 2) llm-compressor's save path
    compressor = ModelCompressor.from_pretrained_model(
        model, quantization_format="pack-quantized")
    compressor.compress_model(model)  # weight -> weight_packed/weight_shape(/zp)
    os.makedirs(out_dir, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(out_dir)
    else:  # plain nn.Module: safetensors + minimal config.json
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(out_dir, "model.safetensors"))
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({}, f)
    compressor.update_config(out_dir)  # writes config.json["quantization_config"]
    return describe_checkpoint(out_dir)


def describe_checkpoint(ckpt_dir):
    sd = _load_all(ckpt_dir)
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    return {"tensors": {k: (str(v.dtype), tuple(v.shape),
                            v.tolist() if k.endswith("weight_shape") else None)
                        for k, v in sorted(sd.items())},
            "quantization_config": qc}


def _load_all(ckpt_dir):
    files = get_checkpoint_files(ckpt_dir)
    sd = {}
    for rel, path in files.items():
        if rel.endswith(".safetensors"):
            sd.update(load_file(path))
    return sd


def read_ct_checkpoint(ckpt_dir, dtype=None):
    """Dequantize every pack-quantized module with CT's own code
    (CompressedTensorsDequantizer -> PackedQuantizationCompressor.decompress).
    Returns {f"{module}.weight": tensor}. dtype=None keeps CT's native result
    dtype (== weight_scale dtype); pass torch.float32 etc. to cast."""
    deq = CompressedTensorsDequantizer(ckpt_dir, dtype=torch.float32)
    tensors = _load_all(ckpt_dir)
    packed_mods = {k.rpartition(".")[0] for k in tensors if k.endswith(".weight_packed")}
    scale_dt = {m: tensors[f"{m}.weight_scale"].dtype for m in packed_mods}
    out = deq.process(tensors)  # fp32 cast of the native (scale-dtype) result: exact
    res = {}
    for m in sorted(packed_mods):
        w = out[f"{m}.weight"]
        res[f"{m}.weight"] = w.to(dtype or scale_dt[m])
    return res
