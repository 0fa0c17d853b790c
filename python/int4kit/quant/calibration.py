"""Calibration engine: streaming statistics of each nn.Linear's input, by forward hooks.

Nothing stores activations beyond one batch: each hook folds its batch into the layer's running
statistics at once (with norm weighting, once the norm below has seen the batch):
  * H = sum over tokens of x x^T (the GPTQ/AWQ Hessian up to a factor), accumulated in float64 from
    float32 per-batch products (float32 above K = 4096, to bound memory: `matrix_dtype`);
  * sum over tokens of |x| per input channel (AWQ's activation magnitude);
  * the token count.
Padding tokens are left out: when a batch is a mapping with an `attention_mask`, a layer input
whose leading dims equal the mask's shape keeps only the rows where the mask is nonzero.

Norm weighting (`QuantConfig.norm_weighting`): a layer's output error reaches the next LayerNorm /
RMSNorm (BERT: attention.output.dense -> attention.output.LayerNorm, output.dense ->
output.LayerNorm; directly, or through the attention or the FFN's activation for query, key,
value and intermediate.dense) and is divided there by that token's sigma_t = sqrt(var_t + eps) of
the norm's input: the norm's Jacobian is diag(gamma) P / sigma_t (P a projection). So what the
model feels of an output error e_t is ~e_t / sigma_t, and the statistic that matches it is
H = sum_t x_t x_t^T / sigma_t^2, not sum_t x_t x_t^T (exact for a layer that feeds the norm
through a residual sum; per token, ignoring what attention mixes, for the others). `plan_norms`
finds each layer's next norm (the first one called after it); `collect` holds a layer's rows of a
batch until that norm's pre-hook has seen the batch and then adds them with weights 1 / sigma_t^2.
Weighting is all or nothing per layer: a batch whose norm input does not line up with the layer's
rows (or that never reaches the norm) marks the layer (LayerStats.norm_weighted = False), and
quantize_model recollects that layer's statistics unweighted and notes it in the report.
In BERT the [CLS] token reaches the FFN's LayerNorm with sigma up to 11 (other tokens ~0.8), so
unweighted, its huge FFN activations dominate output.dense's Hessian although its errors are
scaled down ~100x there.

`plan_stages` runs one batch through the model to find the order in which the target layers are
called, and groups consecutive layers that read the very same input tensor (BERT's query, key and
value) into one stage; `quantize_model` then calibrates stage after stage, with every earlier stage
already quantized in place ("true sequential"). Each stage reruns the calibration batches, and a
forward pass stops (by an exception raised from the hook) as soon as every layer of the stage has
seen the batch, so a stage costs only the model up to that point.
"""
import contextlib
import copy
import functools
import itertools
from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import ops

try:  # progress bars when tqdm is available
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None


class CalibrationError(ValueError):
    """Calibration data that cannot be used (empty, or producing NaN/inf activations)."""


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has recorded what it needs."""


def progress(iterable, enabled: bool, **kwargs):
    if enabled and _tqdm is not None:
        return _tqdm(iterable, **kwargs)
    return iterable


def _tensors_of(item) -> List[Tuple[str, torch.Tensor]]:
    if isinstance(item, Mapping):
        return [(str(k), v) for k, v in item.items() if isinstance(v, torch.Tensor)]
    if isinstance(item, tuple):
        return [(f"item {i}", v) for i, v in enumerate(item) if isinstance(v, torch.Tensor)]
    return [("the batch", item)] if isinstance(item, torch.Tensor) else []


def check_batches(model: nn.Module, batches: List) -> None:
    """Refuses calibration data that cannot work before anything is computed or changed: empty
    tensors, NaN or inf, tensors on another device than the model's parameters."""
    devices = {p.device for p in model.parameters()}
    # a model on one device needs its inputs there; one spread over devices (a device_map)
    # moves them itself
    device = next(iter(devices)) if len(devices) == 1 and not hasattr(model, "hf_device_map") \
        else None
    for i, item in enumerate(batches):
        tensors = _tensors_of(item)
        if not tensors:
            raise CalibrationError(f"calib_data batch {i} holds no tensor (expected a tensor, a "
                                   f"tuple of tensors or a mapping such as a tokenizer's output)")
        for name, tensor in tensors:
            if tensor.device.type == "meta" or (device is not None and tensor.device != device):
                raise CalibrationError(f"calib_data batch {i}: {name} is on {tensor.device}, the "
                                       f"model's parameters on {device or 'several devices'}")
            if tensor.numel() == 0:
                raise CalibrationError(f"calib_data batch {i}: {name} is empty "
                                       f"(shape {list(tensor.shape)})")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CalibrationError(f"calib_data batch {i}: {name} holds NaN or inf")


