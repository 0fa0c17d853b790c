"""distill_loss: the student (quantized) model learns to reproduce the teacher (full precision)."""
from collections.abc import Mapping
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .fake_quant import QATError

POOLINGS = ("mean", "cls", "pooler")


def _field(out, name: str):
    if isinstance(out, Mapping):
        return out.get(name)
    return getattr(out, name, None)


def _tensor(out, name: str, what: str) -> torch.Tensor:
    """out itself when it is a tensor, else its field `name` (a ModelOutput's or a dict's)."""
    if torch.is_tensor(out):
        return out
    value = _field(out, name)
    if not torch.is_tensor(value):
        raise ValueError(f"{what}: expected a tensor or a model output with {name!r}, got "
                         f"{type(out).__name__} without it")
    return value


def _token_mask(x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The mask as float [B, L, 1] when x is [B, L, ...] token-aligned with it, else None."""
    if attention_mask is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(attention_mask.shape):
        return None
    return attention_mask.to(x.device, torch.float32)[..., None]


def _masked_mean(per_token: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of per_token [B, L, 1 or F] over the tokens the mask keeps (and the features)."""
    if mask is None:
        return per_token.mean()
    kept = mask.sum() * per_token.shape[-1]
    return (per_token * mask).sum() / kept.clamp_min(1)


def pooled(out, attention_mask: Optional[torch.Tensor] = None, pooling: str = "mean"
           ) -> torch.Tensor:
    """A sentence embedding [B, H] from a tensor [B, L, H] or [B, H], or from a model output:
    "mean" over the tokens the attention mask keeps (sentence-transformers' pooling), "cls" (the
    first token) or "pooler" (the output's pooler_output)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "pooler":
        return _tensor(out, "pooler_output", "pooling='pooler'").float()
    x = _tensor(out, "last_hidden_state", "the pooled output").float()
    if x.dim() == 2:
        return x
    if x.dim() != 3:
        raise ValueError(f"expected embeddings [batch, hidden] or hidden states [batch, tokens, "
                         f"hidden], got shape {list(x.shape)}")
    if pooling == "cls":
        return x[:, 0]
    mask = _token_mask(x, attention_mask)
    if mask is None:
        return x.mean(1)
    return (x * mask).sum(1) / mask.sum(1).clamp_min(1)


def distill_loss(student_out, teacher_out, *, kl: float = 0.0, cosine: float = 0.0,
                 mse: float = 0.0, hidden: float = 0.0, temperature: float = 1.0,
                 attention_mask: Optional[torch.Tensor] = None,
                 hidden_layers: Optional[Sequence[int]] = None,
                 pooling: str = "mean") -> torch.Tensor:
    """Weighted sum of distillation terms between a student's and a teacher's outputs (tensors,
    dicts or Hugging Face model outputs; the teacher's are detached):

    kl: KL(teacher || student) of softmax(logits / temperature), times temperature^2 (Hinton et
      al.), averaged over the tokens the attention mask keeps (logits [B, L, V]) or the rows.
    cosine: 1 - cosine of the pooled embeddings (`pooled`, with `pooling`), averaged.
    mse: mean squared error of the pooled embeddings.
    hidden: mean squared error of the hidden states `hidden_layers` (indices into the outputs'
      hidden_states: run both models with output_hidden_states=True), padding tokens left out.
    Raises QATError when the loss is NaN or inf (naming the term), ValueError on bad arguments."""
    weights = {"kl": kl, "cosine": cosine, "mse": mse, "hidden": hidden}
    for name, value in weights.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"{name} must be a non-negative weight, got {value!r}")
    if not any(weights.values()):
        raise ValueError("give at least one of kl, cosine, mse, hidden a positive weight")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    terms = {}
    if kl:
        s = _tensor(student_out, "logits", "kl (student)").float()
        t = _tensor(teacher_out, "logits", "kl (teacher)").detach().float()
        _same_shape("kl logits", s, t)
        per_row = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                           reduction="none", log_target=True).sum(-1, keepdim=True)
        terms["kl"] = _masked_mean(per_row, _token_mask(s, attention_mask)) * temperature ** 2
    if cosine or mse:
        s = pooled(student_out, attention_mask, pooling)
        t = pooled(teacher_out, attention_mask, pooling).detach()
        _same_shape("pooled embeddings", s, t)
        if cosine:
            terms["cosine"] = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
        if mse:
            terms["mse"] = F.mse_loss(s, t)
    if hidden:
        terms["hidden"] = _hidden_mse(student_out, teacher_out, attention_mask, hidden_layers)
    for name, value in terms.items():
        if not bool(torch.isfinite(value)):
            raise QATError(f"distill_loss: the {name} term is {float(value)} (NaN or inf "
                           f"activations in the student or the teacher: training diverged, or "
                           f"the batch holds NaN)")
    return sum(weights[name] * value for name, value in terms.items())


def _same_shape(what, s, t):
    if s.shape != t.shape:
        raise ValueError(f"{what}: student shape {list(s.shape)} != teacher shape "
                         f"{list(t.shape)}")


def _hidden_mse(student_out, teacher_out, attention_mask, layers) -> torch.Tensor:
    if not layers:
        raise ValueError("hidden > 0 needs hidden_layers, the indices of the hidden states to "
                         "match (e.g. [-1] or [2, 4, 6])")
    s_all, t_all = _field(student_out, "hidden_states"), _field(teacher_out, "hidden_states")
    if s_all is None or t_all is None:
        raise ValueError("hidden > 0 needs the outputs' hidden_states: run both models with "
                         "output_hidden_states=True")
    losses = []
    for i in layers:
        if not -len(s_all) <= i < len(s_all) or not -len(t_all) <= i < len(t_all):
            raise ValueError(f"hidden_layers index {i} is out of range for {len(s_all)} hidden "
                             f"states")
        s, t = s_all[i].float(), t_all[i].detach().float()
        _same_shape(f"hidden state {i}", s, t)
        losses.append(_masked_mean((s - t) ** 2, _token_mask(s, attention_mask)))
    return torch.stack(losses).mean()
