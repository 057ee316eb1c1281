"""PyTorch reference implementations, written as a PyTorch user would (eager mode), for
:mod:`benchmarks.run`. Same architectures, shapes and trainable parameter counts as ``cnn/`` and
``p2g/``; PyTorch is only needed for benchmarking (``pip install -e ".[bench]"``).

- :class:`TorchCNN`: the homework's CNN, NCHW as PyTorch convolutions expect (the images are
  permuted once per batch, which a PyTorch user's ``ToTensor`` would have done in the loader).
- :class:`TorchSeq2Seq`: BiLSTM encoder (``pack_padded_sequence``), LSTM decoder, optional
  Bahdanau attention, generator tied to the decoder embedding; :func:`greedy_per_word` is the
  homework's decoding loop (one word at a time, one step at a time), :func:`decode_batched`
  the batched loop a careful PyTorch user writes (greedy or nucleus sampling).

Flax's LSTM cell has one bias per gate, PyTorch's two (``bias_ih`` and ``bias_hh``); the input
side's is frozen at zero here, so the trainable counts agree exactly and the arithmetic is the same.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from p2g.data import EOS, PAD, SOS


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- CNN ---------------------------------------------------------------------------------------


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, batch_norm: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=1, padding=1)
        self.norm = nn.BatchNorm2d(cout) if batch_norm else nn.Identity()
        self.pool = nn.MaxPool2d(2, 2)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(self.pool(F.relu(self.norm(self.conv(x)))))


class TorchCNN(nn.Module):
    """``(B, 3, 48, 48)`` -> ``(B, 6)`` log-probabilities; 5,340,742 / 755,718 parameters."""

    def __init__(self, batch_norm: bool):
        super().__init__()
        self.batch_norm = batch_norm
        self.blocks = nn.Sequential(ConvBlock(3, 32, batch_norm), ConvBlock(32, 64, batch_norm),
                                    ConvBlock(64, 128, batch_norm))
        self.fc1 = nn.Linear(128 if batch_norm else 6 * 6 * 128, 1024)
        self.norm = nn.BatchNorm1d(1024) if batch_norm else nn.Identity()
        self.dropout = nn.Dropout(0.1)
        self.fc2 = nn.Linear(1024, 512)
        self.fc3 = nn.Linear(512, 6)

    def forward(self, x):
        x = self.blocks(x)
        x = x.mean(dim=(2, 3)) if self.batch_norm else x.flatten(1)
        x = self.dropout(self.norm(F.relu(self.fc1(x))))
        return F.log_softmax(self.fc3(F.relu(self.fc2(x))), dim=1)


def cnn_train_step(model, optimizer, images_u8_nhwc: torch.Tensor, labels: torch.Tensor) -> float:
    """One SGD step on a uint8 NHWC batch, as the homework's ``train_batch``."""
    x = images_u8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)
    optimizer.zero_grad()
    loss = F.nll_loss(model(x), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def cnn_predict(model, images_u8_nhwc: torch.Tensor, batch: int = 250) -> torch.Tensor:
    model.eval()
    preds = [model(images_u8_nhwc[i : i + batch].permute(0, 3, 1, 2).float().div_(255.0)).argmax(1)
             for i in range(0, len(images_u8_nhwc), batch)]
    model.train()
    return torch.cat(preds)


# -- P2G ---------------------------------------------------------------------------------------


def _lstm(input_size: int, hidden: int, **kwargs) -> nn.LSTM:
    lstm = nn.LSTM(input_size, hidden, batch_first=True, **kwargs)
    for name, p in lstm.named_parameters():
        if name.startswith("bias_ih"):
            nn.init.zeros_(p)
            p.requires_grad_(False)  # one bias per gate, as in Flax (see the module docstring)
    return lstm


class Encoder(nn.Module):
    def __init__(self, vocab: int, hidden: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden, padding_idx=PAD)
        self.lstm = _lstm(hidden, hidden // 2, bidirectional=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, lengths):
        x = self.dropout(self.embedding(src))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h, c) = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        final = (torch.cat([h[0], h[1]], -1)[None], torch.cat([c[0], c[1]], -1)[None])  # (1, B, H)
        return self.dropout(out), final


class Attention(nn.Module):
    """Bahdanau: e = v^T tanh(W_s s + W_h h), s~ = tanh(W_out [c; s])."""

    def __init__(self, hidden: int):
        super().__init__()
        self.W_s = nn.Linear(hidden, hidden, bias=False)
        self.W_h = nn.Linear(hidden, hidden, bias=False)
        self.v = nn.Linear(hidden, 1, bias=False)
        self.W_out = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, s, keys, src_mask):
        scores = self.v(torch.tanh(self.W_s(s)[:, :, None] + self.W_h(keys)[:, None])).squeeze(-1)  # (B,T,S)
        alpha = torch.softmax(scores.masked_fill(~src_mask[:, None], float("-inf")), dim=-1)
        return torch.tanh(self.W_out(torch.cat([alpha @ keys, s], -1)))


