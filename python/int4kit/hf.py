"""Hugging Face transformers integration through its public custom-quantizer registration
(`quant_method: "int4kit"`): after `import int4kit`,

    int4kit.quantize_model(model, config, calib_data)   # a transformers PreTrainedModel
    model.save_pretrained("out")                         # the native format (docs/CHECKPOINT.md)
    AutoModel.from_pretrained("out")                     # Int4Linear layers, prepacked

from_pretrained builds the model on the meta device, where `Int4kitHfQuantizer` swaps each
listed nn.Linear for an Int4Linear holding meta canonical tensors; transformers then loads the
checkpoint's tensors straight into them (no dense weight is ever made), and the quantizer checks
and prepacks each layer for its device.

Registration happens when transformers is imported (a post-import hook, so `import int4kit`
does not pay for importing transformers), or at once if it already is.
"""
import copy
import importlib.abc
import importlib.util
import json
import os
import sys
import warnings
from typing import Dict, Optional

import torch
import torch.nn as nn

from .formats.files import (CHECKSUM_KEY, WRITER_KEY, CheckpointError, CheckpointReader,
                            tensor_crc32)
from .formats.native import (FORMAT_VERSION, METADATA_KEY, QUANT_METHOD, SCALE_DTYPES,
                             check_layer_tensors, layer_bits, quantization_config,
                             validate_config)
from .nn import _CANONICAL, INPUT_STATS, Int4Linear, Int8Linear, QuantLinear, replace_module

_registered = {}


def _resolve(model: nn.Module, name: str) -> Optional[str]:
    """A layer name from the config -> its name in `model`, which may be the saved model's base
    model or a model with a head around it (BertModel saved, BertForSequenceClassification
    loaded, or the reverse)."""
    modules = dict(model.named_modules())
    if name in modules:
        return name
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and f"{prefix}.{name}" in modules:
        return f"{prefix}.{name}"
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in modules:
        return name[len(prefix) + 1:]
    return None


def meta_layer(settings: dict, dtype: torch.dtype) -> QuantLinear:
    """An Int4Linear (Int8Linear for bits 8) whose canonical tensors (and optional inputs) live
    on the meta device with the checkpoint's dtypes, for transformers' loader to fill in; bias
    in `dtype`."""
    scale_dtype = SCALE_DTYPES[settings["scale_dtype"]]
    cls = Int8Linear if layer_bits(settings) == 8 else Int4Linear
    module = cls(settings["in_features"], settings["out_features"], bias=settings["bias"],
                        group_size=settings["group_size"], symmetric=settings["symmetric"],
                        scale_dtype=scale_dtype, device="meta", dtype=dtype,
                        act_quant=settings["act_quant"])
    K = settings["in_features"]
    if settings["input_scale"]:  # in its saved dtype: transformers casts to the meta tensor's
        dtype = SCALE_DTYPES[settings.get("input_scale_dtype") or settings["scale_dtype"]]
        module.input_scale = torch.empty(K, dtype=dtype, device="meta")
    if settings["input_perm"]:
        module.input_perm = torch.empty(K, dtype=torch.int64, device="meta")
    if settings.get(INPUT_STATS):
        setattr(module, INPUT_STATS, torch.empty(K, dtype=torch.float32, device="meta"))
    module.method = settings["method"]
    module.requires_grad_(False)
    # transformers loads checkpoint tensors into persistent buffers only, and refills the
    # non-persistent ones with empty memory after loading: until _finish_layer, the canonical
    # buffers are persistent
    module._non_persistent_buffers_set.difference_update(_CANONICAL)
    return module


def _recorded_checksums(folder: str) -> Dict[str, int]:
    """The CRC-32s the shards of a local checkpoint folder recorded (headers only; {} for a
    folder int4kit cannot read that way, e.g. a hub id)."""
    if not os.path.isdir(folder):
        return {}
    try:
        reader = CheckpointReader(folder)
    except (CheckpointError, OSError):
        return {}  # transformers read the folder; what it could read is checked tensor by tensor
    return reader.checksums