def call_model(model: nn.Module, item, index: int = 0):
    """item -> model(**item) if a mapping, model(*item) if a tuple, else model(item). An error
    the model raises on the batch (a wrong dtype, a wrong shape) comes out as a CalibrationError
    naming batch `index`."""
    try:
        if isinstance(item, Mapping):
            return model(**item)
        if isinstance(item, tuple):
            return model(*item)
        return model(item)
    except (StopForward, CalibrationError, MemoryError, torch.OutOfMemoryError):
        raise  # out-of-memory stays itself: callers retry with less data
    except Exception as error:  # noqa: BLE001  (re-raised with the batch named)
        raise CalibrationError(f"calib_data batch {index}: the model raised "
                               f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                               ) from error


def attention_mask_of(item) -> Optional[torch.Tensor]:
    if isinstance(item, Mapping) and item.get("attention_mask") is not None:
        return item["attention_mask"]
    return None


@functools.lru_cache(maxsize=None)
def _fast_bf16_matmul() -> bool:
    """Whether a bf16 matmul beats fp32 on this CPU: with AMX tiles (oneDNN uses them)."""
    return ops.cpu_isa_supported("amx")


# K x K statistics accumulate in float64 while that takes at most this many bytes (K <= 4096),
# in float32 above (K = 28672: 3.1 GiB instead of 6.1); the GPTQ solve follows the same rule.
FLOAT64_MATRIX_BYTES = 128 << 20


def matrix_dtype(K: int) -> torch.dtype:
    """The dtype of a K x K statistic or solve (FLOAT64_MATRIX_BYTES)."""
    return torch.float64 if K * K * 8 <= FLOAT64_MATRIX_BYTES else torch.float32


