"""Scaled dot-product attention (FlashAttention; Dao et al. 2022, 2023) as a drop-in for
``torch.nn.functional.scaled_dot_product_attention``, with its log-sum-exp, dropout, gradients,
the merging of results computed over key/value shards, and key/value-cache decoding.

The kernels compute ``softmax(scale * q k^T + bias) v`` tile by tile with the online softmax and
never form the ``L x S`` score matrix; the backward pass recomputes the weights from the saved
log-sum-exp, and dropout regenerates its mask from a Philox seed instead of storing it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _backend, _checks, reference
from ._backend import _C, DTYPE_CODES, custom_op, launch_for
from ._rng import draw_seed

ALIGNMENTS = ("top_left", "bottom_right")
_CPU_EXTRA = (torch.bfloat16,)  # the CPU kernel also takes bfloat16 (accumulating in float32)
_BOOL_CODE = 6


@custom_op("genkernels::attention_forward", mutates_args=())
def _attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    kv_lens: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    dropout_p: float,
    seed: Optional[Tensor],
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """q (B, Hq, L, E), k (B, H, S, E), v (B, H, S, Ev), mask broadcast to (B, Hq, L, S) by
    strides, kv_lens (B,) int32, seed (2,) int64 for dropout or None: returns out (B, Hq, L, Ev)
    and lse (B, Hq, L) float32. ``deterministic`` is for the backward pass (the CUDA kernels'
    choice between the fused path with atomics and the one without)."""
    if q.shape[-1] == 0 or v.shape[-1] == 0:  # empty feature dimensions: nothing for a kernel to read
        return _attention_without_features(q, k, v, mask, kv_lens, scale, window_left, window_right, bottom_right, dropout_p, seed)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, heads_q, len_q, _ = q.shape
    out = torch.empty((batch, heads_q, len_q, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, len_q), dtype=torch.float32, device=q.device)
    run = launch_for(q)
    run.module.attention_forward(
        run.where, run.stream, *(t.data_ptr() for t in (q, k, v, out, lse)), *_layout(q, k, v, mask),
        kv_lens.data_ptr() if kv_lens is not None else 0,
        scale, window_left, window_right, bottom_right, dropout_p, _seed_ptr(seed), DTYPE_CODES[q.dtype],
    )
    return out, lse


def _layout(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> list:
    """Sizes, strides and the mask of an attention problem, as the bindings take them."""
    if mask is not None and mask.dtype == torch.bool:
        mask_code = _BOOL_CODE
    else:
        mask_code = DTYPE_CODES[mask.dtype] if mask is not None else DTYPE_CODES[q.dtype]
    batch, heads_q, len_q, dim_qk = q.shape
    heads_kv, len_kv, dim_v = k.shape[1], k.shape[2], v.shape[3]
    return [
        [batch, heads_q, heads_kv, len_q, len_kv, dim_qk, dim_v], list(q.stride()[:3]), list(k.stride()[:3]),
        list(v.stride()[:3]), mask.data_ptr() if mask is not None else 0, mask_code,
        list(mask.stride()) if mask is not None else [0, 0, 0, 0],
    ]


def _seed_ptr(seed: Optional[Tensor]) -> int:
    return seed.data_ptr() if seed is not None else 0


def _attention_without_features(q, k, v, mask, kv_lens, scale, window_left, window_right, bottom_right, dropout_p, seed):
    """The reference definition, for the degenerate sizes E = 0 or Ev = 0."""
    heads_q, heads_kv = q.shape[1], k.shape[1]
    keep = None
    if seed is not None:
        keep = reference.attention_dropout_mask(seed, (q.shape[0], heads_q, q.shape[2], k.shape[2]), dropout_p).to(q.device)
    out, lse = reference.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, scale=scale, enable_gqa=heads_q != heads_kv,
        causal_alignment="bottom_right" if bottom_right else "top_left", window=(window_left, window_right), kv_lens=kv_lens,
        dropout_mask=keep, dropout_p=dropout_p,
    )
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


@_attention_forward.register_fake
def _(q, k, v, mask, kv_lens, scale, window_left, window_right, bottom_right, dropout_p, seed, deterministic):
    batch, heads_q, len_q, _ = q.shape
    out = q.new_empty((batch, heads_q, len_q, v.shape[3]))
    return out, q.new_empty((batch, heads_q, len_q), dtype=torch.float32)


@custom_op("genkernels::attention_backward", mutates_args=())
def _attention_backward(
    dout: Tensor,
    dlse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    dropout_p: float,
    seed: Optional[Tensor],
    mask_grad: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of attention_forward from dout (B, Hq, L, Ev) and dlse (B, Hq, L): dq, dk, dv in
    the shapes of q, k, v (dk, dv summed over each key/value head's query heads) and, with
    mask_grad, the gradient of the additive mask as a float32 (B, Hq, L, S) tensor (else empty).
    Without ``deterministic`` the CUDA kernels may sum dq by atomics."""
    batch, heads_q, len_q, dim_qk = q.shape
    heads_kv, len_kv, dim_v = k.shape[1], k.shape[2], v.shape[3]
    if dim_qk == 0 or dim_v == 0:
        return _backward_without_features(dout, dlse, q, k, v, mask, scale, window_left, window_right, bottom_right, dropout_p, seed, mask_grad)
    q, k, v, dout = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, dout))
    out, lse, dlse = out.contiguous(), lse.contiguous(), dlse.float().contiguous()
    dq = torch.empty((batch, heads_q, len_q, dim_qk), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, heads_kv, len_kv, dim_qk), dtype=q.dtype, device=q.device)
    dv = torch.empty((batch, heads_kv, len_kv, dim_v), dtype=q.dtype, device=q.device)
    # Weights outside the band are never visited: their mask gradient stays 0.
    dbias = torch.zeros((batch, heads_q, len_q, len_kv) if mask_grad else (0,), dtype=torch.float32, device=q.device)
    run = launch_for(q)
    run.module.attention_backward(
        run.where, run.stream, dout.data_ptr(), list(dout.stride()[:3]), dlse.data_ptr(),
        *(t.data_ptr() for t in (q, k, v, out, lse, dq, dk, dv)), dbias.data_ptr() if mask_grad else 0,
        *_layout(q, k, v, mask),
        scale, window_left, window_right, bottom_right, dropout_p, _seed_ptr(seed), DTYPE_CODES[q.dtype], deterministic,
    )
    return dq, dk, dv, dbias


