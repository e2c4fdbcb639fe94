"""A tiny causal transformer language model (a LightningModule)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from .data import ResumableLoader, make_sequences


class TinyTransformer(pl.LightningModule):
    def __init__(self, *, vocab: int = 32, width: int = 64, layers: int = 2, heads: int = 4, seq_len: int = 32,
                 dropout: float = 0.1, lr: float = 3e-3, batch_size: int = 16, sequences: int = 4096,
                 data_seed: int = 1234):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(seq_len, width))
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len - 1), persistent=False)
        self.loader: ResumableLoader | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.blocks(x, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.loader is not None
        self.loader.mark_consumed(batch)
        tokens = batch["tokens"]
        logits = self(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def train_dataloader(self) -> ResumableLoader:
        hp = self.hparams
        data = make_sequences(hp.sequences, hp.seq_len, hp.vocab, hp.data_seed)
        self.loader = ResumableLoader(data, hp.batch_size, hp.data_seed, rank=self.global_rank,
                                      world_size=self.trainer.world_size)
        return self.loader

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
