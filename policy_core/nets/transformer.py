"""TransformerForDiffusion of Diffusion Policy (real-stanford/diffusion_policy), in MLX.

A minGPT-style decoder: the noisy action trajectory is a sequence of ``horizon`` tokens; the diffusion step
(a sinusoidal embedding) and the observation features of each of ``n_obs_steps`` steps are the tokens of
a memory, encoded by an MLP (``n_cond_layers`` 0) or a transformer encoder, that every decoder layer
cross-attends to. With ``causal_attn`` an action token attends to itself and earlier ones only, and to the
step token and the observations up to its own step (upstream's ``mask`` and ``memory_mask``).

Module names and parameter layouts are upstream's: PyTorch's ``TransformerDecoderLayer`` /
``TransformerEncoderLayer`` (pre-norm, GELU, ``dim_feedforward`` 4 * n_emb) with ``MultiheadAttention``'s
packed ``in_proj_weight`` (queries, keys, values), and the MLP memory encoder at ``encoder.0`` /
``encoder.2``; so parameter counts equal upstream's and PyTorch weights map one to one. Layout is (B, T, C).

Upstream's other variant, the step as a token of an encoder-only trunk (``time_as_cond`` false), can only
condition on observations by inpainting them into the trajectory, which these policies do not do: the
memory always holds the step and the observations (``time_as_cond`` and ``obs_as_cond``).

Besides the reference ``__call__`` used for training, the sampler's pieces: ``memory_keys_values`` computes
the memory and every decoder layer's cross-attention keys and values for all steps of a schedule at once,
once per request, and ``decode`` runs the trunk on one step's (``policy_core/backends``).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from policy_core.nets.unet import sinusoidal_embedding

INIT_STD = 0.02  # upstream's _init_weights: every weight N(0, 0.02), biases 0, LayerNorm (1, 0)


def _normal(shape: tuple[int, ...]) -> mx.array:
    return INIT_STD * mx.random.normal(shape)


def _linear(in_dims: int, out_dims: int) -> nn.Linear:
    layer = nn.Linear(in_dims, out_dims)
    layer.weight = _normal(layer.weight.shape)
    layer.bias = mx.zeros((out_dims,))
    return layer


def _heads(x: mx.array, n_head: int) -> mx.array:
    """(..., T, E) -> (..., H, T, E / H)."""
    *lead, t, e = x.shape
    return x.reshape(*lead, t, n_head, e // n_head).swapaxes(-2, -3)


def _merge_heads(x: mx.array) -> mx.array:
    """(..., H, T, D) -> (..., T, H * D)."""
    *lead, h, t, d = x.shape
    return x.swapaxes(-2, -3).reshape(*lead, t, h * d)


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` (batch first, with biases): ``in_proj_weight`` (3E, E) holds the
    query, key and value projections stacked, as PyTorch stores them; ``out_proj`` a Linear. ``dropout``
    applies to the attention weights in training, as PyTorch's."""

    def __init__(self, dims: int, n_head: int, dropout: float):
        super().__init__()
        self.dims, self.n_head = dims, n_head
        self.in_proj_weight = _normal((3 * dims, dims))
        self.in_proj_bias = mx.zeros((3 * dims,))
        self.out_proj = _linear(dims, dims)
        self.attn_drop = nn.Dropout(dropout)
        self.dropout = dropout

    def queries(self, x: mx.array) -> mx.array:
        """(..., T, E) -> the heads' queries (..., H, T, D)."""
        e = self.dims
        return _heads(x @ self.in_proj_weight[:e].T + self.in_proj_bias[:e], self.n_head)

    def keys_values(self, memory: mx.array) -> mx.array:
        """(..., S, E) -> keys and values (..., 2, H, S, D): what a query attends to, computed once."""
        e = self.dims
        kv = memory @ self.in_proj_weight[e:].T + self.in_proj_bias[e:]
        *lead, s, _ = kv.shape
        return _heads(kv.reshape(*lead, s, 2, e).swapaxes(-2, -3), self.n_head)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
        """Queries (B, H, T, D) over keys and values (B, H, S, D), ``mask`` (T, S) True where a query may
        look, through the output projection -> (B, T, E)."""
        scale = 1.0 / math.sqrt(q.shape[-1])
        if self.training and self.dropout > 0:  # the fused kernel has no dropout of attention weights
            scores = (q * scale) @ k.swapaxes(-1, -2)
            if mask is not None:
                scores = mx.where(mask, scores, -mx.inf)
            weights = self.attn_drop(mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype))
            out = weights @ v
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return self.out_proj(_merge_heads(out))

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        """Self-attention of (B, T, E)."""
        qkv = x @ self.in_proj_weight.T + self.in_proj_bias
        b, t, _ = qkv.shape
        q, k, v = _heads(qkv.reshape(b, t, 3, self.dims).swapaxes(1, 2), self.n_head).swapaxes(0, 1)
        return self.attend(q, k, v, mask)