def _backward_without_features(dout, dlse, q, k, v, mask, scale, window_left, window_right, bottom_right, dropout_p, seed, mask_grad):
    """The backward formulas on the reference's weights, for the degenerate sizes E = 0 or
    Ev = 0 (autograd does not record inside a custom op)."""
    batch, heads_q, len_q, _ = q.shape
    heads_kv, len_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    eye = torch.eye(len_kv, device=q.device).expand(batch, heads_kv, len_kv, len_kv)
    weights, _ = _attention_without_features(q, k, eye, mask, None, scale, window_left, window_right, bottom_right, 0.0, None)
    weights = weights.float()  # P (B, Hq, L, S)
    keep = torch.ones_like(weights)
    if seed is not None:
        factor = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
        keep = reference.attention_dropout_mask(seed, tuple(weights.shape), dropout_p).to(q.device) * factor
    values = v.float().repeat_interleave(group, 1)
    dout = dout.float()
    d_weights = (dout @ values.mT) * keep
    delta = (dout * ((weights * keep) @ values)).sum(-1) - dlse.float()
    d_scores = weights * (d_weights - delta.unsqueeze(-1))  # (B, Hq, L, S)
    dq = scale * d_scores @ k.float().repeat_interleave(group, 1)
    dk = (scale * d_scores.mT @ q.float()).unflatten(1, (heads_kv, group)).sum(2)
    dv = ((weights * keep).mT @ dout).unflatten(1, (heads_kv, group)).sum(2)
    dbias = d_scores.contiguous() if mask_grad else q.new_zeros((0,), dtype=torch.float32)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dbias


