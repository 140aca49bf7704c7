"""A small torch Llama forward over a safetensors directory (quality evaluation, PQ calibration).

Exact prefill (causal SDPA) and one-token decode steps whose attention is delegated to a
callback, so the evaluation can run it through prescore's own decode path
(:mod:`prescore_backend.side_data`, :mod:`prescore_backend.selection` and
:func:`prescore_backend.kernels.sparse_decode.sparse_decode`
on a paged cache in vLLM's CPU layout). Llama architecture as in transformers'
``LlamaForCausalLM``: RMSNorm, rotary embedding (``rope_theta`` of the config, default
rope type only), grouped-query attention, SiLU-gated MLP, tied embeddings when the config
says so; q/k/v projection biases when the checkpoint has them, which makes it Qwen2's
forward too (``Qwen2ForCausalLM`` = this + those biases; Qwen2's sliding window is refused).
fp32 throughout. No vLLM, no transformers.

Shapes: ``n`` tokens, ``R`` decode rows, ``H`` hidden size, ``Hq``/``Hkv`` query/KV heads,
``D`` head dim, ``V`` vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LlamaSpec", "Llama", "AttendFn"]

#: attend(layer, q [R, Hq, D], k [R, Hkv, D], v [R, Hkv, D]) -> out [R, Hq, D]: the decode
#: step's attention; k/v are the step's new key/value (already rotated), to be written first.
AttendFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class LlamaSpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    vocab: int
    tied: bool
    max_positions: int = 8192

    @classmethod
    def from_config(cls, cfg: dict) -> "LlamaSpec":
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} not supported by this reference forward")
        if cfg.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported by this reference forward")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        heads = cfg["num_attention_heads"]
        return cls(hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads", heads),
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   eps=cfg["rms_norm_eps"], rope_theta=float(theta), vocab=cfg["vocab_size"],
                   tied=bool(cfg.get("tie_word_embeddings", False)),
                   max_positions=int(cfg.get("max_position_embeddings", 8192)))


class Llama:
    """Weights of a Llama checkpoint (safetensors) and its forward, fp32 on CPU."""

    def __init__(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        self.path = path
        self.spec = LlamaSpec.from_config(json.loads((path / "config.json").read_text()))
        w: dict[str, Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            w.update(load_file(str(f)))
        w = {k: v.float() for k, v in w.items()}
        s = self.spec
        self.embed = w["model.embed_tokens.weight"]  # [V, H]
        self.lm_head = self.embed if s.tied else w["lm_head.weight"]
        self.norm = w["model.norm.weight"]
        self.layer_w = []
        for i in range(s.layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            # q, k, v fused in one [H, (Hq + 2 Hkv) D] matrix: one GEMM per layer.
            qkv = torch.cat([w[a + "q_proj.weight"], w[a + "k_proj.weight"],
                             w[a + "v_proj.weight"]]).t().contiguous()
            qkv_bias = (torch.cat([w[a + "q_proj.bias"], w[a + "k_proj.bias"],
                                   w[a + "v_proj.bias"]]) if a + "q_proj.bias" in w else None)
            gate_up = torch.cat([w[p + "mlp.gate_proj.weight"],
                                 w[p + "mlp.up_proj.weight"]]).t().contiguous()
            self.layer_w.append({
                "ln1": w[p + "input_layernorm.weight"], "ln2": w[p + "post_attention_layernorm.weight"],
                "qkv": qkv, "qkv_bias": qkv_bias, "o": w[a + "o_proj.weight"].t().contiguous(),
                "gate_up": gate_up, "down": w[p + "mlp.down_proj.weight"].t().contiguous()})
        d = s.head_dim
        self.inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        self.scale = d ** -0.5

    # ------------------------------------------------------------------ pieces
    def _rms(self, x: Tensor, weight: Tensor) -> Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(var + self.spec.eps))

    def rope(self, x: Tensor, pos: Tensor) -> Tensor:
        """Rotate ``x [n, heads, D]`` (or ``[R, heads, D]``) at positions ``pos [n]`` (HF's
        rotate-half convention)."""
        freqs = pos.float().unsqueeze(-1) * self.inv_freq  # [n, D/2]
        emb = torch.cat([freqs, freqs], -1)  # [n, D]
        cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)  # [n, 1, D]
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def _qkv(self, i: int, h: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h ``[n, H]`` -> q ``[n, Hq, D]``, k, v ``[n, Hkv, D]`` (q, k rotated)."""
        s = self.spec
        lw = self.layer_w[i]
        x = self._rms(h, lw["ln1"]) @ lw["qkv"]
        if lw["qkv_bias"] is not None:
            x = x + lw["qkv_bias"]
        nq, nk = s.heads * s.head_dim, s.kv_heads * s.head_dim
        q = x[:, :nq].view(-1, s.heads, s.head_dim)
        k = x[:, nq:nq + nk].view(-1, s.kv_heads, s.head_dim)
        v = x[:, nq + nk:].view(-1, s.kv_heads, s.head_dim)
        return self.rope(q, pos), self.rope(k, pos), v

    def _post(self, i: int, h: Tensor, attn: Tensor) -> Tensor:
        """Residual + output projection + MLP: h ``[n, H]``, attn ``[n, Hq, D]`` -> ``[n, H]``."""
        lw = self.layer_w[i]
        h = h + attn.reshape(h.shape[0], -1) @ lw["o"]
        gu = self._rms(h, lw["ln2"]) @ lw["gate_up"]
        g, u = gu.chunk(2, dim=-1)
        return h + (F.silu(g) * u) @ lw["down"]

    def logits(self, h: Tensor) -> Tensor:
        """Final norm and LM head: ``[n, H]`` -> ``[n, V]``."""
        return self._rms(h, self.norm) @ self.lm_head.t()

    # ------------------------------------------------------------------ forward
    def prefill(self, ids: Tensor, *, on_kv: Callable[[int, Tensor, Tensor], None] | None = None,
                on_q: Callable[[int, Tensor], None] | None = None,
                logits: str = "last", chunk: int = 2048) -> Tensor:
        """Exact causal forward of ``ids [n]`` from position 0.

        ``on_kv(layer, k [Hkv, n, D], v [Hkv, n, D])`` and ``on_q(layer, q [Hq, n, D])`` receive
        each layer's rotated keys/values and queries. ``logits``: "last" -> ``[V]``, "all" ->
        ``[n, V]``, "none" -> the final hidden states ``[n, H]``. The MLP runs in chunks of
        ``chunk`` tokens to bound memory; attention is one causal SDPA per layer.
        """
        s = self.spec
        n = ids.shape[0]
        pos = torch.arange(n)
        h = self.embed[ids]  # [n, H]
        g = s.heads // s.kv_heads
        for i in range(s.layers):
            q, k, v = self._qkv(i, h, pos)  # [n, heads, D]
            qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, n, D]
            if on_kv is not None:
                on_kv(i, kt, vt)
            if on_q is not None:
                on_q(i, qt)
            # Contiguous inputs keep SDPA on its fused CPU kernel (a strided q falls back to the
            # O(n^2)-memory math path: far slower at long contexts).
            attn = F.scaled_dot_product_attention(
                qt.contiguous().unsqueeze(0), kt.repeat_interleave(g, 0).unsqueeze(0),
                vt.repeat_interleave(g, 0).unsqueeze(0), is_causal=True, scale=self.scale)
            attn = attn[0].transpose(0, 1)  # [n, Hq, D]
            h = torch.cat([self._post(i, h[a:a + chunk], attn[a:a + chunk])
                           for a in range(0, n, chunk)])
        if logits == "none":
            return h
        if logits == "last":
            return self.logits(h[-1:])[0]
        return self.logits(h)

    def decode(self, tokens: Tensor, pos: int, attend: AttendFn) -> Tensor:
        """One decode step of ``R`` rows, all at position ``pos``: tokens ``[R]`` -> logits
        ``[R, V]``. ``attend`` does each layer's attention (writing the new k/v first)."""
        h = self.embed[tokens]  # [R, H]
        p = torch.full((tokens.shape[0],), pos, dtype=torch.int64)
        for i in range(self.spec.layers):
            q, k, v = self._qkv(i, h, p)  # [R, heads, D]
            h = self._post(i, h, attend(i, q, k, v))
        return self.logits(h)
