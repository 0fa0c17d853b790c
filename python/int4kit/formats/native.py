"""int4kit's native checkpoint format (docs/CHECKPOINT.md): safetensors holding every quantized
layer's canonical tensors under its module name, every other tensor of the model unchanged, and a
JSON quantization config naming the format version and each layer's settings.

    int4kit.save_quantized(model, "out", max_shard_size="5GB")
    with int4kit.skeleton():                 # parameters on the meta device, buffers real
        model = MyModel(config)
    int4kit.load_quantized(model, "out")     # swaps the listed nn.Linear layers for Int4Linear
                                             # (or Int8Linear: a layer's optional "bits": 8)

The config lives in `config.json["quantization_config"]` when the folder is a Hugging Face model
(written by save_pretrained), else in the safetensors metadata under METADATA_KEY.
"""
import contextlib
import json
import os
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..nn import (ACT_QUANTS, INPUT_STATS, Int4Linear, Int8Linear, QuantLinear, check_group_size,
                  is_permutation, replace_module)
from .. import ops
from .files import (CHECKSUM_KEY, CONFIG_FILE, WRITER_KEY, CheckpointError, CheckpointReader,
                    ShardWriter, parse_size, read_json, write_json_atomic)

QUANT_METHOD = "int4kit"
FORMAT_VERSION = 1
METADATA_KEY = "int4kit_quantization_config"
SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FLOAT_DTYPES = tuple(SCALE_DTYPES.values())
LAYER_FIELDS = ("in_features", "out_features", "group_size", "symmetric", "scale_dtype",
                "act_quant", "method", "bias", "input_scale", "input_perm")


# ---- the config ---------------------------------------------------------------------------------

def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layer_bits(settings: dict) -> int:
    """A layer's code width: its optional "bits" field (written only for int8), else 4."""
    return settings.get("bits", 4)


def layer_settings(module: QuantLinear) -> dict:
    """One layer's entry in the config: what is needed to rebuild it without the model. The
    optional fields are written only when they differ from what older files mean: INPUT_STATS
    when true, "bits" when 8 (an Int8Linear)."""
    settings = {"in_features": module.in_features, "out_features": module.out_features,
                "group_size": module.group_size, "symmetric": module.symmetric,
                "scale_dtype": dtype_name(module.scale_dtype), "act_quant": module.act_quant,
                "method": module.method, "bias": module.bias is not None,
                "input_scale": module.input_scale is not None,
                "input_scale_dtype": (None if module.input_scale is None
                                      else dtype_name(module.input_scale.dtype)),
                "input_perm": module.input_perm is not None}
    if getattr(module, INPUT_STATS) is not None:
        settings[INPUT_STATS] = True
    if module.bits != 4:
        settings["bits"] = module.bits
    return settings


def canonical_settings(tensors: Dict[str, torch.Tensor], in_features: int, group_size: int,
                       method: str) -> dict:
    """A layer's entry in the config, read off its canonical tensors (short names: qweight,
    scales, zeros when asymmetric, optional bias, input_scale, input_perm): for layers that come
    from a file rather than from an Int4Linear."""
    input_scale = tensors.get("input_scale")
    return {"in_features": in_features, "out_features": tensors["qweight"].shape[0],
            "group_size": group_size, "symmetric": "zeros" not in tensors,
            "scale_dtype": dtype_name(tensors["scales"].dtype), "act_quant": None,
            "method": method, "bias": "bias" in tensors, "input_scale": input_scale is not None,
            "input_scale_dtype": None if input_scale is None else dtype_name(input_scale.dtype),
            "input_perm": "input_perm" in tensors}


def quantized_layers(model: nn.Module) -> Dict[str, QuantLinear]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, QuantLinear)}