class Decoder(nn.Module):
    def __init__(self, vocab: int, hidden: int, dropout: float, attention: bool):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden, padding_idx=PAD)
        self.lstm = _lstm(hidden, hidden)
        self.attention = Attention(hidden) if attention else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, state, enc_out, src_mask):
        """``tgt`` (B,T) -> logits (B,T,V), state; used both teacher-forced and for one step."""
        s, state = self.lstm(self.dropout(self.embedding(tgt)), state)
        if self.attention is not None:
            s = self.attention(s, enc_out, src_mask)
        return self.dropout(s) @ self.embedding.weight.T, state  # generator tied to the embedding


class TorchSeq2Seq(nn.Module):
    def __init__(self, src_vocab: int, tgt_vocab: int, hidden=128, dropout=0.3, attention=False):
        super().__init__()
        self.encoder = Encoder(src_vocab, hidden, dropout)
        self.decoder = Decoder(tgt_vocab, hidden, dropout, attention)

    def forward(self, src, src_len, tgt_in):
        enc_out, state = self.encoder(src, src_len)
        logits, _ = self.decoder(tgt_in, state, enc_out, src != PAD)
        return logits


def p2g_train_step(model, optimizer, src, src_len, tgt_in, tgt_out) -> float:
    optimizer.zero_grad()
    logits = model(src, src_len, tgt_in)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=PAD)
    loss.backward()
    optimizer.step()
    return loss.item()


def _next_token(logits, top_p: float | None):
    logits = logits.clone()
    logits[:, PAD] = float("-inf")
    logits[:, SOS] = float("-inf")
    if top_p is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1)
    return order.gather(-1, choice)[:, 0]


@torch.no_grad()
def greedy_per_word(model, src, src_len, max_len: int = 50) -> list[list[int]]:
    """The homework's loop: each word alone, one decoder step at a time until EOS."""
    model.eval()
    words = []
    for i in range(len(src)):
        n = int(src_len[i])
        word_src = src[i : i + 1, :n]
        enc_out, state = model.encoder(word_src, src_len[i : i + 1])
        mask = word_src != PAD
        token, out = torch.tensor([[SOS]]), []
        for _ in range(max_len):
            logits, state = model.decoder(token, state, enc_out, mask)
            nxt = int(_next_token(logits[:, -1], None))
            if nxt == EOS:
                break
            out.append(nxt)
            token = torch.tensor([[nxt]])
        words.append(out)
    return words


@torch.no_grad()
def decode_batched(model, src, src_len, max_len: int = 50, top_p: float | None = None) -> torch.Tensor:
    """The whole batch one step at a time, stopping when every word has produced EOS.
    -> (B, steps) tokens, PAD after EOS."""
    model.eval()
    enc_out, state = model.encoder(src, src_len)
    mask = src != PAD
    token = torch.full((len(src), 1), SOS, dtype=torch.long)
    done = torch.zeros(len(src), dtype=torch.bool)
    out = []
    for _ in range(max_len):
        logits, state = model.decoder(token, state, enc_out, mask)
        nxt = _next_token(logits[:, -1], top_p).masked_fill(done, PAD)
        out.append(nxt)
        done |= nxt == EOS
        if bool(done.all()):
            break
        token = nxt[:, None]
    return torch.stack(out, 1)


@torch.no_grad()
def load_flax_p2g(model: TorchSeq2Seq, params: dict) -> TorchSeq2Seq:
    """Copy a :class:`p2g.model.Seq2Seq`'s parameters (``nnx.State.to_pure_dict()`` of its
    ``nnx.Param`` state) into ``model``, so both compute the same function (gate order i, f, g, o
    in both; Flax kernels are (in, out), PyTorch weights (out, in))."""
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))

    def lstm(cell: dict, lstm: nn.LSTM, suffix: str = "") -> None:
        getattr(lstm, f"weight_ih_l0{suffix}").copy_(t(cell["dense_i"]["kernel"]).T)
        getattr(lstm, f"weight_hh_l0{suffix}").copy_(t(cell["dense_h"]["kernel"]).T)
        getattr(lstm, f"bias_hh_l0{suffix}").copy_(t(cell["dense_h"]["bias"]))
        getattr(lstm, f"bias_ih_l0{suffix}").zero_()

    enc, dec = params["encoder"], params["decoder"]
    model.encoder.embedding.weight.copy_(t(enc["embedding"]["embedding"]))
    lstm(enc["rnn"]["forward_rnn"]["cell"], model.encoder.lstm)
    lstm(enc["rnn"]["backward_rnn"]["cell"], model.encoder.lstm, "_reverse")
    model.decoder.embedding.weight.copy_(t(dec["embedding"]["embedding"]))
    lstm(dec["rnn"]["cell"], model.decoder.lstm)
    if model.decoder.attention is not None:
        for name in ("W_s", "W_h", "v", "W_out"):
            getattr(model.decoder.attention, name).weight.copy_(t(dec["attention"][name]["kernel"]).T)
    return model