def _finish_layer(name: str, saved: str, module: Int4Linear, settings: dict, source: str,
                  checksums: Dict[str, int]) -> None:
    """After transformers filled a meta layer's tensors: check them (and their recorded
    checksums, under the layer's name in the file, `saved`), then prepack."""
    tensors = {"qweight": module.qweight, "scales": module.scales}
    if not module.symmetric:
        tensors["zeros"] = module.zeros
    for extra in ("input_scale", "input_perm", INPUT_STATS):
        if getattr(module, extra) is not None:
            tensors[extra] = getattr(module, extra)
    if module.bias is not None:
        tensors["bias"] = module.bias
    missing = [short for short, t in tensors.items()
               if t.device.type == "meta" or not getattr(t, "_is_hf_initialized", False)]
    if missing:
        raise CheckpointError(f"{source}: the checkpoint lacks {', '.join(f'{name}.{m}' for m in missing)}, "
                              f"which the quantization config says layer {name!r} has")
    check_layer_tensors({k: v for k, v in tensors.items() if k != "bias"}, settings,
                        lambda short: f"{source}: tensor {name + '.' + short!r}")
    for short, tensor in tensors.items():  # not the bias: it follows the requested dtype
        key = f"{saved}.{short}" if saved else short
        if short != "bias" and key in checksums and tensor_crc32(tensor) != checksums[key]:
            raise CheckpointError(f"{source}: tensor {key!r} does not match the CRC-32 its file "
                                  f"recorded when it was written: the file is corrupt")
    device = module.qweight.device
    module._store(module.qweight.detach(), module.scales.detach(),
                  None if module.symmetric else module.zeros.detach(), device)
    module._non_persistent_buffers_set.update(_CANONICAL)
    for extra in ("input_scale", "input_perm", INPUT_STATS):
        value = getattr(module, extra)
        if value is not None:
            setattr(module, extra, value.detach().to(device))


def _layer_checksums(model: nn.Module) -> Dict[str, int]:
    """CRC-32 of every quantized layer's saved tensors, for the shards transformers writes (its
    other tensors it may rename or reshape on the way, so only these are vouched for)."""
    checksums = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            own: Dict[str, torch.Tensor] = {}
            module._save_to_state_dict(own, f"{name}." if name else "", False)
            checksums.update({key: tensor_crc32(t) for key, t in own.items()})
    return checksums