class EncoderLayer(nn.Module):
    """``torch.nn.TransformerEncoderLayer(norm_first=True, activation="gelu")``."""

    def __init__(self, dims: int, n_head: int, dropout: float):
        super().__init__()
        self.self_attn = MultiheadAttention(dims, n_head, dropout)
        self.linear1, self.linear2 = _linear(dims, 4 * dims), _linear(4 * dims, dims)
        self.norm1, self.norm2 = nn.LayerNorm(dims), nn.LayerNorm(dims)
        self.dropout, self.dropout1, self.dropout2 = (nn.Dropout(dropout) for _ in range(3))

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.dropout1(self.self_attn(self.norm1(x), None))
        return x + self.dropout2(self.linear2(self.dropout(nn.gelu(self.linear1(self.norm2(x))))))


class DecoderLayer(nn.Module):
    """``torch.nn.TransformerDecoderLayer(norm_first=True, activation="gelu")``, its cross-attention given
    the memory's keys and values (``multihead_attn.keys_values``)."""

    def __init__(self, dims: int, n_head: int, dropout: float):
        super().__init__()
        self.self_attn = MultiheadAttention(dims, n_head, dropout)
        self.multihead_attn = MultiheadAttention(dims, n_head, dropout)
        self.linear1, self.linear2 = _linear(dims, 4 * dims), _linear(4 * dims, dims)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dims), nn.LayerNorm(dims), nn.LayerNorm(dims)
        self.dropout, self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(4))

    def __call__(
        self, x: mx.array, kv: mx.array, mask: mx.array | None, memory_mask: mx.array | None
    ) -> mx.array:
        """x (B, T, E); kv (B, 2, H, S, D) the memory's keys and values for this layer."""
        x = x + self.dropout1(self.self_attn(self.norm1(x), mask))
        cross = self.multihead_attn
        x = x + self.dropout2(cross.attend(cross.queries(self.norm2(x)), kv[:, 0], kv[:, 1], memory_mask))
        return x + self.dropout3(self.linear2(self.dropout(nn.gelu(self.linear1(self.norm3(x))))))