def quantization_config(model: nn.Module) -> dict:
    """The config of `model`'s Int4Linear and Int8Linear layers, as saved (a JSON-ready dict;
    "bits": 4 is the layers' default, an int8 layer says "bits": 8 in its settings)."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("model has no Int4Linear or Int8Linear layer: quantize it first "
                         "(int4kit.quantize_model) or save it with torch/safetensors directly")
    sharded = [name for name, module in layers.items() if getattr(module, "tp_shard", None)]
    if sharded:
        raise ValueError(f"layer {sharded[0]!r} is one rank's tensor-parallel shard, not the whole "
                         f"layer; save the model before parallelizing it (a native checkpoint "
                         f"loads at any world size with int4kit.parallel.load_sharded)")
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": 4,
            "layers": {name: layer_settings(module) for name, module in layers.items()}}


def _bad(source: str, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: quantization config {what}")


def validate_config(config, source: str) -> dict:
    """Checks a quantization config read from `source` (a file name); returns it."""
    if not isinstance(config, dict):
        raise _bad(source, f"must be a JSON object, got {type(config).__name__}")
    if config.get("quant_method") != QUANT_METHOD:
        raise _bad(source, f"has quant_method {config.get('quant_method')!r}, expected "
                           f"{QUANT_METHOD!r}; for GPTQ, AWQ or compressed-tensors checkpoints use "
                           f"int4kit.convert_checkpoint")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _bad(source, f"format_version must be a positive int, got {version!r}")
    if version > FORMAT_VERSION:
        raise _bad(source, f"has format_version {version}, newer than the {FORMAT_VERSION} this "
                           f"int4kit reads: upgrade int4kit")
    if config.get("bits", 4) != 4:
        raise _bad(source, f"has bits={config.get('bits')!r}; the layers' default is 4 (an int8 "
                           f"layer says so in its own settings)")
    layers = config.get("layers")
    if not isinstance(layers, dict):
        raise _bad(source, "needs 'layers': an object of layer name -> settings")
    for name, settings in layers.items():
        where = f"layer {name!r}"
        if not isinstance(settings, dict):
            raise _bad(source, f"{where} must be an object, got {type(settings).__name__}")
        missing = [f for f in LAYER_FIELDS if f not in settings]
        if missing:
            raise _bad(source, f"{where} lacks {', '.join(missing)}")
        for field in ("in_features", "out_features", "group_size"):
            if not isinstance(settings[field], int) or isinstance(settings[field], bool):
                raise _bad(source, f"{where} {field} must be an int, got {settings[field]!r}")
        if settings["in_features"] <= 0 or settings["out_features"] < 0:
            raise _bad(source, f"{where} has in_features {settings['in_features']} and "
                               f"out_features {settings['out_features']}")
        try:
            check_group_size(settings["group_size"], settings["in_features"])
        except ValueError as error:
            raise _bad(source, f"{where}: {error}") from None
        for field in ("symmetric", "bias", "input_scale", "input_perm"):
            if not isinstance(settings[field], bool):
                raise _bad(source, f"{where} {field} must be true or false, got {settings[field]!r}")
        if settings["scale_dtype"] not in SCALE_DTYPES:
            raise _bad(source, f"{where} scale_dtype must be one of {list(SCALE_DTYPES)}, got "
                               f"{settings['scale_dtype']!r}")
        if not isinstance(settings.get(INPUT_STATS, False), bool):  # optional field
            raise _bad(source, f"{where} {INPUT_STATS} must be true or false, got "
                               f"{settings[INPUT_STATS]!r}")
        if settings.get("input_scale_dtype") not in (None, *SCALE_DTYPES):
            raise _bad(source, f"{where} input_scale_dtype must be null or one of "
                               f"{list(SCALE_DTYPES)}, got {settings['input_scale_dtype']!r}")
        if settings["act_quant"] not in ACT_QUANTS:
            raise _bad(source, f"{where} act_quant must be null or 'int8', got "
                               f"{settings['act_quant']!r}")
        if settings.get("bits", 4) not in (4, 8) or isinstance(settings.get("bits"), bool):
            raise _bad(source, f"{where} bits must be 4 or 8, got {settings['bits']!r}")
        if layer_bits(settings) == 8 and settings["act_quant"] is not None:
            raise _bad(source, f"{where} is int8 (bits 8), which has no act_quant; got "
                               f"{settings['act_quant']!r}")
        if settings["method"] is not None and not isinstance(settings["method"], str):
            raise _bad(source, f"{where} method must be a string or null")
    aliases = config.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in aliases.items()):
        raise _bad(source, "'aliases' must be an object of tensor name -> tensor name")
    return config


def read_quantization_config(reader: CheckpointReader) -> dict:
    """The int4kit config of a checkpoint: config.json's quantization_config when the folder has
    a config.json that carries one, else the safetensors metadata."""
    config_path = os.path.join(reader.directory, CONFIG_FILE)
    from_json = None
    if os.path.isfile(config_path):
        hf_config = read_json(config_path)
        if isinstance(hf_config, dict) and "quantization_config" in hf_config:
            from_json = validate_config(hf_config["quantization_config"], config_path)
    text = reader.metadata.get(METADATA_KEY) or reader.index_metadata.get(METADATA_KEY)
    if text is None:
        if from_json is not None:
            return from_json
        raise CheckpointError(f"{reader.directory}: not an int4kit checkpoint (no "
                              f"quantization_config in {CONFIG_FILE} and no {METADATA_KEY!r} in "
                              f"the safetensors metadata); GPTQ, AWQ and compressed-tensors "
                              f"checkpoints go through int4kit.convert_checkpoint")
    try:
        from_metadata = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{reader.files()[0]}: metadata {METADATA_KEY!r} is not JSON "
                              f"({error})") from None
    from_metadata = validate_config(from_metadata, reader.files()[0])
    if from_json is not None and from_json["layers"] != from_metadata["layers"]:
        raise CheckpointError(f"{config_path}: its quantization_config and the safetensors "
                              f"metadata of the weights describe different layers (a config.json "
                              f"left from another save?)")
    return from_metadata


def check_checksums_present(reader: CheckpointReader, layers: Dict[str, dict]) -> None:
    """Every shard int4kit wrote records who wrote it and the checksums it owes: all of its
    tensors (int4kit's writer) or the quantized layers' (transformers'). A shard that lacks
    them was damaged where the metadata is (a corrupted key would otherwise switch the
    verification off) or was not written by int4kit."""
    quantized = {key for name, s in layers.items() for key in layer_keys(name, s)}
    for shard, keys in reader.keys_by_file().items():
        full = os.path.join(reader.directory, shard)
        if shard.endswith(".bin"):
            raise CheckpointError(f"{full}: int4kit checkpoints are safetensors; a pickle file is "
                                  f"not one")
        metadata = reader.shard_metadata[shard]
        writer = metadata.get(WRITER_KEY)
        if writer is None and CHECKSUM_KEY not in metadata:
            raise CheckpointError(f"{full}: has neither {WRITER_KEY!r} nor {CHECKSUM_KEY!r} in its "
                                  f"metadata: written by an int4kit from before checksums "
                                  f"(2026-12-06) or damaged; re-save it")
        if writer not in ("int4kit", "transformers"):
            raise CheckpointError(f"{full}: metadata {WRITER_KEY!r} is {writer!r}; every shard of "
                                  f"an int4kit checkpoint says 'int4kit' or 'transformers' there: "
                                  f"the file is corrupt")
        owed = set(keys) if writer == "int4kit" else quantized.intersection(keys)
        unchecked = sorted(owed - reader.shard_checksums[shard].keys())
        if unchecked:
            raise CheckpointError(f"{full}: no checksum recorded for {', '.join(unchecked[:3])}, "
                                  f"which its writer records for every such tensor: the file is "
                                  f"corrupt")


def set_config_json(directory: str, config: Optional[dict]) -> None:
    """Puts `config` in the folder's config.json as quantization_config (None: removes it), when
    the folder has a config.json; the rest of the file is kept. Savers call it with None before
    committing new weights and with the new config after, so that config.json never describes
    weights that are not there."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    content = read_json(path)
    if not isinstance(content, dict) or (config is None and "quantization_config" not in content):
        return
    if config is None:
        del content["quantization_config"]
    else:
        content["quantization_config"] = config
    write_json_atomic(path, content)


# ---- saving -------------------------------------------------------------------------------------

def model_tensor_aliases(model: nn.Module) -> Dict[str, str]:
    """Tied state-dict entries (the same parameter or buffer object under several names):
    name -> the first name. Read without building any Int4Linear's canonical tensors."""
    first: Dict[int, str] = {}
    aliases = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        prefix = prefix + "." if prefix else ""
        tensors = list(module._parameters.items()) + [
            (name, t) for name, t in module._buffers.items()
            if name not in module._non_persistent_buffers_set]
        for name, tensor in tensors:
            if tensor is None:
                continue
            if id(tensor) in first:
                if first[id(tensor)] != prefix + name:
                    aliases[prefix + name] = first[id(tensor)]
            else:
                first[id(tensor)] = prefix + name
    return aliases


def checkpoint_tensors(model: nn.Module, skip=()) -> Iterator[Tuple[str, torch.Tensor]]:
    """The model's state dict, one module at a time: an Int4Linear's canonical tensors are made
    only when its turn comes, so a save holds about one shard beyond the model. Names in `skip`
    (tied duplicates) are left out."""
    for prefix, module in model.named_modules():
        own: Dict[str, torch.Tensor] = {}
        module._save_to_state_dict(own, prefix + "." if prefix else "", False)
        for key, tensor in own.items():
            if tensor is not None and key not in skip:
                yield key, tensor


def save_quantized(model: nn.Module, directory: Union[str, os.PathLike],
                   max_shard_size: Union[int, str] = "5GB") -> List[str]:
    """Saves `model` (with its Int4Linear layers) in int4kit's native format; returns the names of
    the files written. Shards of at most max_shard_size ("5GB", "500MiB" or bytes) with a
    model.safetensors.index.json when more than one; nothing is pickled. The save is atomic: a
    failure part-way leaves no checkpoint that loads (and the folder's previous one intact)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, QuantLinear):
        raise TypeError(f"model is a single {type(model).__name__}, which a skeleton could not be loaded into "
                        "in place; save its state_dict (safetensors.torch.save_file("
                        "layer.state_dict(), path)) or wrap it in a module")
    directory = os.fspath(directory)
    max_bytes = parse_size(max_shard_size)
    config = quantization_config(model)
    # (not model.state_dict(): it would build every layer's canonical tensors at once)
    meta = [key for key, t in [*model.named_parameters(), *model.named_buffers()]
            if t.device.type == "meta"]
    if meta:
        raise ValueError(f"model has tensors on the meta device (e.g. {meta[0]!r}), which hold no "
                         f"values to save; load or materialize them first")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"directory {directory!r} exists and is not a folder")
    config["aliases"] = model_tensor_aliases(model)
    metadata = {METADATA_KEY: json.dumps(config, separators=(",", ":"))}
    with ShardWriter(directory, max_bytes, metadata) as writer:
        writer.add_all(checkpoint_tensors(model, skip=config["aliases"]))
        set_config_json(directory, None)
        names = writer.finish()
    set_config_json(directory, config)  # a Hugging Face folder's config.json follows the weights
    return names


# ---- loading ------------------------------------------------------------------------------------

def layer_keys(name: str, settings: dict) -> List[str]:
    """The tensor names a quantized layer has in the checkpoint."""
    parts = ["qweight", "scales"] + ([] if settings["symmetric"] else ["zeros"])
    parts += [p for p in ("bias", "input_scale", "input_perm") if settings[p]]
    parts += [INPUT_STATS] if settings.get(INPUT_STATS) else []
    return [f"{name}.{p}" if name else p for p in parts]


def check_layer_tensors(tensors: Dict[str, torch.Tensor], settings: dict, where) -> None:
    """Checks a quantized layer's tensors (short names -> tensors) against its settings: shape,
    dtype, finite scales and zero points, input_perm a permutation. where(short name) says which
    file and tensor an error is about."""
    N, K, G = settings["out_features"], settings["in_features"], settings["group_size"]
    groups = ops.num_groups(K, G)
    scale_dtype = SCALE_DTYPES[settings["scale_dtype"]]
    qweight_shape = (N, K) if layer_bits(settings) == 8 else (N, (K + 1) // 2)
    expect = {"qweight": (qweight_shape, (torch.uint8,)),
              "scales": ((N, groups), (scale_dtype,)), "zeros": ((N, groups), (scale_dtype,)),
              "bias": ((N,), _FLOAT_DTYPES),
              "input_scale": ((K,), (SCALE_DTYPES[settings["input_scale_dtype"]],)
                              if settings.get("input_scale_dtype") else _FLOAT_DTYPES),
              "input_perm": ((K,), (torch.int64,)), INPUT_STATS: ((K,), (torch.float32,))}
    for short, tensor in tensors.items():
        shape, dtypes = expect[short]
        if tuple(tensor.shape) != shape or tensor.dtype not in dtypes:
            raise CheckpointError(f"{where(short)} expected shape {list(shape)} and dtype "
                                  f"{' or '.join(dtype_name(d) for d in dtypes)}, got "
                                  f"{list(tensor.shape)} {dtype_name(tensor.dtype)}")
        if short in ("scales", "zeros", "input_scale") and not bool(torch.isfinite(tensor).all()):
            bad = (~torch.isfinite(tensor)).nonzero()[0].tolist()
            raise CheckpointError(f"{where(short)} must be finite, has "
                                  f"{tensor[tuple(bad)].item()} at {bad}")
        if short == INPUT_STATS and not bool((torch.isfinite(tensor) & (tensor >= 0)).all()):
            raise CheckpointError(f"{where(short)} must be finite and non-negative (mean "
                                  f"squares)")
        if short == "input_perm" and not is_permutation(tensor):
            raise CheckpointError(f"{where(short)} must be a permutation of 0..{K - 1} "
                                  f"(each index once)")


def read_layer(reader: CheckpointReader, name: str, settings: dict) -> Dict[str, torch.Tensor]:
    """A quantized layer's tensors from the checkpoint, checked (check_layer_tensors); keys are
    the short names (qweight, scales, ...)."""
    prefix = f"{name}." if name else ""
    tensors = {key[len(prefix):]: reader.get(key) for key in layer_keys(name, settings)}
    check_layer_tensors(tensors, settings,
                        lambda short: f"{reader.file_of(prefix + short)}: tensor {prefix + short!r}")
    return tensors


def build_layer(settings: dict, tensors: Dict[str, torch.Tensor], device) -> QuantLinear:
    """An Int4Linear (Int8Linear for bits 8) from a layer's checked tensors, prepacked for
    `device`."""
    cls = Int8Linear if layer_bits(settings) == 8 else Int4Linear
    module = cls.from_quantized(
        tensors["qweight"], tensors["scales"], tensors.get("zeros"), settings["group_size"],
        settings["in_features"], bias=tensors.get("bias"), device=device,
        act_quant=settings["act_quant"])
    for name in ("input_scale", "input_perm", INPUT_STATS):
        if name in tensors:
            setattr(module, name, tensors[name].to(device))
    module.method = settings["method"]
    return module


def _target_device(module: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if tensor is not None and tensor.device.type != "meta":
            return tensor.device
    if isinstance(module, QuantLinear) and module._device().type != "meta":
        return module._device()
    return torch.device("cpu")


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Puts `value` in place of the parameter or buffer named `key` (keeping its kind)."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = (value if isinstance(value, nn.Parameter) else
                                    nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        module._buffers[attr] = value


def check_nothing_missing(reader: CheckpointReader, missing: List[str]) -> None:
    """Raises naming the model tensors (`missing`) the checkpoint lacks, if there are any."""
    if missing:
        raise CheckpointError(f"{reader.directory}: the checkpoint lacks {len(missing)} tensor(s) "
                              f"the model has: {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))


def load_quantized(model: nn.Module, directory: Union[str, os.PathLike], device=None,
                   strict: bool = True) -> nn.Module:
    """Loads a native int4kit checkpoint into `model` in place and returns it.

    model: the architecture the checkpoint was saved from (a "skeleton"); its parameters may be
      on the meta device (see `skeleton()`), so no dense weight is ever materialized. Every layer
      the config lists must be an nn.Linear (or Int4Linear) of the same shape: it is replaced by
      an Int4Linear prepacked for `device` (default: where the skeleton's layer lives, the CPU
      for meta). Every other tensor is loaded as saved (copied into real tensors, which keep
      their dtype; assigned as saved in place of meta ones).
    strict: checkpoint tensors the model has no place for are an error (else ignored). A model
      tensor the checkpoint lacks is always an error.
    """
    return load_with(model, directory, device, strict, read_and_build)


def read_and_build(reader: CheckpointReader, name: str, settings: dict, device) -> QuantLinear:
    """A quantized layer read whole from the checkpoint and built for `device`."""
    return build_layer(settings, read_layer(reader, name, settings), device)


LayerBuilder = Callable[[CheckpointReader, str, dict, torch.device], nn.Module]


def load_with(model: nn.Module, directory, device, strict: bool,
              build: LayerBuilder) -> nn.Module:
    """load_quantized with the quantized layers made by build(reader, name, settings, device)
    (called in the config's order, the same on every rank: a tensor-parallel loader reads only
    its shard there). Every check runs before the model changes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    reader = CheckpointReader(directory)
    config = read_quantization_config(reader)
    layers = config["layers"]
    check_checksums_present(reader, layers)
    aliases = dict(config.get("aliases", {}))
    if "" in layers:
        raise CheckpointError(f"{reader.directory}: the config lists the model itself as a "
                              f"quantized layer, which cannot be replaced in place")
    for name, settings in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{reader.directory}: the config lists layer {name!r}, which "
                                  f"model ({type(model).__name__}) does not have") from None
        if not isinstance(module, (nn.Linear, QuantLinear)) or (
                module.in_features, module.out_features) != (settings["in_features"],
                                                             settings["out_features"]):
            raise CheckpointError(
                f"{reader.directory}: layer {name!r} is a {settings['out_features']} x "
                f"{settings['in_features']} linear in the checkpoint but the model has "
                f"{type(module).__name__}" + (f" {module.out_features} x {module.in_features}"
                                              if hasattr(module, "in_features") else ""))
    layer_key_set = {key for name, s in layers.items() for key in layer_keys(name, s)}
    prefixes = tuple(f"{name}." for name in layers if name)
    own = {key: t for key, t in model.state_dict(keep_vars=True).items()
           if not key.startswith(prefixes) and key not in layers}
    model_aliases = model_tensor_aliases(model)
    stray = [key for key in reader.keys() if key.startswith(prefixes) and key not in layer_key_set]
    if stray:
        raise CheckpointError(f"{reader.file_of(stray[0])}: tensor {stray[0]!r} belongs to a "
                              f"quantized layer but is not one of its tensors "
                              f"({', '.join(layer_keys('', layers[stray[0].rpartition('.')[0]]))})"
                              if stray[0].rpartition('.')[0] in layers else
                              f"{reader.file_of(stray[0])}: tensor {stray[0]!r} lies inside a "
                              f"quantized layer")
    check_nothing_missing(reader, [key for key in own if key not in reader
                                   and key not in aliases and model_aliases.get(key) not in reader])
    unexpected = [key for key in reader.keys() if key not in own and key not in layer_key_set]
    if unexpected and strict:
        raise CheckpointError(f"{reader.file_of(unexpected[0])}: {len(unexpected)} tensor(s) the "
                              f"model has no place for: {', '.join(unexpected[:5])}"
                              + (" ..." if len(unexpected) > 5 else "")
                              + "; pass strict=False to ignore them")

    non_persistent_meta = [name for name, t in model.named_buffers()
                           if t.device.type == "meta" and name not in own
                           and not name.startswith(prefixes)]
    if non_persistent_meta:
        raise CheckpointError(f"{reader.directory}: the model has {len(non_persistent_meta)} "
                              f"buffer(s) on the meta device that no checkpoint holds "
                              f"(non-persistent: {', '.join(non_persistent_meta[:5])}); build the "
                              f"skeleton with int4kit.skeleton(), which keeps buffers real")
    # quantized layers: check every tensor before changing the model
    built = {}
    for name, settings in layers.items():
        built[name] = build(reader, name, settings,
                            _target_device(model.get_submodule(name), device))
    # the other tensors, one at a time; a tensor tied to another in the model stays tied
    loaded: Dict[int, torch.Tensor] = {}
    updates = []
    for key, current in own.items():
        source = key if key in reader else aliases.get(key, model_aliases.get(key))
        if id(current) in loaded:
            updates.append((key, loaded[id(current)]))
            continue
        value = reader.get(source)
        if tuple(value.shape) != tuple(current.shape):
            raise CheckpointError(f"{reader.file_of(source)}: tensor {source!r} has shape "
                                  f"{list(value.shape)}, the model's {key} has "
                                  f"{list(current.shape)}")
        if value.is_floating_point() != current.is_floating_point() or (
                value.dtype == torch.bool) != (current.dtype == torch.bool):
            raise CheckpointError(f"{reader.file_of(source)}: tensor {source!r} has dtype "
                                  f"{dtype_name(value.dtype)}, the model's {key} is "
                                  f"{dtype_name(current.dtype)}")
        target = device if device is not None else (
            current.device if current.device.type != "meta" else torch.device("cpu"))
        if current.device.type == "meta":
            value = value.to(target)
        else:
            with torch.no_grad():
                value = current.detach().clone().to(target).copy_(value)
        if isinstance(current, nn.Parameter):
            value = nn.Parameter(value, requires_grad=current.requires_grad)
        loaded[id(current)] = value
        updates.append((key, value))
    for name, module in built.items():
        replace_module(model, name, module)
    for key, value in updates:
        _set_tensor(model, key, value)
    return model


@contextlib.contextmanager
def skeleton():
    """Builds models with their parameters on the meta device (no memory, no initialisation)
    and their buffers real, which a checkpoint may not hold (non-persistent buffers such as
    position ids or rotary frequencies):

        with int4kit.skeleton():
            model = AutoModel.from_config(config)
        int4kit.load_quantized(model, directory)
    """
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original
