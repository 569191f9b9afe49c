"""Pure-PyTorch implementations of every genkernels op: the oracle of the tests and the
baseline of the benchmarks. Written for clarity, in the formulas' own terms."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sinusoidal_encoding(
    positions: Tensor,
    dim: int,
    *,
    base: float = 10000.0,
    layout: str = "interleaved",
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sinusoidal encoding: frequencies base^(-i / (dim//2 - shift)) rounded once from float64,
    angle = scale * (position * freq) in the compute dtype, then sin and cos."""
    compute = _compute_dtype(dtype)
    half = dim // 2
    i = torch.arange(half, dtype=torch.float64, device=positions.device)
    freq = torch.exp(-math.log(base) * i / (half - downscale_freq_shift)).to(compute)
    angle = scale * (positions.to(compute).unsqueeze(-1) * freq)
    first, second = torch.sin(angle), torch.cos(angle)
    if flip_sin_to_cos:
        first, second = second, first
    if layout == "interleaved":
        emb = torch.stack([first, second], dim=-1).flatten(-2)
    else:
        emb = torch.cat([first, second], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)


def add_positional_encoding(
    x: Tensor, *, offset: int = 0, base: float = 10000.0, layout: str = "interleaved", x_scale: float = 1.0
) -> Tensor:
    """x * x_scale + PE[offset : offset + L] for x of shape (..., L, D)."""
    length, dim = x.shape[-2], x.shape[-1]
    positions = torch.arange(offset, offset + length, device=x.device)
    pe = sinusoidal_encoding(positions, dim, base=base, layout=layout, dtype=_compute_dtype(x.dtype))
    return (x.to(pe.dtype) * x_scale + pe).to(x.dtype)