def _register():
    """Defines and registers the config and quantizer classes with transformers (once)."""
    if _registered:
        return _registered
    from transformers.quantizers import (HfQuantizer, register_quantization_config,
                                         register_quantizer)
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class Int4kitConfig(QuantizationConfigMixin):
        """config.json["quantization_config"] of an int4kit model (docs/CHECKPOINT.md)."""

        def __init__(self, layers: Optional[Dict[str, dict]] = None, format_version: int = FORMAT_VERSION,
                     bits: int = 4, aliases: Optional[dict] = None, **kwargs):
            kwargs.pop("quant_method", None)
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.bits = bits
            self.layers = copy.deepcopy(layers or {})
            self.aliases = dict(aliases or {})
            self._extra = kwargs  # fields of a newer writer, kept so that they round-trip
            validate_config(self.to_dict(), "quantization_config")

        @classmethod
        def from_model(cls, model: nn.Module) -> "Int4kitConfig":
            config = quantization_config(model)
            config.pop("quant_method")
            return cls(**config)

        def to_dict(self) -> dict:
            return {"quant_method": self.quant_method, "format_version": self.format_version,
                    "bits": self.bits, "layers": copy.deepcopy(self.layers),
                    "aliases": dict(self.aliases), **copy.deepcopy(self._extra)}

        def __iter__(self):
            yield from self.to_dict().items()

    class Int4kitHfQuantizer(HfQuantizer):
        """Loads int4kit checkpoints into Int4Linear layers; saves them in the native format."""
        requires_calibration = True  # only pre-quantized checkpoints: quantize with int4kit

        def validate_environment(self, device_map=None, **kwargs):
            if isinstance(device_map, dict) and "disk" in set(map(str, device_map.values())):
                raise ValueError("int4kit: offloading Int4Linear layers to disk is not supported; "
                                 "pass a device_map without offload (e.g. 'cpu' or 'cuda')")

        def update_dtype(self, dtype):
            return dtype  # activations, biases and dense layers follow the requested dtype

        def param_needs_quantization(self, model, param_name, **kwargs):
            return False  # the tensors are already quantized (and keep their shape checks)

        def _process_model_before_weight_loading(self, model, **kwargs):
            config = self.quantization_config
            self._names = {}
            tied = getattr(model, "all_tied_weights_keys", None) or {}
            for saved, settings in config.layers.items():
                name = _resolve(model, saved)
                if name is None:
                    raise CheckpointError(f"quantization_config lists layer {saved!r}, which "
                                          f"{type(model).__name__} does not have")
                old = model.get_submodule(name)
                if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (
                        settings["in_features"], settings["out_features"]):
                    raise CheckpointError(
                        f"quantization_config: layer {saved!r} is a {settings['out_features']} x "
                        f"{settings['in_features']} linear, the model has {old!r}")
                if f"{name}.weight" in tied:
                    raise CheckpointError(f"quantization_config: layer {name!r} has its weight tied "
                                          f"to {tied[name + '.weight']!r}, which an Int4Linear "
                                          f"cannot share; save with tie_word_embeddings=False")
                replace_module(model, name, meta_layer(settings, old.weight.dtype))
                self._names[name] = (saved, settings)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            source = getattr(getattr(model, "config", None), "_name_or_path", "") or "checkpoint"
            device_map = getattr(model, "hf_device_map", None) or {}
            places = {str(d) for d in device_map.values()}
            offloaded = sorted(places & {"disk", "meta"})
            if "cpu" in places and places - {"cpu"}:  # accelerate offloads "cpu" next to GPUs
                offloaded.append("cpu next to a GPU")
            if offloaded:
                raise ValueError(f"int4kit: device_map put layers on {offloaded[0]} (offload); "
                                 f"Int4Linear layers must live on the CPU or a GPU, so pass a "
                                 f"device_map without offload (e.g. 'cpu' or 'cuda')")
            checksums = _recorded_checksums(source)
            for name, (saved, settings) in self._names.items():
                _finish_layer(name, saved, model.get_submodule(name), settings, source, checksums)
            return model

        def get_state_dict_and_metadata(self, model):
            # save_pretrained calls this before it writes config.json: the config describes the
            # layers as they are now (and goes into every shard too, for load_quantized)
            model.config.quantization_config = Int4kitConfig.from_model(model)
            text = json.dumps(model.config.quantization_config.to_dict(), separators=(",", ":"))
            return None, {METADATA_KEY: text, CHECKSUM_KEY: json.dumps(_layer_checksums(model)),
                          WRITER_KEY: "transformers"}

        def is_serializable(self, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

        def _dequantize(self, model, dtype=None):
            for name, module in list(model.named_modules()):
                if isinstance(module, QuantLinear):
                    replace_module(model, name, module.to_linear(dtype))
            return model

    register_quantization_config(QUANT_METHOD)(Int4kitConfig)
    register_quantizer(QUANT_METHOD)(Int4kitHfQuantizer)
    _registered.update(config=Int4kitConfig, quantizer=Int4kitHfQuantizer)
    return _registered


def model_class(config):
    """The transformers class a checkpoint was saved from (its config's architectures), so a
    causal LM keeps its head; AutoModel otherwise."""
    import transformers
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def is_transformers_model(model) -> bool:
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return False
    from transformers import PreTrainedModel
    return isinstance(model, PreTrainedModel)


def attach(model: nn.Module) -> None:
    """Marks a transformers model whose layers int4kit quantized, so that the stock
    save_pretrained writes the native format (config.json quantization_config included)."""
    classes = _register()
    config = classes["config"].from_model(model)
    model.config.quantization_config = config
    model.hf_quantizer = classes["quantizer"](config, pre_quantized=True)
    model.quantization_method = QUANT_METHOD
    # not is_quantized: transformers would then refuse .half() / .float(), which Int4Linear
    # supports (the quantized tensors keep their dtype, activations follow)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers int4kit with transformers right after `import transformers` finishes."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register_or_warn()

        spec.loader.exec_module = exec_and_register
        return spec


def _register_or_warn() -> None:
    """A transformers without the custom-quantizer API (or with one that changed) must not
    break `import transformers` or `import int4kit`: int4kit's own API still works."""
    try:
        _register()
    except Exception as error:  # noqa: BLE001  (any failure of a third-party API)
        warnings.warn(f"int4kit could not register its quantizer with transformers "
                      f"({type(error).__name__}: {error}); from_pretrained will not know "
                      f"int4kit checkpoints, load_quantized still does", RuntimeWarning)


def install() -> None:
    """Called by `import int4kit`: register now, or when transformers gets imported."""
    if "transformers" in sys.modules:
        _register_or_warn()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())
