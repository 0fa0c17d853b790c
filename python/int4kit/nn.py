"""Int4Linear and Int8Linear: drop-in replacements for nn.Linear with int4 / int8 weights.

Both are QuantLinear: the module keeps one copy of its weight, in the layout of the device it
lives on:
  * CPU (and CUDA for int4): that device's prepacked layout (buffer `packed`, docs/FORMAT.md),
    made when the module moves there or loads there and consumed by the fused kernels;
  * other devices (and CUDA for int8): the canonical format (buffers `qweight`, `scales`, `zeros`);
    forward dequantizes and runs a dense matmul (cuBLAS on CUDA).
Its state dict is always the canonical format (keys qweight, scales, zeros when asymmetric, bias,
and input_scale / input_perm when present), so checkpoints are portable between devices and
bit-exact through save/load (docs/CHECKPOINT.md).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, reference

_CANONICAL = ("qweight", "scales", "zeros")
_LAYOUT_BUFFERS = ("packed",) + _CANONICAL
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# optional inputs transforms, saved only when present: column k of the stored weight multiplies
# x[..., input_perm[k]] * input_scale[k] (both in the stored column order)
_INPUT_BUFFERS = ("input_perm", "input_scale")
# optional [in_features] float32 statistic, saved only when present: the calibration data's mean
# x^2 per input channel, in x's column order (int4kit.shift_report); not used by forward
INPUT_STATS = "input_sq_mean"
_OPTIONAL_BUFFERS = _INPUT_BUFFERS + (INPUT_STATS,)
ACT_QUANTS = (None, "int8")


def check_act_quant(act_quant) -> None:
    if act_quant not in ACT_QUANTS:
        raise ValueError(f"act_quant must be None (W4A16) or 'int8' (W4A8: x quantized per row to "
                         f"int8 at run time), got {act_quant!r}")


def check_group_size(group_size, in_features: int) -> None:
    """Raises ValueError unless group_size is -1 or an even number in [2, in_features]."""
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size == -1:
        return
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be -1 (per channel) or a positive even number, "
                         f"got {group_size}")
    if group_size > in_features:
        raise ValueError(f"group_size {group_size} is larger than in_features = {in_features}; "
                         f"use -1 for one group per channel")


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Puts `module` where `model`'s submodule `name` ("a.b.c") is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def dequantized_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                       group_size: int, in_features: int,
                       input_scale: Optional[torch.Tensor] = None,
                       input_perm: Optional[torch.Tensor] = None, bits: int = 4) -> torch.Tensor:
    """The float32 [out_features, in_features] weight a layer with these canonical tensors
    (`bits`-bit codes) computes with, in x's column order (input_perm undone, input_scale folded
    into the columns)."""
    if bits == 8:
        w = ops.dequantize_int8(qweight, scales, zeros, group_size, torch.float32)
    else:
        w = ops.dequantize(qweight, scales, zeros, group_size, in_features, torch.float32)
    if input_scale is not None:
        w = w * input_scale.float()[None, :]
    if input_perm is not None:  # stored column k reads x column input_perm[k]
        w = torch.empty_like(w).index_copy_(1, input_perm, w)
    return w


def transform_input(x: torch.Tensor, input_perm: Optional[torch.Tensor],
                    input_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """x as the stored weight's columns read it: gathered by input_perm, then scaled by
    input_scale (either may be None)."""
    if input_perm is not None:
        x = x.index_select(-1, input_perm)
    if input_scale is not None:
        x = x * input_scale.to(x.dtype)
    return x


def is_permutation(perm: torch.Tensor) -> bool:
    """perm is a 1-D int64 tensor holding each of 0..len-1 exactly once."""
    if perm.dim() != 1 or perm.dtype != torch.int64:
        return False
    if perm.device.type == "meta":
        return True
    seen = torch.zeros(perm.numel(), dtype=torch.bool, device=perm.device)
    if perm.numel() and (int(perm.min()) < 0 or int(perm.max()) >= perm.numel()):
        return False
    seen[perm] = True
    return bool(seen.all())


class QuantLinear(nn.Module):
    """What Int4Linear and Int8Linear share: y = x @ W.T + bias with W stored as `bits`-bit codes,
    per-group scales and zero points; the layouts per device, the canonical state dict, the
    optional input transforms and statistics. The subclasses say how their codes are stored
    (the methods under "bit width" below)."""
    bits: int
    symmetric_zero: int

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = 128, symmetric: bool = True,
                 scale_dtype: torch.dtype = torch.float32, device=None,
                 dtype: Optional[torch.dtype] = None, act_quant: Optional[str] = None):
        super().__init__()
        self._check_act_quant(act_quant)
        if in_features <= 0 or out_features < 0:
            raise ValueError(f"in_features must be positive and out_features non-negative, "
                             f"got {in_features} and {out_features}")
        check_group_size(group_size, in_features)
        if scale_dtype not in _SCALE_DTYPES:
            raise TypeError(f"scale_dtype must be float32, bfloat16 or float16, got {scale_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.symmetric = bool(symmetric)
        self.scale_dtype = scale_dtype
        self.act_quant = act_quant
        for name in _LAYOUT_BUFFERS:
            self.register_buffer(name, None, persistent=False)
        # optional per-input-channel multiplier applied to x before the kernel (AWQ's 1/s where it
        # cannot be folded into the previous op); saved as `input_scale` only when present
        self.register_buffer("input_scale", None)
        # optional int64 permutation of x's columns, gathered before input_scale: a GPTQ act-order
        # checkpoint whose g_idx is not monotone is stored with K permuted into whole groups
        self.register_buffer("input_perm", None)
        # the calibration's input statistics (INPUT_STATS), when a calibrated method made it
        self.register_buffer(INPUT_STATS, None)
        # the method that made the weights ("rtn", "gptq", ...; None: unknown): checkpoint metadata
        self.method = None
        device = torch.device(device) if device is not None else torch.device("cpu")
        # an empty module holds the all-zero weight: every code at the zero point, scale 1
        groups = ops.num_groups(in_features, group_size)
        self._store(self._zero_codes(), torch.ones(out_features, groups, dtype=scale_dtype),
                    None if symmetric else torch.full((out_features, groups), self.symmetric_zero,
                                                      dtype=scale_dtype),
                    device)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype or scale_dtype, device=device),
                                  requires_grad=False) if bias else None)

    # ---- bit width: what Int4Linear and Int8Linear each define ------------------------------------
    @staticmethod
    def _check_act_quant(act_quant) -> None:
        raise NotImplementedError

    def _zero_codes(self) -> torch.Tensor:
        """The canonical qweight of the all-zero weight (every code at the zero point)."""
        raise NotImplementedError

    def _qweight_shape(self) -> tuple:
        raise NotImplementedError

    @staticmethod
    def _rtn(weight, group_size, symmetric):
        """Round-to-nearest (qweight, scales, zeros) of a CPU weight."""
        raise NotImplementedError

    def _prepack(self, qweight, scales, zeros):
        """The prepacked layout of the (device's) canonical tensors, or None to keep them."""
        raise NotImplementedError

    def _unprepack(self):
        raise NotImplementedError

    def _fused(self, x, packed, bias):
        """forward on the prepacked layout."""
        raise NotImplementedError

    def _check_canonical(self, qweight, scales, zeros) -> None:
        """Raises unless the canonical tensors fit this layer's shape, naming the tensor."""
        raise NotImplementedError

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = True,
                    act_quant: Optional[str] = None) -> "QuantLinear":
        """Quantizes linear.weight with round-to-nearest into a new layer on its device."""
        cls._check_act_quant(act_quant)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if weight.dtype not in _SCALE_DTYPES:
            raise TypeError(f"linear.weight must be float32, bfloat16 or float16, got {weight.dtype}")
        check_group_size(group_size, linear.in_features)
        qweight, scales, zeros = cls._rtn(weight.cpu(), group_size, symmetric)
        return cls.from_quantized(qweight, scales, None if symmetric else zeros, group_size,
                                  bias=None if linear.bias is None else linear.bias.detach(),
                                  in_features=linear.in_features, device=weight.device,
                                  act_quant=act_quant)

    @classmethod
    def from_quantized(cls, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: Optional[torch.Tensor], group_size: int, in_features: int,
                       bias: Optional[torch.Tensor] = None, device=None,
                       act_quant: Optional[str] = None) -> "QuantLinear":
        """Wraps weights already in the canonical format (zeros None means symmetric)."""
        out_features = qweight.shape[0]
        module = cls(in_features, out_features, bias=bias is not None, group_size=group_size,
                     symmetric=zeros is None, scale_dtype=scales.dtype, device="meta",
                     act_quant=act_quant)
        device = torch.device(device) if device is not None else qweight.device
        module._check_canonical(qweight, scales, zeros)
        module._store(qweight, scales, zeros, device)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone().to(device), requires_grad=False)
        return module

    # ---- weight layout ---------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return (self.packed if self.packed is not None else self.qweight).device

    def _store(self, qweight, scales, zeros, device) -> None:
        """Keeps the weight in the layout of `device` and drops every other copy."""
        device = torch.device(device)
        for name in _LAYOUT_BUFFERS:
            self._buffers[name] = None
        qweight = qweight.to(device).contiguous()
        scales = scales.to(device).contiguous()
        zeros = None if zeros is None else zeros.to(device).contiguous()
        self.packed = self._prepack(qweight, scales, zeros)
        if self.packed is None:
            self.qweight, self.scales, self.zeros = qweight, scales, zeros
        self.scale_dtype = scales.dtype

    def canonical(self):
        """(qweight, scales, zeros) in the canonical format; zeros is None when symmetric."""
        if self.packed is None:
            return self.qweight, self.scales, self.zeros
        qweight, scales, zeros = self._unprepack()
        return qweight, scales, None if self.symmetric else zeros

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 [out_features, in_features] weight this layer computes with, in x's
        column order (input_perm undone, input_scale folded into the columns)."""
        return dequantized_weight(*self.canonical(), self.group_size, self.in_features,
                                  self.input_scale, self.input_perm, self.bits)

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """An nn.Linear computing what this layer computes: the dequantized weight in `dtype`
        (default: the scale dtype), on this layer's device."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device="meta")
        dense.weight = nn.Parameter(self.dequantized_weight().to(dtype or self.scale_dtype),
                                    requires_grad=False)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().clone().to(dtype or self.bias.dtype),
                                      requires_grad=False)
        return dense

    def _apply(self, fn, recurse=True):
        # Layout buffers never go through fn: a dtype cast must not touch the quantized scales,
        # and a device move needs a re-layout, not a copy of the bytes.
        current = self._device()
        target = fn(torch.empty(0, dtype=torch.uint8, device=current)).device
        weights = self.canonical() if target != current else None
        held = {name: self._buffers.pop(name) for name in _LAYOUT_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(held)
        if weights is not None:
            self._store(*weights, target)
        return self

    # ---- state dict: always the canonical format ---------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        qweight, scales, zeros = self.canonical()
        destination[prefix + "qweight"] = qweight
        destination[prefix + "scales"] = scales
        if not self.symmetric:
            destination[prefix + "zeros"] = zeros

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = {name: prefix + name for name in _CANONICAL}
        wanted = ["qweight", "scales"] + ([] if self.symmetric else ["zeros"])
        present = {name: state_dict[key] for name, key in keys.items() if key in state_dict}
        if self.symmetric and "zeros" in present:
            error_msgs.append(f"{prefix}zeros is present but this {type(self).__name__} is "
                              f"symmetric; build it with symmetric=False to load an asymmetric "
                              f"checkpoint")
        missing = [keys[name] for name in wanted if name not in present]
        missing_keys.extend(missing)
        rest = {k: v for k, v in state_dict.items() if k not in keys.values()}
        for name in _OPTIONAL_BUFFERS:  # optional: make room for them; the loader copies them in
            key = prefix + name
            if key not in rest or getattr(self, name) is not None:
                continue
            tensor = rest[key]
            if tuple(tensor.shape) != (self.in_features,):
                error_msgs.append(f"{key}: expected shape [{self.in_features}], "
                                  f"got {list(tensor.shape)}")
                del rest[key]
            elif name == "input_perm" and not is_permutation(tensor):
                error_msgs.append(f"{key}: expected an int64 permutation of 0..{self.in_features - 1}")
                del rest[key]
            else:
                setattr(self, name, torch.empty(self.in_features, device=self._device(),
                                                dtype=tensor.dtype))
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if missing or (self.symmetric and "zeros" in present):
            return
        qweight, scales = present["qweight"], present["scales"]
        zeros = present.get("zeros")
        N, K = self.out_features, self.in_features
        groups = ops.num_groups(K, self.group_size)
        expect = {"qweight": (self._qweight_shape(), (torch.uint8,)),
                  "scales": ((N, groups), _SCALE_DTYPES),
                  "zeros": ((N, groups), (scales.dtype,))}
        for name, tensor in present.items():
            shape, dtypes = expect[name]
            if tuple(tensor.shape) != shape or tensor.dtype not in dtypes:
                error_msgs.append(f"{prefix}{name}: expected shape {list(shape)} and dtype in "
                                  f"{[str(d) for d in dtypes]}, got {list(tensor.shape)} "
                                  f"{tensor.dtype}")
                return
        self._store(qweight.detach(), scales.detach(),
                    None if zeros is None else zeros.detach(), self._device())

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # each attribute of a module is a dictionary walk (Module.__getattr__): in a decode step
        # of ~100 small calls they add up, so each is read once
        packed, bias = self.packed, self.bias
        x = transform_input(x, self.input_perm, self.input_scale)
        if packed is not None:
            return self._fused(x, packed, bias)
        weight = dequantized_weight(self.qweight, self.scales, self.zeros, self.group_size,
                                    self.in_features, bits=self.bits).to(x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, scale_dtype={self.scale_dtype}"
                + (f", act_quant={self.act_quant!r}" if self.act_quant else "")
                + (f", method={self.method!r}" if self.method else "")
                + (", input_perm=True" if self.input_perm is not None else ""))


class Int4Linear(QuantLinear):
    """y = x @ W.T + bias with W stored as 4-bit codes, per-group scales and zero points.

    Build one from a trained layer with `Int4Linear.from_linear(linear, group_size, symmetric)`,
    or construct an empty one and `load_state_dict` a canonical checkpoint into it.
    x may be float32, bfloat16 or float16 with any leading dims; the output has x's dtype.
    act_quant="int8" quantizes x per row (token) to int8 on the fly and multiplies int4 by int8 in
    integer dot products (W4A8, CPU only): faster at large batch, ~1e-2 relative error.
    """
    bits = 4
    symmetric_zero = 8

    @staticmethod
    def _check_act_quant(act_quant) -> None:
        check_act_quant(act_quant)

    def _zero_codes(self) -> torch.Tensor:
        return torch.full(self._qweight_shape(), 0x88, dtype=torch.uint8)  # two codes of 8

    def _qweight_shape(self) -> tuple:
        return (self.out_features, (self.in_features + 1) // 2)

    @staticmethod
    def _rtn(weight, group_size, symmetric):
        return ops.quantize(weight, group_size, symmetric)

    def _prepack(self, qweight, scales, zeros):
        device = qweight.device
        if device.type == "cuda" and not ops.cuda_built():
            raise RuntimeError("int4kit was built without its CUDA kernels, so Int4Linear cannot "
                               "run on a GPU; rebuild with INT4KIT_CUDA=1 (torch with CUDA and "
                               "nvcc are needed)")
        if device.type not in ("cpu", "cuda"):
            return None
        return ops.prepack(qweight, scales, zeros, self.group_size, self.in_features)

    def _check_canonical(self, qweight, scales, zeros) -> None:
        # the op's own checks and messages, on no rows
        ops.dequantize(qweight[:0], scales[:0], None if zeros is None else zeros[:0],
                       self.group_size, self.in_features)

    def _unprepack(self):
        return ops.unprepack(self.packed, self.out_features, self.in_features, self.group_size,
                             self.scale_dtype)

    def _fused(self, x, packed, bias):
        N, K, G = self.out_features, self.in_features, self.group_size
        if self.act_quant == "int8":
            return ops.linear_w4a8(x, packed, N, K, G, bias)
        return ops.linear(x, packed, N, K, G, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None and self._device().type != "cpu":
            raise NotImplementedError(f"Int4Linear(act_quant={self.act_quant!r}) runs on CPU "
                                      f"only; this module is on {self._device()}")
        return super().forward(x)


class Int8Linear(QuantLinear):
    """y = x @ W.T + bias with W stored as 8-bit codes (one byte each, 0..255; zero point 128 when
    symmetric), per-channel or per-group scales and zero points: weight-only int8, for the layers
    a mixed-precision plan keeps above 4 bits (docs/MIXED_PRECISION.md).

    On the CPU the weight is prepacked for the fused kernels (docs/FORMAT.md: the int4 records
    with a byte per code); on CUDA and other devices forward dequantizes and runs the dense
    matmul (cuBLAS on CUDA). Saves, loads and moves between devices like Int4Linear; act_quant
    must be None.
    """
    bits = 8
    symmetric_zero = 128

    @staticmethod
    def _check_act_quant(act_quant) -> None:
        if act_quant is not None:
            raise ValueError(f"Int8Linear has no activation quantization: act_quant must be None, "
                             f"got {act_quant!r}")

    def _zero_codes(self) -> torch.Tensor:
        return torch.full(self._qweight_shape(), self.symmetric_zero, dtype=torch.uint8)

    def _qweight_shape(self) -> tuple:
        return (self.out_features, self.in_features)

    @staticmethod
    def _rtn(weight, group_size, symmetric):
        if not torch.isfinite(weight).all():
            raise ValueError("linear.weight contains NaN or Inf")
        return reference.quantize(weight, group_size, symmetric, bits=8)

    def _prepack(self, qweight, scales, zeros):
        if qweight.device.type != "cpu":
            return None
        return ops.prepack_int8(qweight, scales, zeros, self.group_size)

    def _check_canonical(self, qweight, scales, zeros) -> None:
        """Raises ValueError unless the canonical tensors fit this layer's shape."""
        groups = ops.num_groups(self.in_features, self.group_size)
        expect = {"qweight": (qweight, self._qweight_shape(), (torch.uint8,)),
                  "scales": (scales, (self.out_features, groups), _SCALE_DTYPES)}
        if zeros is not None:
            expect["zeros"] = (zeros, (self.out_features, groups), (scales.dtype,))
        for name, (tensor, shape, dtypes) in expect.items():
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or (
                    tensor.dtype not in dtypes):
                got = (f"{list(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor)
                       else type(tensor).__name__)
                raise ValueError(f"{name} must have shape {list(shape)} and dtype in "
                                 f"{[str(d) for d in dtypes]} for a {type(self).__name__} of "
                                 f"in_features {self.in_features} at group_size "
                                 f"{self.group_size}, got {got}")

    def _unprepack(self):
        return ops.unprepack_int8(self.packed, self.out_features, self.in_features,
                                  self.group_size, self.scale_dtype)

    def _fused(self, x, packed, bias):
        return ops.linear_int8(x, packed, self.out_features, self.in_features, self.group_size,
                               bias)