@_attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, mask, scale, window_left, window_right, bottom_right, dropout_p, seed, mask_grad,
      deterministic):
    batch, heads_q, len_q, _ = q.shape
    dbias_shape = (batch, heads_q, len_q, k.shape[2]) if mask_grad else (0,)
    return (
        q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape),
        q.new_empty(dbias_shape, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, kv_lens, scale, window_left, window_right, bottom_right, dropout_p, seed, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, seed, out, lse)
    ctx.attrs = (scale, window_left, window_right, bottom_right, dropout_p, deterministic)
    ctx.has_kv_lens = kv_lens is not None
    ctx.mask_grad = mask is not None and mask.dtype != torch.bool and mask.requires_grad


def _backward(ctx, dout: Tensor, dlse: Tensor):
    if ctx.has_kv_lens:
        raise RuntimeError("attention with a key/value cache (kv_lens) is not differentiable")
    q, k, v, mask, seed, out, lse = ctx.saved_tensors
    scale, window_left, window_right, bottom_right, dropout_p, deterministic = ctx.attrs
    dq, dk, dv, dbias = _attention_backward(
        dout, dlse, q, k, v, out, lse, mask, scale, window_left, window_right, bottom_right, dropout_p, seed,
        ctx.mask_grad, deterministic,
    )
    dmask = dbias.to(mask.dtype) if ctx.mask_grad else None
    return dq, dk, dv, dmask, None, None, None, None, None, None, None, None