class TransformerEncoder(nn.Module):
    """``torch.nn.TransformerEncoder``: ``layers`` in sequence, no final norm."""

    def __init__(self, dims: int, n_head: int, dropout: float, n_layer: int):
        super().__init__()
        self.layers = [EncoderLayer(dims, n_head, dropout) for _ in range(n_layer)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerDecoder(nn.Module):
    """``torch.nn.TransformerDecoder``: ``layers`` in sequence, no final norm."""

    def __init__(self, dims: int, n_head: int, dropout: float, n_layer: int):
        super().__init__()
        self.layers = [DecoderLayer(dims, n_head, dropout) for _ in range(n_layer)]


class TransformerForDiffusion(nn.Module):
    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        horizon: int,
        n_obs_steps: int,
        cond_dim: int,
        n_layer: int = 8,
        n_head: int = 4,
        n_emb: int = 256,
        p_drop_emb: float = 0.0,
        p_drop_attn: float = 0.3,
        causal_attn: bool = True,
        n_cond_layers: int = 0,
    ):
        super().__init__()
        self.horizon, self.n_obs_steps, self.n_emb, self.n_head = horizon, n_obs_steps, n_emb, n_head
        self.causal_attn = causal_attn
        self.input_emb = _linear(input_dim, n_emb)
        self.pos_emb = _normal((1, horizon, n_emb))
        self.drop = nn.Dropout(p_drop_emb)
        self.cond_obs_emb = _linear(cond_dim, n_emb)
        # The memory: the step token, then one token per observation step.
        self.cond_pos_emb = _normal((1, 1 + n_obs_steps, n_emb))
        if n_cond_layers > 0:
            self.encoder = TransformerEncoder(n_emb, n_head, p_drop_attn, n_cond_layers)
        else:
            # Upstream's Sequential(Linear, Mish, Linear): the Linears at 0 and 2.
            self.encoder = [_linear(n_emb, 4 * n_emb), nn.Mish(), _linear(4 * n_emb, n_emb)]
        self.decoder = TransformerDecoder(n_emb, n_head, p_drop_attn, n_layer)
        self.ln_f = nn.LayerNorm(n_emb)
        self.head = _linear(n_emb, output_dim)

    @property
    def dtype(self) -> mx.Dtype:
        return self.head.weight.dtype

    def masks(self) -> tuple[mx.array | None, mx.array | None]:
        """Where attention may look (True), or None for everywhere: the decoder's self-attention (T, T),
        and its cross-attention (T, 1 + n_obs_steps), where action t sees the step token and the
        observations of steps <= t (upstream's memory_mask, t >= s - 1)."""
        if not self.causal_attn:
            return None, None
        t = mx.arange(self.horizon)[:, None]
        return t >= mx.arange(self.horizon)[None], t >= mx.arange(1 + self.n_obs_steps)[None] - 1

    def decayed_parameters(self) -> list[str]:
        """The parameters upstream's ``get_optim_groups`` gives weight decay: the weights of Linear layers
        and attention projections; not biases, LayerNorm weights or the position embeddings."""
        names = []
        for path, module in self.named_modules():
            prefix = f"{path}." if path else ""
            if isinstance(module, nn.Linear):
                names.append(prefix + "weight")
            elif isinstance(module, MultiheadAttention):
                names.append(prefix + "in_proj_weight")
        return names

    # ---- the memory -----------------------------------------------------------------------------

    def step_tokens(self, timesteps: mx.array) -> mx.array:
        """(N,) integer timesteps -> (N, E) step embeddings (upstream's time_emb, no parameters)."""
        return sinusoidal_embedding(timesteps, self.n_emb).astype(self.dtype)

    def _encode(self, tokens: mx.array) -> mx.array:
        if isinstance(self.encoder, TransformerEncoder):
            return self.encoder(tokens)
        first, mish, second = self.encoder
        return second(mish(first(tokens)))

    def memory(self, step_tokens: mx.array, cond: mx.array) -> mx.array:
        """Step embeddings (B, E) and observation features (B, To, cond_dim) -> the memory (B, 1 + To, E)."""
        tokens = mx.concatenate([step_tokens[:, None], self.cond_obs_emb(cond)], axis=1)
        return self._encode(self.drop(tokens + self.cond_pos_emb))

    def memory_keys_values(self, step_tokens: mx.array, cond: mx.array) -> mx.array:
        """Every decoder layer's cross-attention keys and values for every (step, row) of a request at once:
        step embeddings (S, E) of a schedule and observation features (B, To, cond_dim) -> (S, B, L, 2,
        H, 1 + To, D). Inference only (no dropout). The MLP encoder maps each token alone, so the steps'
        and the observations' memory are computed apart (S + B * To tokens, not S * B * (1 + To))."""
        steps, batch = step_tokens.shape[0], cond.shape[0]
        first = step_tokens[:, None] + self.cond_pos_emb[:, :1]  # (S, 1, E)
        rest = self.cond_obs_emb(cond) + self.cond_pos_emb[:, 1:]  # (B, To, E)
        layers = self.decoder.layers
        if isinstance(self.encoder, TransformerEncoder):
            tokens = mx.concatenate(
                [
                    mx.broadcast_to(first[:, None], (steps, batch, *first.shape[1:])),
                    mx.broadcast_to(rest[None], (steps, *rest.shape)),
                ],
                axis=2,
            )
            memory = self._encode(tokens.reshape(steps * batch, *tokens.shape[2:]))
            memory = memory.reshape(steps, batch, *memory.shape[1:])
            kv = [layer.multihead_attn.keys_values(memory) for layer in layers]  # (S, B, 2, H, Tc, D)
        else:
            step_memory, obs_memory = self._encode(first), self._encode(rest)
            kv = []
            for layer in layers:
                k_steps = layer.multihead_attn.keys_values(step_memory)  # (S, 2, H, 1, D)
                k_obs = layer.multihead_attn.keys_values(obs_memory)  # (B, 2, H, To, D)
                shape = (steps, batch, *k_steps.shape[1:-2])
                kv.append(
                    mx.concatenate(
                        [
                            mx.broadcast_to(k_steps[:, None], (*shape, 1, k_steps.shape[-1])),
                            mx.broadcast_to(k_obs[None], (*shape, k_obs.shape[-2], k_obs.shape[-1])),
                        ],
                        axis=-2,
                    )
                )
        return mx.stack(kv, axis=2)

    # ---- the trunk ------------------------------------------------------------------------------

    def decode(self, sample: mx.array, kv: mx.array) -> mx.array:
        """The denoiser trunk given the memory's keys and values: sample (B, T, input_dim), kv (B, L, 2, H,
        S, D) every decoder layer's -> (B, T, output_dim)."""
        mask, memory_mask = self.masks()
        x = self.drop(self.input_emb(sample) + self.pos_emb[:, : sample.shape[1]])
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, kv[:, i], mask, memory_mask)
        return self.head(self.ln_f(x))

    def __call__(self, sample: mx.array, timestep: mx.array | int, cond: mx.array) -> mx.array:
        """Reference path. sample (B, T, input_dim); timestep scalar or (B,); cond (B, To, cond_dim)."""
        batch = sample.shape[0]
        timestep = mx.broadcast_to(mx.array(timestep), (batch,))
        memory = self.memory(self.step_tokens(timestep), cond)
        kv = [layer.multihead_attn.keys_values(memory) for layer in self.decoder.layers]
        return self.decode(sample, mx.stack(kv, axis=1))
