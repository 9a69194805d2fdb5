"""PyTorch references for the benchmarks, written here (eager fp32, torch's CPU defaults).

Not part of the package: only bench/ scripts use it, and they run it as a child process
(`python bench/torch_reference.py --serve ...`) so that its peak RSS and thread pool are its
own and the parent never imports torch. The parent drives it over stdin/stdout, one line
per request, alternating its own timings with these:

  dimo <json model config> <batch>    -> ready; then "step" -> seconds of one Di[M]O iteration
  onestep <json config> <npz weights> -> ready; then "gen" | "dec" | "full" -> seconds
  "check <in.npz> <out.npz>"          -> decodes the npz's token ids, writes the images
  "rss"                               -> peak RSS in MB;  "quit"

What the references compute (the same shapes and steps as our JAX code):
- `dimo`: MaskBit's LFQBert (post-norm BERT, nn.MultiheadAttention, dropout 0.1 in
  generator and auxiliary, class token last) in a Di[M]O iteration: initial tokens with
  round(0.6 L) MASKed positions, σ = 0.1 perturbed embeddings, generator forward with
  graph, categorical sample, arccos forward mask, teacher with CFG (w = 2, one
  doubled-batch forward, as the original code bases do), auxiliary forward, forward-KL
  Jeffreys cotangent / B into the generator's backward, grad-norm clip 1, Adam
  (lr 1e-5, eps 1e-6; input projection, output bias and positions frozen); then the
  auxiliary update (label-smoothed cross-entropy on a fresh generator sample, same
  mask) and the EMA.
- `onestep`: one LFQBert forward (eval), categorical sampling, MaskBit's
  combine_factorized_tokens, and ConvVQModel.decode_tokens (GroupNorm(32, eps 1e-6),
  bias-free residual convs, the 1x1 shortcut on the block's OUTPUT, nearest x2 then 3x3
  conv); its weights come from the JAX tokenizer's parameters (npz), so `check` shows the
  two decoders compute the same function.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-12
GN_EPS = 1e-6


class BertLayer(nn.Module):
    def __init__(self, d, heads, mlp_dim, p):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=p, batch_first=True)
        self.attn_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, d), nn.Dropout(p))
        self.mlp_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        x = self.attn_norm(x + self.drop(a))
        return self.mlp_norm(x + self.mlp(x))


class LFQBert(nn.Module):
    def __init__(self, num_tokens, num_bits, splits, hidden_dim, depth, heads, mlp_dim,
                 num_classes=1000, dropout=0.1):
        super().__init__()
        self.num_tokens, self.splits, self.num_classes = num_tokens, splits, num_classes
        self.bps = num_bits // splits
        self.vocab = 2**self.bps
        d = hidden_dim
        self.input_proj = nn.Linear(num_bits, d)
        self.class_emb = nn.Embedding(num_classes + 1, d)
        self.pos_emb = nn.Parameter(torch.randn(1, num_tokens + 1, d) * 0.02)
        self.first_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.first_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList([BertLayer(d, heads, mlp_dim, dropout) for _ in range(depth)])
        self.last_dense = nn.Linear(d, d)
        self.last_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.prediction = nn.Linear(d, splits * self.vocab)

    def embed(self, tokens):
        """(B, L, S) sub-token ids (MASK = V) -> (B, L, hidden) on ±1 / 0 bit vectors."""
        is_mask = tokens >= self.vocab
        shifts = torch.arange(self.bps)
        bits = ((tokens.clamp(max=self.vocab - 1)[..., None] >> shifts) & 1).float() * 2 - 1
        bits = bits.masked_fill(is_mask[..., None], 0.0)
        return self.input_proj(bits.flatten(2))

    def forward(self, emb, labels):
        b = emb.shape[0]
        x = torch.cat([emb, self.class_emb(labels)[:, None]], 1) + self.pos_emb
        x = self.first_drop(self.first_norm(x))
        for layer in self.layers:
            x = layer(x)
        x = self.last_norm(F.gelu(self.last_dense(x)))
        return self.prediction(x[:, : self.num_tokens]).view(b, self.num_tokens, self.splits, self.vocab)


def _exact_count_mask(counts, b, length):
    ranks = torch.rand(b, length).argsort(1).argsort(1)
    return ranks < counts[:, None]


def _sample(logits):
    v = logits.shape[-1]
    return torch.multinomial(torch.softmax(logits.reshape(-1, v), -1), 1).view(logits.shape[:-1])


class DiMO:
    """Teacher, generator, auxiliary, EMA and the two Adam optimisers of one iteration."""

    FROZEN = ("input_proj.weight", "input_proj.bias", "prediction.bias", "pos_emb")

    def __init__(self, cfg, batch):
        torch.manual_seed(0)
        self.b = batch
        self.teacher = LFQBert(**cfg).eval()
        self.gen = LFQBert(**cfg).train()
        self.aux = LFQBert(**cfg).train()
        self.gen.load_state_dict(self.teacher.state_dict())
        self.aux.load_state_dict(self.teacher.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.ema = [p.detach().clone() for p in self.gen.parameters()]
        opt = lambda m: torch.optim.Adam(self._trainable(m), lr=1e-5, betas=(0.9, 0.999), eps=1e-6)
        self.opt_g, self.opt_a = opt(self.gen), opt(self.aux)
        self.step_n = 0

    def _trainable(self, model):
        out = []
        for name, p in model.named_parameters():
            p.requires_grad_(name not in self.FROZEN)
            if p.requires_grad:
                out.append(p)
        return out

    def _inputs(self):
        g, b = self.gen, self.b
        length = g.num_tokens
        labels = torch.randint(0, g.num_classes, (b,))
        tokens = torch.randint(0, g.vocab, (b, length, g.splits))
        m = _exact_count_mask(torch.full((b,), round(0.6 * length)), b, length)
        return labels, tokens.masked_fill(m[..., None], g.vocab)

    def _gen_logits(self, labels, tokens):
        e = self.gen.embed(tokens)
        return self.gen(0.1 * torch.randn_like(e) + math.sqrt(1 - 0.01) * e, labels)

    def _forward_mask(self, x):
        b, length = x.shape[:2]
        r = torch.arccos(torch.rand(b)) / (math.pi / 2)
        m = _exact_count_mask(torch.clamp(torch.round(r * length), min=1), b, length)
        return m, x.masked_fill(m[..., None], self.gen.vocab)

    def step(self):
        b, g, t = self.b, self.gen, self.teacher
        labels, tokens = self._inputs()
        z = self._gen_logits(labels, tokens)
        with torch.no_grad():
            x = _sample(z)
            m, xt = self._forward_mask(x)
            both = t(t.embed(torch.cat([xt, xt])), torch.cat([labels, torch.full_like(labels, t.num_classes)]))
            zc, zu = both[:b], both[b:]
            zt = zu + 2.0 * (zc - zu)
            za = self.aux(self.aux.embed(xt), labels)
            cot = (torch.softmax(za, -1) - torch.softmax(zt, -1)) * m[..., None, None] / b
        self.opt_g.zero_grad(set_to_none=True)
        z.backward(cot)
        nn.utils.clip_grad_norm_(self.opt_g.param_groups[0]["params"], 1.0)
        self.opt_g.step()

        with torch.no_grad():
            labels2, tokens2 = self._inputs()
            x2 = _sample(self._gen_logits(labels2, tokens2))
            m2, x2t = self._forward_mask(x2)
        logits = self.aux(self.aux.embed(x2t), labels2)
        ce = F.cross_entropy(logits.reshape(-1, g.vocab), x2.reshape(-1), label_smoothing=0.1, reduction="none")
        mm = m2[..., None].expand_as(x2).reshape(-1).float()
        loss = (ce * mm).sum() / mm.sum().clamp(min=1)
        self.opt_a.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.opt_a.param_groups[0]["params"], 1.0)
        self.opt_a.step()

        with torch.no_grad():
            rate = min(0.9999, (1 + self.step_n) / (10 + self.step_n))
            torch._foreach_lerp_(self.ema, [p.detach() for p in g.parameters()], 1.0 - rate)
        self.step_n += 1
        return loss.item()


# ------------------------------------------------------------------ tokenizer decoder


def decoder_plan(hidden, channel_mult):
    """(block_in, [(c_in, c_out, upsample?)] in order of application): MaskBit's decoder."""
    mult = tuple(channel_mult) + (channel_mult[-1],)
    stages = [(hidden * mult[i + 1], hidden * mult[i], i > 0) for i in reversed(range(len(channel_mult)))]
    return hidden * channel_mult[-1], stages


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, c_in, eps=GN_EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(32, c_out, eps=GN_EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(c_out, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(h) if self.nin_shortcut is not None else x)


class Stage(nn.Module):
    def __init__(self, c_in, c_out, blocks, up):
        super().__init__()
        for j in range(blocks):
            self.add_module(f"res_blocks_{j}", ResBlock(c_in if j == 0 else c_out, c_out))
        self.blocks = blocks
        self.upsample_conv = nn.Conv2d(c_out, c_out, 3, padding=1) if up else None

    def forward(self, x):
        for j in range(self.blocks):
            x = getattr(self, f"res_blocks_{j}")(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Decoder(nn.Module):
    """ConvVQModel's decoder (NCHW). Module names follow the JAX port's parameter paths."""

    def __init__(self, num_bits, hidden=128, channel_mult=(1, 1, 2, 2, 4), blocks=2, channels=3):
        super().__init__()
        self.num_bits = num_bits
        block_in, stages = decoder_plan(hidden, channel_mult)
        self.conv_in = nn.Conv2d(num_bits, block_in, 3, padding=1)
        self.mid = Stage(block_in, block_in, blocks, False)
        for i, (c_in, c_out, up) in enumerate(stages):
            self.add_module(f"up_{i}", Stage(c_in, c_out, blocks, up))
        self.n_up = len(stages)
        self.norm_out = nn.GroupNorm(32, stages[-1][1], eps=GN_EPS)
        self.conv_out = nn.Conv2d(stages[-1][1], channels, 3, padding=1)

    def forward(self, bits):
        x = self.mid(self.conv_in(bits))
        for i in range(self.n_up):
            x = getattr(self, f"up_{i}")(x)
        return self.conv_out(F.silu(self.norm_out(x)))

    def decode_tokens(self, ids):
        """(B, h, w) token ids -> images (B, 3, H, W): bit k of the id -> ±1 channel k."""
        bits = ((ids[..., None] >> torch.arange(self.num_bits)) & 1).float() * 2 - 1
        return self(bits.permute(0, 3, 1, 2).contiguous())

    def load_jax(self, flat):
        """Loads {'a/b/kernel': array} (the JAX decoder's params, HWIO kernels)."""
        state = {}
        for name, p in self.state_dict().items():
            path, leaf = name.rsplit(".", 1)
            key = path.replace(".", "/")
            if leaf == "weight" and p.ndim == 4:
                state[name] = torch.from_numpy(np.ascontiguousarray(flat[key + "/kernel"].transpose(3, 2, 0, 1)))
            else:
                state[name] = torch.from_numpy(np.asarray(flat[key + ("/scale" if leaf == "weight" else "/bias")]))
        self.load_state_dict(state)


def combine_factorized_tokens(sub, bps):
    """(B, L, S) sub-token ids, split 0 = low bits -> (B, L) full ids."""
    return (sub << (bps * torch.arange(sub.shape[-1]))).sum(-1)


class OneStep:
    def __init__(self, cfg, weights):
        torch.manual_seed(0)
        g = cfg["generator"]
        self.batch = cfg["batch"]
        self.gen = LFQBert(**g).eval()
        self.dec = Decoder(g["num_bits"], **cfg["decoder"]).eval()
        self.dec.load_jax(dict(np.load(weights)))
        self.side = math.isqrt(g["num_tokens"])

    @torch.no_grad()
    def tokens(self):
        g, b = self.gen, self.batch
        labels = torch.randint(0, g.num_classes, (b,))
        tokens = torch.randint(0, g.vocab, (b, g.num_tokens, g.splits))
        m = _exact_count_mask(torch.full((b,), round(0.6 * g.num_tokens)), b, g.num_tokens)
        e = g.embed(tokens.masked_fill(m[..., None], g.vocab))
        z = g(0.1 * torch.randn_like(e) + math.sqrt(1 - 0.01) * e, labels)
        ids = combine_factorized_tokens(_sample(z), g.bps)
        return ids.view(b, self.side, self.side)

    @torch.no_grad()
    def decode(self, ids):
        return self.dec.decode_tokens(ids).clamp(0, 1)


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def serve(kind, cfg_json, extra):
    cfg = json.loads(cfg_json)
    if kind == "dimo":
        model = DiMO(cfg, int(extra))
        model.step()  # warm-up
        ops = {"step": model.step}
    else:
        model = OneStep(cfg, extra)
        ids = model.tokens()
        model.decode(ids)  # warm-up
        ops = {"gen": model.tokens, "dec": lambda: model.decode(ids), "full": lambda: model.decode(model.tokens())}
    print(f"ready torch {torch.__version__} threads {torch.get_num_threads()}", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "rss":
            print(peak_rss_mb(), flush=True)
        elif cmd[0] == "check":
            images = model.decode(torch.from_numpy(np.load(cmd[1])["ids"]).long())
            np.save(cmd[2], images.permute(0, 2, 3, 1).numpy())
            print("done", flush=True)
        else:
            print(f"{_timed(ops[cmd[0]]):.6f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "--serve":
        sys.exit("usage: torch_reference.py --serve dimo|onestep <json config> <batch | weights.npz>")
    if os.environ.get("TORCH_REFERENCE_THREADS"):  # default: torch's own choice
        torch.set_num_threads(int(os.environ["TORCH_REFERENCE_THREADS"]))
    serve(sys.argv[2], sys.argv[3], sys.argv[4])