_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _window(fn: str, window: object) -> tuple[int, int]:
    """(left, right) with -1 (or None) for an unbounded side."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"{fn}(): argument 'window' must be a (left, right) pair of ints or None, got {window!r}")
    bounds = []
    for name, side in zip(("window[0]", "window[1]"), window):
        bounds.append(-1 if side is None else _checks.integer(fn, name, side, minimum=-1))
    return bounds[0], bounds[1]


def _merge_leading(t: Tensor, keep: int) -> Tensor:
    """Views t (*lead, rest...) as (prod(lead), rest...) with `keep` trailing dims; a view
    when the strides allow (broadcast masks stay broadcast), a copy otherwise."""
    # reshape views when it can, without raising and catching an exception inside torch (which
    # aborts a process run under AddressSanitizer's LD_PRELOAD, as the sanitizer tests do).
    batch = math.prod(t.shape[: t.dim() - keep])
    return t.reshape((batch,) + tuple(t.shape[t.dim() - keep:]))


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    causal_alignment: str = "top_left",
    window: Optional[Sequence[Optional[int]]] = None,
    return_lse: bool = False,
    generator: Optional[torch.Generator] = None,
    deterministic: Optional[bool] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention with the semantics of ``torch.nn.functional.scaled_dot_product_attention``.

    ``query`` is ``(N, ..., Hq, L, E)``, ``key`` ``(N, ..., H, S, E)``, ``value``
    ``(N, ..., H, S, Ev)``; the result is ``(N, ..., Hq, L, Ev)`` in the query's dtype. A boolean
    ``attn_mask`` marks the keys to attend (True); a float mask (float32 or the query's dtype) is
    added to the scores; masks broadcast to ``(N, ..., Hq, L, S)``. ``is_causal`` masks keys
    after the query's position, aligned top-left (PyTorch) or, with
    ``causal_alignment="bottom_right"``, bottom-right (flash-attention: the last query sees
    every key). ``scale`` defaults to ``1/sqrt(E)``. With ``enable_gqa``, query head ``j`` uses
    key/value head ``j // (Hq // H)``. A query with no key to attend gets zeros.

    Extensions: ``window=(left, right)`` keeps only keys within ``left`` positions before and
    ``right`` after the query's diagonal (``-1`` or ``None``: unbounded), combining with
    ``is_causal``; ``return_lse=True`` also returns the float32 log-sum-exp of each query's
    scores, shape ``(N, ..., Hq, L)``, 0 where no key is attended.

    With ``dropout_p > 0`` each attention weight is dropped with probability ``dropout_p`` and the
    kept ones are scaled by ``1 / (1 - dropout_p)`` (always, as in PyTorch: pass 0 in
    evaluation). The mask comes from a Philox stream seeded from ``generator`` (the default
    generator of the device when None), the same on the CPU and on CUDA, and is regenerated in
    the backward pass; ``attention_dropout_mask`` returns it. The log-sum-exp is that of the
    scores, without dropout.

    Differentiable in ``query``, ``key``, ``value`` and an additive float ``attn_mask`` (also
    through the returned log-sum-exp). On the CPU the gradients are always deterministic. On
    CUDA, float16 and bfloat16 with head dims up to 128 have two backward paths: by default one
    fused kernel per key tile that adds its share of the query gradient to a float32 sum by
    atomics (FlashAttention-2's; five tile products instead of seven, but the order of the
    additions, and so the last bits of the query gradient, vary from run to run), and with
    ``deterministic=True`` (or ``deterministic=None`` under
    ``torch.use_deterministic_algorithms(True)``) separate kernels that write every gradient
    element once, with no atomics, bit for bit repeatable. The other CUDA cases are always
    deterministic.

    Example:
        >>> out = genkernels.scaled_dot_product_attention(q, k, v, is_causal=True)
    """
    fn = "scaled_dot_product_attention"
    query = _checks.float_tensor(fn, "query", query, min_dim=2, cpu_extra=_CPU_EXTRA)
    key = _checks.float_tensor(fn, "key", key, min_dim=2, cpu_extra=_CPU_EXTRA)
    value = _checks.float_tensor(fn, "value", value, min_dim=2, cpu_extra=_CPU_EXTRA)
    tensors = {"query": query, "key": key, "value": value}
    _checks.same_device(fn, tensors)
    _checks.same_dtype(fn, tensors)
    dropout_p = _checks.real(fn, "dropout_p", dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{fn}(): argument 'dropout_p' must be in [0, 1], got {dropout_p}")
    generator = _checks.generator(fn, generator)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    elif not isinstance(deterministic, bool):
        raise TypeError(f"{fn}(): argument 'deterministic' must be a bool or None, got {type(deterministic).__name__}")
    if is_causal and attn_mask is not None:
        raise ValueError(f"{fn}(): pass either 'attn_mask' or 'is_causal', not both")
    alignment = _checks.choice(fn, "causal_alignment", causal_alignment, ALIGNMENTS)
    window_left, window_right = _window(fn, window)
    if is_causal:
        window_right = 0 if window_right < 0 else min(window_right, 0)
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"{fn}(): 'key' must have the query's feature size {query.shape[-1]}, got shape {tuple(key.shape)}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"{fn}(): 'value' must match 'key' in all but the last dimension, got {tuple(value.shape)} and {tuple(key.shape)}")
    if key.dim() != query.dim():
        raise ValueError(f"{fn}(): 'key' must have as many dimensions as 'query' ({query.dim()}), got {key.dim()}")
    heads_q = query.shape[-3] if query.dim() >= 3 else 1
    heads_kv = key.shape[-3] if key.dim() >= 3 else 1
    if heads_q != heads_kv:
        if not enable_gqa:
            raise ValueError(f"{fn}(): query has {heads_q} heads and key {heads_kv}: pass enable_gqa=True for grouped-query attention")
        if heads_kv == 0 or heads_q % heads_kv:
            raise ValueError(f"{fn}(): the query's heads ({heads_q}) must be a multiple of the key's ({heads_kv})")
    lead = query.shape[:-3] if query.dim() >= 3 else torch.Size()
    key_lead = key.shape[:-3] if key.dim() >= 3 else torch.Size()
    try:
        lead = lead if lead == key_lead else torch.broadcast_shapes(lead, key_lead)
    except RuntimeError:
        raise ValueError(f"{fn}(): batch dimensions of 'query' {tuple(query.shape)} and 'key' {tuple(key.shape)} do not broadcast") from None
    len_q, len_kv = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1] or 1) if scale is None else _checks.real(fn, "scale", scale)

    def as_4d(t: Tensor, heads: int) -> Tensor:
        if t.dim() == 4 and t.shape[0] == lead[0]:  # already (B, H, L, E): the common case
            return t
        t = t.expand(lead + (heads,) + tuple(t.shape[-2:])) if t.dim() >= 3 else t.expand(lead + (1,) + tuple(t.shape))
        return _merge_leading(t, 3)

    q, k, v = as_4d(query, heads_q), as_4d(key, heads_kv), as_4d(value, heads_kv)
    mask = None
    if attn_mask is not None:
        attn_mask = _checks.tensor(fn, "attn_mask", attn_mask)
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise TypeError(f"{fn}(): argument 'attn_mask' must be bool, float32 or the query's dtype {query.dtype}, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"{fn}(): argument 'attn_mask' must be on {query.device}, got {attn_mask.device}")
        full = lead + (heads_q, len_q, len_kv)
        try:
            mask = _merge_leading(attn_mask.expand(full), 3)
        except RuntimeError:
            raise ValueError(f"{fn}(): 'attn_mask' of shape {tuple(attn_mask.shape)} does not broadcast to {tuple(full)}") from None
    seed = draw_seed(generator, query.device) if dropout_p > 0 else None
    out, lse = _attention_forward(
        q, k, v, mask, None, scale, window_left, window_right, alignment == "bottom_right", dropout_p, seed, deterministic
    )
    if query.dim() != 4:  # a 4-d query's result already has its shape
        out, lse = out.reshape(lead + query.shape[len(lead):-1] + (value.shape[-1],)), lse.reshape(lead + query.shape[len(lead):-1])
    return (out, lse) if return_lse else out


def attention_dropout_mask(
    query: Tensor, key: Tensor, dropout_p: float, *, generator: Optional[torch.Generator] = None
) -> Tensor:
    """The dropout mask that ``scaled_dot_product_attention(query, key, value,
    dropout_p=dropout_p, generator=generator)`` applies when ``generator`` is in the same state:
    a bool tensor ``(N, ..., Hq, L, S)``, True where a weight is kept. Draws the seed as that call
    does (advancing the generator the same way) and evaluates the Philox stream in PyTorch, for
    tests and debugging; with it, ``genkernels.reference.scaled_dot_product_attention(...,
    dropout_mask=mask, dropout_p=dropout_p)`` gives the same result as the kernels.
    """
    fn = "attention_dropout_mask"
    query = _checks.float_tensor(fn, "query", query, min_dim=2, cpu_extra=_CPU_EXTRA)
    key = _checks.float_tensor(fn, "key", key, min_dim=2, cpu_extra=_CPU_EXTRA)
    dropout_p = _checks.real(fn, "dropout_p", dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{fn}(): argument 'dropout_p' must be in [0, 1], got {dropout_p}")
    lead_q = query.shape[:-3] if query.dim() >= 3 else torch.Size()
    lead_k = key.shape[:-3] if key.dim() >= 3 else torch.Size()
    lead = torch.broadcast_shapes(lead_q, lead_k)
    heads_q = query.shape[-3] if query.dim() >= 3 else 1
    seed = draw_seed(_checks.generator(fn, generator), query.device)
    shape = (math.prod(lead), heads_q, query.shape[-2], key.shape[-2])
    mask = reference.attention_dropout_mask(seed, shape, dropout_p)
    return mask.reshape(lead + query.shape[len(lead):-1] + (key.shape[-2],)).to(query.device)


def merge_attention(outputs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Combines attention computed over disjoint key/value shards into the result over all keys.

    ``outputs[i]`` ``(..., L, Ev)`` and ``lses[i]`` ``(..., L)`` are the output and log-sum-exp of
    shard ``i`` (from ``scaled_dot_product_attention(..., return_lse=True)``): the merged
    log-sum-exp is ``log sum_i exp(lse_i)`` and the output ``sum_i exp(lse_i - lse) out_i``. A
    shard row in which no key was attended (output 0 and lse 0) contributes nothing. This is the
    combine step of split-KV decoding and of ring attention across devices.
    """
    fn = "merge_attention"
    if len(outputs) == 0 or len(outputs) != len(lses):
        raise ValueError(f"{fn}(): 'outputs' and 'lses' must be non-empty and of equal length, got {len(outputs)} and {len(lses)}")
    outs = torch.stack([_checks.float_tensor(fn, "outputs", o, cpu_extra=_CPU_EXTRA) for o in outputs]).float()
    lse = torch.stack([_checks.tensor(fn, "lses", l) for l in lses]).float()
    if outs.shape[:-1] != lse.shape:
        raise ValueError(f"{fn}(): each output must be (..., L, Ev) with lse (..., L), got {tuple(outputs[0].shape)} and {tuple(lses[0].shape)}")
    empty = (lse == 0) & (outs == 0).all(dim=-1)
    lse = lse.masked_fill(empty, float("-inf"))
    total = torch.logsumexp(lse, dim=0)
    safe_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weights = torch.exp(lse - safe_total).nan_to_num(0.0)
    merged = (weights.unsqueeze(-1) * outs).sum(dim=0)
    return merged.to(outputs[0].dtype), torch.where(torch.isfinite(total), total, torch.zeros_like(total))


def attention_with_kvcache(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    key: Optional[Tensor] = None,
    value: Optional[Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = True,
) -> Tensor:
    """One generation step over a key/value cache.

    ``key_cache`` and ``value_cache`` are ``(B, H, S_max, E)`` and ``(B, H, S_max, Ev)``;
    ``cache_seqlens`` ``(B,)`` says how many positions of each sequence are cached (ragged
    batches work). ``key``/``value`` ``(B, H, L_new, E)`` are written into the caches in place at
    those positions, then ``query`` ``(B, Hq, L_new, E)`` attends to its sequence's
    ``cache_seqlens[b] + L_new`` valid keys, causal among the new tokens (bottom-right aligned).
    Query heads may be a multiple of the cache's (grouped-query attention).

    On CPU tensors a sequence whose length plus the new tokens exceeds ``S_max`` raises
    ``ValueError`` before anything is written to the caches.
    """
    fn = "attention_with_kvcache"
    query = _checks.float_tensor(fn, "query", query, min_dim=4, cpu_extra=_CPU_EXTRA)
    key_cache = _checks.float_tensor(fn, "key_cache", key_cache, min_dim=4, cpu_extra=_CPU_EXTRA)
    value_cache = _checks.float_tensor(fn, "value_cache", value_cache, min_dim=4, cpu_extra=_CPU_EXTRA)
    cache_seqlens = _checks.tensor(fn, "cache_seqlens", cache_seqlens)
    tensors = {"query": query, "key_cache": key_cache, "value_cache": value_cache}
    _checks.same_device(fn, {**tensors, "cache_seqlens": cache_seqlens})
    _checks.same_dtype(fn, tensors)
    if query.dim() != 4 or key_cache.dim() != 4 or value_cache.dim() != 4:
        raise ValueError(f"{fn}(): query and caches must be 4-d (B, H, L, E), got {query.dim()}, {key_cache.dim()}, {value_cache.dim()}")
    batch, heads_q, len_new, dim = query.shape
    _, heads_kv, capacity, _ = key_cache.shape
    if cache_seqlens.dtype not in (torch.int32, torch.int64) or cache_seqlens.shape != (batch,):
        raise ValueError(f"{fn}(): 'cache_seqlens' must be an int32 or int64 tensor of shape ({batch},), got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    if key_cache.shape[:3] != value_cache.shape[:3] or key_cache.shape[0] != batch or key_cache.shape[3] != dim:
        raise ValueError(f"{fn}(): caches must be (B, H, S_max, E) matching the query, got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"{fn}(): the query's heads ({heads_q}) must be a multiple of the cache's ({heads_kv})")
    if (key is None) != (value is None):
        raise ValueError(f"{fn}(): pass both 'key' and 'value' or neither")
    appended = 0
    if key is not None:
        key = _checks.float_tensor(fn, "key", key, min_dim=4, cpu_extra=_CPU_EXTRA)
        value = _checks.float_tensor(fn, "value", value, min_dim=4, cpu_extra=_CPU_EXTRA)
        if key.shape != (batch, heads_kv, key.shape[2], dim) or value.shape[:3] != key.shape[:3] or value.shape[3] != value_cache.shape[3]:
            raise ValueError(f"{fn}(): 'key' and 'value' must be (B, H, L_new, E) matching the caches, got {tuple(key.shape)} and {tuple(value.shape)}")
        appended = key.shape[2]
        _checks.same_device(fn, {"query": query, "key": key, "value": value})
    scale = 1.0 / math.sqrt(dim) if scale is None else _checks.real(fn, "scale", scale)
    return _attention_kvcache(query, key_cache, value_cache, cache_seqlens, key, value, scale, causal)


@custom_op("genkernels::attention_kvcache", mutates_args=("key_cache", "value_cache"))
def _attention_kvcache(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    key: Optional[Tensor],
    value: Optional[Tensor],
    scale: float,
    causal: bool,
) -> Tensor:
    """Writes key/value into the caches at each sequence's length, then attends over the caches."""
    batch, heads_q, len_new, dim = query.shape
    capacity = key_cache.shape[2]
    appended = key.shape[2] if key is not None else 0
    on_cpu_kernels = query.device.type == "cpu" and not _backend._emulating
    if on_cpu_kernels and batch and dim and value_cache.shape[3] and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1:
        # The CPU appends and attends in one call: a decoding step is too short for more.
        q = query if query.stride(-1) == 1 else query.contiguous()
        new = [_as_rows(t, key_cache.dtype) for t in (key, value)] if key is not None else [None, None]
        lens = cache_seqlens.contiguous()
        out = torch.empty((batch, heads_q, len_new, value_cache.shape[3]), dtype=query.dtype)
        _C.attention_kvcache(
            torch.get_num_threads(), q.data_ptr(), out.data_ptr(), [batch, heads_q, key_cache.shape[1], len_new, capacity, dim, value_cache.shape[3]],
            q.stride()[:3], key_cache.data_ptr(), key_cache.stride()[:3], value_cache.data_ptr(), value_cache.stride()[:3],
            *_address_and_strides(new[0]), *_address_and_strides(new[1]),
            lens.data_ptr(), DTYPE_CODES[lens.dtype], appended, scale, causal, DTYPE_CODES[query.dtype],
        )
        return out
    if cache_seqlens.device.type == "cpu" and batch:
        lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
        if lo < 0 or hi + appended > capacity:
            raise ValueError(f"attention_with_kvcache(): cache_seqlens + new tokens must lie in [0, {capacity}], got lengths from {lo} to {hi} with {appended} new")
    kv_lens = (reference.kvcache_append(key_cache, value_cache, cache_seqlens, key, value) if appended else cache_seqlens).to(torch.int32).contiguous()
    out, _ = _attention_forward.impl(query, key_cache, value_cache, None, kv_lens, scale, -1, 0 if causal else -1, True, 0.0, None, True)
    return out


def _as_rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in `dtype` with a contiguous last dimension."""
    if t.dtype == dtype and t.stride(-1) == 1:
        return t
    return t.to(dtype).contiguous()


def _address_and_strides(t: Optional[Tensor]) -> tuple[int, tuple[int, ...]]:
    return (t.data_ptr(), t.stride()[:3]) if t is not None else (0, (0, 0, 0))


@_attention_kvcache.register_fake
def _(query, key_cache, value_cache, cache_seqlens, key, value, scale, causal):
    return query.new_empty(query.shape[:3] + (value_cache.shape[3],))
