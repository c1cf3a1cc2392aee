"""SASRec, the surrogate sequential recommender (Kang & McAuley 2018), shaped as the DEALRec reference:
post-norm blocks, learned positions, causal self-attention, a point-wise feed-forward, tied item
embeddings for scoring."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from core.config import SurrogateConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, attn_dropout: float, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        # `dense` is the output projection: its weight is the reference's influence parameter.
        self.dense = nn.Linear(hidden, hidden)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.out_dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        probs = self.attn_dropout(torch.softmax(scores, dim=-1))
        ctx = (probs @ v).transpose(1, 2).reshape(b, t, h)
        return self.norm(self.out_dropout(self.dense(ctx)) + x)


class FeedForward(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.fc1(x))
        y = self.dropout(self.fc2(y))
        return self.norm(y + x)


class Block(nn.Module):
    def __init__(self, cfg: SurrogateConfig) -> None:
        super().__init__()
        self.attention = CausalSelfAttention(cfg.hidden_size, cfg.num_heads, cfg.attention_dropout, cfg.dropout)
        self.ffn = FeedForward(cfg.hidden_size, cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.attention(x, mask))


class SASRec(nn.Module):
    """Input: item index sequences (batch, max_len), left-padded with 0. Output: hidden states
    (batch, max_len, hidden); the score of item i at position t is <out[:, t], item_embeddings[i]>."""

    def __init__(self, n_items: int, cfg: SurrogateConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_items = n_items
        self.item_embeddings = nn.Embedding(n_items + 1, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_seq_length, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.cfg.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def influence_layer(self, name: str = "last_attention_output") -> nn.Linear:
        """The nn.Linear whose weight is the influence parameter theta."""
        if name == "last_attention_output":
            return self.blocks[-1].attention.dense
        module = self.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"influence parameter '{name}' is not a Linear layer")
        return module

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        t = seqs.shape[1]
        if t > self.cfg.max_seq_length:
            raise ValueError(f"sequence width {t} exceeds max_seq_length {self.cfg.max_seq_length}")
        # A batch narrower than the window is its right-aligned part: keep the positions it has there.
        pos = torch.arange(self.cfg.max_seq_length - t, self.cfg.max_seq_length, device=seqs.device).unsqueeze(0)
        x = self.dropout(self.norm(self.item_embeddings(seqs) + self.position_embeddings(pos)))
        # Causal mask plus key padding mask, additive (-1e4 as the reference, stable in fp16 too).
        causal = torch.ones(t, t, dtype=torch.bool, device=seqs.device).tril()
        allowed = causal.unsqueeze(0) & (seqs > 0).unsqueeze(1)  # (b, t_query, t_key)
        mask = ((~allowed).to(x.dtype) * -10000.0).unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask)
        return x

    def score_all(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every item (column 0 = padding) for hidden states (..., hidden)."""
        return hidden @ self.item_embeddings.weight.T