def _mulhilo32(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of a * m for 32-bit values held in int64 (split to avoid overflow)."""
    p_lo = a * (m & 0xFFFF)
    p_hi = a * (m >> 16)
    low_sum = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (low_sum >> 32), low_sum & _MASK32


def philox4x32_10(counter: Tensor, key: tuple[int, int]) -> Tensor:
    """Philox4x32-10 (Salmon et al. 2011) of counters (..., 4) of 32-bit words held in int64."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo32(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_words(groups: int, key: Union[int, Tensor], offset: Union[int, Tensor]) -> Tensor:
    """The words (groups, 4) of counters (0 .. groups - 1, offset) of the Philox stream under
    ``key``: element e of a kernel's stream takes word e % 4 of counter e // 4. ``key`` and
    ``offset`` are 64-bit ints or int64 scalar tensors; tensors stay on their device, so that no
    value leaves a traced graph."""
    device = next((x.device for x in (key, offset) if isinstance(x, Tensor)), None)
    g = torch.arange(groups, dtype=torch.int64, device=device)
    halves = [torch.as_tensor(x & _MASK32, device=device).expand_as(g) for x in (offset, offset >> 32)]
    counter = torch.stack([g & _MASK32, g >> 32, *halves], dim=-1)
    return philox4x32_10(counter, (key & _MASK32, (key >> 32) & _MASK32))


def normal(n: int, seed: Union[int, Tensor], offset: Union[int, Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
    """The first n normals of the stream (seed, offset), by Box-Muller in float64: element i is
    normal i % 4 of counter (i // 4, offset) under key seed (ints, or int64 scalar tensors as in
    `philox_words`). Each pair of words (a, b) gives sqrt(-2 ln u1) (cos theta, sin theta) with
    u1 from the top 24 bits of a, and theta a point of the arc [-pi/4, pi/4) from the top 24 bits
    of b carried by the symmetry of the square that b's three low bits pick: bit 2 swaps the
    coordinates, bits 0 and 1 negate the first and the second."""
    words = philox_words((n + 3) // 4, seed, offset)
    a, b = words[:, 0::2], words[:, 1::2]
    u1 = ((a >> 8) + 1).double() * 2.0**-24
    r = (b >> 8).double() * (math.pi / 2 * 2.0**-24) - math.pi / 4
    radius = torch.sqrt(-2.0 * torch.log(u1))
    swap = (b & 4) != 0
    sin, cos = torch.sin(r), torch.cos(r)
    first = torch.where(swap, sin, cos) * torch.where((b & 1) != 0, -radius, radius)
    second = torch.where(swap, cos, sin) * torch.where((b & 2) != 0, -radius, radius)
    z = torch.stack([first, second], dim=-1)  # (groups, 2 pairs, 2)
    return z.reshape(-1)[:n].to(dtype)


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """z = mu + exp(logvar / 2) * eps."""
    return mu + torch.exp(0.5 * logvar) * eps


def gaussian_kl(mu: Tensor, logvar: Tensor, *, reduction: str = "sum") -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) = 0.5 * (mu^2 + exp(logvar) - 1 - logvar)."""
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)
    if reduction == "none":
        return kl
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.mean()
    return kl.sum() / mu.shape[0]


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    causal_alignment: str = "top_left",
    window: Optional[tuple] = None,
    kv_lens: Optional[Tensor] = None,
    dropout_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Attention by its definition, returning (output, lse): scores = scale q k^T + bias over the
    allowed keys, softmax, times v; rows with no allowed key give 0 output and 0 lse. With a
    boolean ``dropout_mask`` (True = keep, broadcast to the weights), the weights are multiplied
    by it and by 1 / (1 - dropout_p) before v; lse is unchanged. Computed in the inputs' dtype
    (pass float64 for an oracle)."""
    len_q, len_kv = query.shape[-2], key.shape[-2]
    if enable_gqa and query.dim() >= 3 and query.shape[-3] != key.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = scale * (query @ key.transpose(-2, -1))
    allowed = torch.ones(scores.shape, dtype=torch.bool, device=query.device)
    i = torch.arange(len_q, device=query.device)[:, None]
    j = torch.arange(len_kv, device=query.device)[None, :]
    kv_len = torch.full((1,), len_kv, device=query.device) if kv_lens is None else kv_lens.to(torch.int64)
    kv_len = kv_len.reshape((-1,) + (1,) * (scores.dim() - 1))  # broadcast over the batch dimension
    diagonal = kv_len - len_q if causal_alignment == "bottom_right" else torch.zeros_like(kv_len)
    left, right = window if window is not None else (-1, -1)
    left, right = (-1 if left is None else left), (-1 if right is None else right)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    offset = j - (i + diagonal)
    if left >= 0:
        allowed = allowed & (offset >= -left)
    if right >= 0:
        allowed = allowed & (offset <= right)
    allowed = allowed & (j < kv_len)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.to(scores.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)
    weights = torch.exp(scores - torch.where(empty, torch.zeros_like(lse), lse).unsqueeze(-1))
    if dropout_mask is not None:
        weights = weights * dropout_mask * (1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0)
    out = weights @ value
    return out, torch.where(empty, torch.zeros_like(lse), lse)


def kvcache_append(key_cache: Tensor, value_cache: Tensor, cache_seqlens: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """Writes ``key``/``value`` ``(B, H, L_new, E)`` into the caches ``(B, H, S_max, E)`` in place,
    after each sequence's ``cache_seqlens[b]`` positions; returns the new lengths (int64)."""
    lengths = cache_seqlens.to(torch.int64)
    positions = lengths[:, None] + torch.arange(key.shape[2], device=key.device)  # (B, L_new)
    rows = torch.arange(key.shape[0], device=key.device)[:, None]
    key_cache[rows, :, positions] = key.transpose(1, 2).to(key_cache.dtype)  # (B, L_new, H, E)
    value_cache[rows, :, positions] = value.transpose(1, 2).to(value_cache.dtype)
    return lengths + key.shape[2]


def attention_dropout_mask(seed: Tensor, shape: tuple[int, int, int, int], dropout_p: float) -> Tensor:
    """The keep-mask (bool, ``shape`` = (B, Hq, L, S)) of attention dropout with probability
    ``dropout_p`` under the seed tensor ``[key, offset]``: weight e (row-major index) is kept
    when word e % 4 of Philox4x32-10(counter (e // 4, offset), key) is >= round(p * 2^32)."""
    n = math.prod(shape)
    words = philox_words((n + 3) // 4, *seed.cpu().unbind()).reshape(-1)[:n]
    threshold = int(dropout_p * 4294967296.0 + 0.5)
    return (words >= threshold).reshape(shape)


# ------------------------------------------------------------------------------ diffusion
# diffusers' formulas (DDPMScheduler, DDIMScheduler) with one timestep per sample, evaluated in
# float64 from `alphas_cumprod` (float64, e.g. torch.cumprod(1 - betas, 0)); t_prev < 0 means the
# end of the chain, where abar_prev is `final` (1, or abar_0 for DDIM without set_alpha_to_one).


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def _abar(alphas_cumprod: Tensor, t: Tensor, like: Tensor, final: float = 1.0) -> Tensor:
    values = torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], torch.tensor(final, dtype=torch.float64))
    return _per_sample(values, like)


def q_sample(x0: Tensor, t: Tensor, alphas_cumprod: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, v): sqrt(abar) x0 + sqrt(1 - abar) noise and sqrt(abar) noise - sqrt(1 - abar) x0."""
    x0, noise = x0.double(), noise.double()
    abar = _abar(alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, abar.sqrt() * noise - (1 - abar).sqrt() * x0


def _predict_x0(model_output: Tensor, sample: Tensor, abar: Tensor, prediction_type: str) -> Tensor:
    if prediction_type == "epsilon":
        return (sample - (1 - abar).sqrt() * model_output) / abar.sqrt()
    if prediction_type == "v_prediction":
        return abar.sqrt() * sample - (1 - abar).sqrt() * model_output
    return model_output


def _limit_x0(x0: Tensor, clip: Optional[float], threshold: Optional[tuple[float, float]]) -> Tensor:
    if threshold is not None:
        ratio, max_value = threshold
        s = torch.quantile(x0.reshape(x0.shape[0], -1).abs(), ratio, dim=1).clamp(1.0, max_value)
        s = _per_sample(s, x0)
        return torch.clamp(x0, -s, s) / s
    return x0.clamp(-clip, clip) if clip is not None else x0


def ddpm_step(
    model_output: Tensor, t: Tensor, t_prev: Tensor, sample: Tensor, alphas_cumprod: Tensor, noise: Tensor, *,
    prediction_type: str = "epsilon", variance_type: str = "fixed_small", clip: Optional[float] = 1.0,
    threshold: Optional[tuple[float, float]] = None, predicted_variance: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(prev_sample, pred_original_sample) of DDPMScheduler.step; fixed_large_log uses sqrt(beta)."""
    m, x, noise = model_output.double(), sample.double(), noise.double()
    abar, abar_prev = _abar(alphas_cumprod, t, x), _abar(alphas_cumprod, t_prev, x)
    alpha = abar / abar_prev
    beta = 1 - alpha
    x0 = _limit_x0(_predict_x0(m, x, abar, prediction_type), clip, threshold)
    mean = (abar_prev.sqrt() * beta / (1 - abar)) * x0 + (alpha.sqrt() * (1 - abar_prev) / (1 - abar)) * x
    variance = ((1 - abar_prev) / (1 - abar) * beta).clamp(min=1e-20)
    if variance_type in ("fixed_small", "fixed_small_log"):
        std = variance.sqrt()
    elif variance_type in ("fixed_large", "fixed_large_log"):
        std = beta.sqrt()
    elif variance_type == "learned":
        std = predicted_variance.double().sqrt()
    else:
        frac = (predicted_variance.double() + 1) / 2
        std = torch.exp(0.5 * (frac * beta.log() + (1 - frac) * variance.log()))
    return mean + std * _per_sample(t > 0, x) * noise, x0


def ddim_step(
    model_output: Tensor, t: Tensor, t_prev: Tensor, sample: Tensor, alphas_cumprod: Tensor, noise: Tensor, *,
    eta: float = 0.0, prediction_type: str = "epsilon", clip: Optional[float] = None,
    threshold: Optional[tuple[float, float]] = None, use_clipped_model_output: bool = False, final: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(prev_sample, pred_original_sample) of DDIMScheduler.step for an explicit previous timestep."""
    m, x, noise = model_output.double(), sample.double(), noise.double()
    abar, abar_prev = _abar(alphas_cumprod, t, x), _abar(alphas_cumprod, t_prev, x, final)
    x0 = _predict_x0(m, x, abar, prediction_type)
    if prediction_type == "epsilon":
        eps = m
    elif prediction_type == "v_prediction":
        eps = abar.sqrt() * m + (1 - abar).sqrt() * x
    else:
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    x0 = _limit_x0(x0, clip, threshold)
    if use_clipped_model_output:
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    std = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    prev = abar_prev.sqrt() * x0 + (1 - abar_prev - std**2).sqrt() * eps
    return prev + std * noise, x0


def dpm_solver_step(
    model_output: Tensor, t: Tensor, t_prev: Tensor, sample: Tensor, alphas_cumprod: Tensor,
    noise: Optional[Tensor] = None, *, prev_x0: Optional[Tensor] = None, prev_x0_t: Optional[Tensor] = None,
    algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", prediction_type: str = "epsilon",
    final_sigmas_type: str = "zero", euler_at_final: bool = False, clip: Optional[float] = None,
    threshold: Optional[tuple[float, float]] = None,
) -> tuple[Tensor, Tensor]:
    """(prev_sample, pred_original_sample) of one DPMSolverMultistepScheduler (dpmsolver++ or
    sde-dpmsolver++) update, written as diffusers writes it: sigma = sqrt((1 - abar) / abar),
    alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t, lambda = log alpha_t - log sigma_t.
    First order without prev_x0, else second order with prev_x0 predicted at prev_x0_t; t_prev < 0
    is the final sigma (0 or sigma_min), first order with "zero" or euler_at_final."""
    m, x = model_output.double(), sample.double()
    zero = torch.zeros((), dtype=torch.float64)

    def alpha_sigma_lambda(timesteps: Tensor, final: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        abar = _abar(alphas_cumprod, timesteps, x)
        sigma = ((1 - abar) / abar).sqrt()
        if final:
            sigma_last = zero if final_sigmas_type == "zero" else ((1 - alphas_cumprod[0]) / alphas_cumprod[0]).sqrt()
            sigma = torch.where(_per_sample(timesteps, x) < 0, sigma_last, sigma)
        alpha_t = 1 / (sigma**2 + 1).sqrt()
        sigma_t = sigma * alpha_t
        return alpha_t, sigma_t, alpha_t.log() - sigma_t.log()

    alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(t)
    alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(t_prev, final=True)
    if prediction_type == "epsilon":
        x0 = (x - sigma_s * m) / alpha_s
    elif prediction_type == "v_prediction":
        x0 = alpha_s * x - sigma_s * m
    else:
        x0 = m
    x0 = _limit_x0(x0, clip, threshold)
    h = lambda_t - lambda_s
    sde = algorithm_type == "sde-dpmsolver++"
    if sde:
        first = (sigma_t / sigma_s * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * x0
    else:
        first = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
    prev = first
    if prev_x0 is not None:
        _, _, lambda_s1 = alpha_sigma_lambda(prev_x0_t)
        r0 = (lambda_s - lambda_s1) / h
        d1 = (1.0 / r0) * (x0 - prev_x0.double())
        if sde and solver_type == "midpoint":
            second = first + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * d1
        elif sde:
            second = first + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
        elif solver_type == "midpoint":
            second = first - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        else:
            second = first + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
        lower = final_sigmas_type == "zero" or euler_at_final
        prev = torch.where(_per_sample(t_prev < 0, x) & lower, first, second)
    if sde:
        prev = prev + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise.double()
    return prev, x0


def guided(uncond: Tensor, cond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """Classifier-free guidance with diffusers' rescale_noise_cfg (Lin et al. 2023, sec. 3.4)."""
    uncond, cond = uncond.double(), cond.double()
    cfg = uncond + scale * (cond - uncond)
    if rescale == 0.0:
        return cfg
    dims = list(range(1, cond.dim()))
    ratio = cond.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True)
    return rescale * (cfg * ratio) + (1 - rescale) * cfg