class LayerStats:
    """Running input statistics of one Linear layer."""

    def __init__(self, in_features: int, hessian: bool = True, absmean: bool = True,
                 max_tokens: Optional[int] = None):
        self.in_features = in_features
        self.H = (torch.zeros(in_features, in_features, dtype=matrix_dtype(in_features))
                  if hessian else None)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64) if absmean else None
        # unweighted sum of x^2 per input channel: what shift_report compares new data with
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64)
        self.count = 0
        self.max_tokens = max_tokens
        # None: no norm weighting asked; True: every batch weighted; False: some batch could not be
        self.norm_weighted: Optional[bool] = None

    @property
    def full(self) -> bool:
        return self.max_tokens is not None and self.count >= self.max_tokens

    def add(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> None:
        """x [tokens, in_features]; weight [tokens] (optional, non-negative): each token's weight
        in H (sum_t weight_t x_t x_t^T). The absolute mean and the count stay unweighted."""
        if self.max_tokens is not None:
            x = x[:max(0, self.max_tokens - self.count)]
            weight = None if weight is None else weight[:x.shape[0]]
        if x.shape[0] == 0:
            return
        x = x.detach().to("cpu", torch.float32)
        if self.H is not None:
            xw = x if weight is None else x * weight.to("cpu", torch.float32).sqrt()[:, None]
            if _fast_bf16_matmul():
                # X^T X on the bf16 matrix units (AMX): ~2.5x faster than fp32 here, and the
                # Hessian's ~1e-3 relative rounding moves GPTQ's layer objective by < 0.1%
                xb = xw.bfloat16()
                self.H += xb.T.contiguous() @ xb
            elif self.H.dtype == torch.float32:
                self.H.addmm_(xw.T, xw)  # no K x K temporary (121 MiB at K = 5632)
            else:  # float64 sums of float32 products; one float32 K x K temporary
                self.H.add_(xw.T @ xw)
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(0).double()
        self.sq_sum += x.square().sum(0).double()
        self.count += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """Mean x x^T over the tokens seen (matrix_dtype: float64 up to K = 4096)."""
        return self.H / max(self.count, 1)

    def clone(self) -> "LayerStats":
        """A copy with its own running Hessian (the other sums are shared, read-only): one
        consumer can take_hessian from it while these statistics serve the next."""
        other = copy.copy(self)
        other.H = None if self.H is None else self.H.clone()
        return other

    def take_hessian(self) -> torch.Tensor:
        """`hessian`, made in place from the running sum, which these statistics then no longer
        hold: for the one consumer of a layer's statistics, without a second K x K copy."""
        H, self.H = self.H, None
        return H.div_(max(self.count, 1))

    @property
    def absmean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    @property
    def sq_mean(self) -> torch.Tensor:
        """Mean x^2 per input channel (float32), unweighted."""
        return (self.sq_sum / max(self.count, 1)).float()


def _rows(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is not None and x.dim() >= 2 and tuple(x.shape[:-1]) == tuple(mask.shape):
        x = x[mask.to(x.device) != 0]
    return x.reshape(-1, x.shape[-1])


def is_norm(module: nn.Module) -> bool:
    """LayerNorm (nn.LayerNorm and subclasses) or RMS norm (nn.RMSNorm, or a class named *RMSNorm
    such as transformers' LlamaRMSNorm)."""
    rms = getattr(nn, "RMSNorm", None)
    return (isinstance(module, nn.LayerNorm) or (rms is not None and isinstance(module, rms))
            or type(module).__name__.endswith("RMSNorm"))


# A token's weight is at most this many times the batch's median weight: a row that reaches the
# norm (almost) constant has sigma ~ sqrt(eps), and BERT's eps = 1e-12 would weigh it 1e12 times.
MAX_NORM_WEIGHT_RATIO = 1e4


def norm_weights(norm: nn.Module, u: torch.Tensor) -> torch.Tensor:
    """1 / sigma_t^2 per row of u [tokens, features], the input of `norm`: sigma_t^2 = variance +
    eps for a LayerNorm, mean square + eps for an RMS norm (float32), floored at the batch median
    / MAX_NORM_WEIGHT_RATIO. Raises CalibrationError when u holds NaN or inf."""
    u = u.detach().float()
    if not bool(torch.isfinite(u).all()):
        raise CalibrationError(f"the input of norm {type(norm).__name__} holds NaN or inf during "
                               f"calibration; check the batch (or the model in full precision)")
    if isinstance(norm, nn.LayerNorm):
        var = u.var(-1, unbiased=False)
    else:
        var = u.pow(2).mean(-1)
    eps = getattr(norm, "eps", None)
    if eps is None:
        eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = torch.finfo(torch.float32).eps
    sigma2 = var + float(eps)
    floor = float(sigma2.median()) / MAX_NORM_WEIGHT_RATIO
    return 1.0 / sigma2.clamp_min(max(floor, torch.finfo(torch.float32).tiny))


def collect(model: nn.Module, batches: List, layers: Dict[str, nn.Module], hessian: bool = True,
            absmean: bool = True, max_tokens: Optional[int] = None, stop_early: bool = True,
            show_progress: bool = False, desc: str = "calibrating",
            norms: Optional[Dict[str, nn.Module]] = None) -> Dict[str, LayerStats]:
    """Runs `batches` through `model` and returns each named layer's LayerStats.

    norms: layer name -> the norm module its output reaches first (`plan_norms`); those layers'
    tokens are weighted in H by 1 / sigma_t^2 of the norm's input (module docstring). A batch whose
    norm input does not line up token for token with the layer's input (other row count), or
    never reaches the norm, adds that layer's rows unweighted and sets its norm_weighted to False
    (the caller recollects such a layer without weighting).

    Raises CalibrationError when a layer's or a norm's input holds NaN or inf."""
    stats = {name: LayerStats(m.in_features, hessian, absmean, max_tokens)
             for name, m in layers.items()}
    state = {"mask": None, "batch": 0, "seen": set()}
    norms = {name: n for name, n in (norms or {}).items() if name in layers}
    for name in norms:
        stats[name].norm_weighted = True
    users: Dict[int, List[str]] = {}  # id(norm) -> the layers waiting for it
    for name, n in norms.items():
        users.setdefault(id(n), []).append(name)
    pending: Dict[str, torch.Tensor] = {}  # this batch's rows of layers waiting for their norm
    wanted = set(layers) | {("norm", k) for k in users}

    def make_hook(name):
        def hook(module, inputs, output):
            if not inputs or not torch.is_tensor(inputs[0]):
                return
            x = _rows(inputs[0].detach(), state["mask"])
            if not bool(torch.isfinite(x).all()):
                raise CalibrationError(
                    f"calibration batch {state['batch']} produces NaN or inf in the input of "
                    f"layer {name!r}; check the batch (or the model in full precision)")
            if name in norms:  # a second call before the norm: rows no longer line up
                pending[name] = torch.cat([pending[name], x]) if name in pending else x
            else:
                stats[name].add(x)
            state["seen"].add(name)
            if stop_early and state["seen"] >= wanted:
                raise StopForward
        return hook

    def add_unweighted(name, x):
        stats[name].add(x)
        stats[name].norm_weighted = False

    def make_norm_hook(norm):
        def hook(module, args, kwargs):
            waiting = [n for n in users[id(norm)] if n in pending]
            u = next((t for t in (*args, *kwargs.values()) if torch.is_tensor(t)), None)
            if not waiting or u is None:
                return
            w = norm_weights(norm, _rows(u.detach(), state["mask"])).cpu()
            for name in waiting:
                x = pending.pop(name)
                if w.shape[0] == x.shape[0]:
                    stats[name].add(x, w)
                else:
                    add_unweighted(name, x)
            state["seen"].add(("norm", id(norm)))
            if stop_early and state["seen"] >= wanted:
                raise StopForward
        return hook

    def flush():  # rows whose norm was not reached in this batch
        for name in list(pending):
            add_unweighted(name, pending.pop(name))

    registrations = itertools.chain(
        (m.register_forward_hook(make_hook(name)) for name, m in layers.items()),
        (norms[names[0]].register_forward_pre_hook(make_norm_hook(norms[names[0]]), with_kwargs=True)
         for names in users.values()))
    with hooks(registrations), torch.no_grad():
        for i, item in enumerate(progress(batches, show_progress, desc=desc, leave=False)):
            if all(s.full for s in stats.values()):
                break
            state.update(mask=attention_mask_of(item), batch=i, seen=set())
            try:
                call_model(model, item, i)
            except StopForward:
                pass
            flush()
    return stats


def collect_weighted(model: nn.Module, batches: List, layers: Dict[str, nn.Module],
                     norms: Dict[str, nn.Module], **kwargs
                     ) -> Tuple[Dict[str, LayerStats], List[str]]:
    """`collect` with norm weighting for the layers in `norms`; weighting is all or nothing per
    layer, so a layer whose rows did not line up with its norm's input in every batch is
    collected again, unweighted. Returns (stats, the layers collected again)."""
    stats = collect(model, batches, layers, norms=norms, **kwargs)
    again = [n for n in layers if stats[n].norm_weighted is False]
    if again:
        stats.update(collect(model, batches, {n: layers[n] for n in again}, **kwargs))
    return stats, again


@contextlib.contextmanager
def hooks(registrations: Iterable):
    """Holds the hooks that `registrations` registers as it is consumed; every hook registered is
    removed on leaving, whatever happens (also when a registration part-way fails)."""
    handles = []
    try:
        for handle in registrations:
            handles.append(handle)
        yield
    finally:
        for h in handles:
            h.remove()


def _forward_with_hooks(model: nn.Module, batch, registrations: Iterable) -> None:
    """Runs one batch through `model` (no grad) with the hooks `registrations` registers."""
    with hooks(registrations), torch.no_grad():
        call_model(model, batch)


def plan_stages(model: nn.Module, batch, layers: Dict[str, nn.Module]
                ) -> Tuple[List[List[str]], List[str]]:
    """Runs one batch and returns (stages in call order, layer names never called).

    A stage is a run of consecutive calls that read the same input tensor; a layer called several
    times is placed at its first call."""
    order: List[str] = []
    inputs: List[Optional[torch.Tensor]] = []
    # `inputs` keeps each input of this one batch alive until the comparison below, so two layers
    # can never look alike through a reused allocation

    def make_hook(name):
        def hook(module, inp, output):
            if name in order:
                return
            x = inp[0] if inp and torch.is_tensor(inp[0]) else None
            order.append(name)
            inputs.append(x)
        return hook

    _forward_with_hooks(model, batch, (m.register_forward_hook(make_hook(name))
                                       for name, m in layers.items()))
    stages: List[List[str]] = []
    for i, name in enumerate(order):
        same = (i > 0 and inputs[i] is not None and inputs[i - 1] is not None
                and inputs[i] is inputs[i - 1])
        if same:
            stages[-1].append(name)
        else:
            stages.append([name])
    unreached = [name for name in layers if name not in order]
    return stages, unreached


def plan_norms(model: nn.Module, batch, layers: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
    """Runs one batch and returns, for each layer of `layers`, the first norm module (`is_norm`)
    called after the layer's first call; layers with no norm after them are left out."""
    order: List[Tuple[str, object]] = []
    seen = set()

    def layer_hook(name):
        def hook(module, inp, output):
            if name not in seen:
                seen.add(name)
                order.append(("layer", name))
        return hook

    def norm_hook(module, inp, output):
        order.append(("norm", module))

    _forward_with_hooks(model, batch, itertools.chain(
        (m.register_forward_hook(layer_hook(name)) for name, m in layers.items()),
        (m.register_forward_hook(norm_hook) for m in model.modules() if is_norm(m))))
    out: Dict[str, nn.Module] = {}
    for i, (kind, obj) in enumerate(order):
        if kind == "layer":
            nxt = next((o for k, o in order[i + 1:] if k == "norm"), None)
            if nxt is not None:
                out[obj] = nxt
    return out
