"""Extra MaskBit parity fixtures for configs the shared fixtures do not cover.

An independent PyTorch re-implementation of LFQBert / ConvVQModel written from the
documented facts (SPEC §2; torch.nn.MultiheadAttention, GroupNorm, F.interpolate, explicit
same-padding), NOT MaskBit's own code, so these fixtures check our port against a second
implementation, not against the original. Run once, by hand (needs torch):

    /tmp/torchvenv/bin/python tests/data/make_maskbit_extra_fixtures.py tests/data small

`small` writes the committed files (weights rounded to float16 and stored as float16);
without it, larger float32 variants are written for manual checks.
"""
import json, math, sys
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)

class Attn(nn.Module):
    def __init__(s, d, h, pre):
        super().__init__(); s.mha = nn.MultiheadAttention(d, h, batch_first=True, bias=True); s.norm = nn.LayerNorm(d, eps=1e-12); s.pre = pre
    def forward(s, x):
        if s.pre:
            y = s.norm(x); return s.mha(y, y, y, need_weights=False)[0] + x
        return s.norm(s.mha(x, x, x, need_weights=False)[0] + x)

class FF(nn.Module):
    def __init__(s, d, m, pre):
        super().__init__(); s.net = nn.Sequential(nn.Linear(d, m), nn.GELU(), nn.Linear(m, d), nn.Dropout(0.0)); s.norm = nn.LayerNorm(d, eps=1e-12); s.pre = pre
    def forward(s, x):
        if s.pre: return s.net(s.norm(x)) + x
        return s.norm(s.net(x) + x)

class TE(nn.Module):
    def __init__(s, d, depth, h, m, pre):
        super().__init__(); s.layers = nn.ModuleList([nn.ModuleList([Attn(d, h, pre), FF(d, m, pre)]) for _ in range(depth)])
    def forward(s, x):
        for a, f in s.layers: x = f(a(x))
        return x

class Bert(nn.Module):
    def __init__(s, img_size, hidden_dim, codebook_size, codebook_splits, depth, heads, mlp_dim, dropout, nclass, input_stride, use_prenorm):
        super().__init__()
        s.L = (img_size // input_stride) ** 2; s.S = codebook_splits; s.bits = int(math.log2(codebook_size)); eb = s.bits // s.S
        s.V = 2 ** eb; s.register_buffer("bits_to_indices", (2 ** torch.arange(eb)).int())
        s.class_emb = nn.Embedding(nclass + 1, hidden_dim); s.input_proj = nn.Linear(s.bits, hidden_dim)
        s.pos_emb = nn.Parameter(torch.randn(1, s.L + 1, hidden_dim) * 0.02)
        s.first_layer = nn.Sequential(nn.LayerNorm(hidden_dim, eps=1e-12), nn.Dropout(0.0))
        s.pre = use_prenorm; s.transformer = TE(hidden_dim, depth, heads, mlp_dim, use_prenorm)
        if use_prenorm: s.norm_after_transformer = nn.LayerNorm(hidden_dim, eps=1e-12)
        s.last_layer = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.LayerNorm(hidden_dim, eps=1e-12))
        s.prediction_layer = nn.Linear(hidden_dim, s.S * s.V); s.nclass = nclass
    def forward(s, tok, labels, drop):
        mask = tok == s.V
        b = ((tok[..., None].int() & s.bits_to_indices) != 0).float() * 2 - 1
        b[mask, :] = 0.0
        b = b.reshape(b.shape[0], b.shape[1], -1)
        c = labels.view(-1, 1).clone(); c[drop] = s.nclass
        x = torch.cat([s.input_proj(b), s.class_emb(c)], 1) + s.pos_emb
        x = s.transformer(s.first_layer(x))
        if s.pre: x = s.norm_after_transformer(x)
        x = s.prediction_layer(s.last_layer(x))
        return x.reshape(x.shape[0], x.shape[1], s.S, s.V)[:, :s.L], b

class ConvSame(nn.Conv2d):
    def forward(s, x):
        ih, iw = x.shape[-2:]
        def pad(i, k, st): return max((math.ceil(i / st) - 1) * st + k - i, 0)
        ph, pw = pad(ih, s.kernel_size[0], s.stride[0]), pad(iw, s.kernel_size[1], s.stride[1])
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)

GN = lambda c: nn.GroupNorm(32, c, eps=1e-6)

class Res(nn.Module):
    def __init__(s, ci, co):
        super().__init__(); s.ci, s.co = ci, co
        s.norm1 = GN(ci); s.conv1 = ConvSame(ci, co, 3, bias=False); s.norm2 = GN(co); s.conv2 = ConvSame(co, co, 3, bias=False)
        if ci != co: s.nin_shortcut = ConvSame(co, co, 1, bias=False)
    def forward(s, x):
        h = s.conv2(F.silu(s.norm2(s.conv1(F.silu(s.norm1(x))))))
        return h + (s.nin_shortcut(h) if s.ci != s.co else x)

class Stage(nn.Module):
    def __init__(s, ci, co, n, mode=None):
        super().__init__(); s.res_blocks = nn.ModuleList(); s.mode = mode
        for _ in range(n): s.res_blocks.append(Res(ci, co)); ci = co
        if mode == "conv": s.down_conv = ConvSame(co, co, 3, stride=2)
        if mode == "up": s.upsample_conv = ConvSame(co, co, 3)
    def forward(s, x):
        for r in s.res_blocks: x = r(x)
        if s.mode == "conv": x = s.down_conv(x)
        elif s.mode == "pool": x = F.avg_pool2d(x, 2, 2)
        elif s.mode == "up": x = s.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x

class Enc(nn.Module):
    def __init__(s, c):
        super().__init__(); h = c["hidden_channels"]; n = c["num_resolutions"]; m = (1,) + tuple(c["channel_mult"])
        s.conv_in = ConvSame(c["num_channels"], h, 3, bias=False)
        s.down = nn.ModuleList([Stage(h * m[i], h * m[i + 1], c["num_res_blocks"], ("conv" if c["sample_with_conv"] else "pool") if i < n - 1 else None) for i in range(n)])
        mid = h * m[n]; s.mid = Stage(mid, mid, c["num_res_blocks"]); s.norm_out = GN(mid); s.conv_out = ConvSame(mid, c["token_size"], 1)
    def forward(s, x):
        x = s.conv_in(x)
        for b in s.down: x = b(x)
        return s.conv_out(F.silu(s.norm_out(s.mid(x))))

class Dec(nn.Module):
    def __init__(s, c):
        super().__init__(); h = c["hidden_channels"]; n = c["num_resolutions"]; mult = tuple(c["channel_mult"]); nb = c.get("num_res_blocks_decoder", c["num_res_blocks"])
        bi = h * mult[n - 1]; m = mult + (mult[-1],)
        s.conv_in = ConvSame(c["token_size"], bi, 3); s.mid = Stage(bi, bi, nb)
        s.up = nn.ModuleList([Stage(h * m[i + 1], h * m[i], nb, "up" if i > 0 else None) for i in reversed(range(n))])
        co = h * m[0]; s.norm_out = GN(co); s.conv_out = ConvSame(co, c["num_channels"], 3)
    def forward(s, z):
        x = s.mid(s.conv_in(z))
        for b in s.up: x = b(x)
        return s.conv_out(F.silu(s.norm_out(x)))

class Quant(nn.Module):
    def __init__(s, bits):
        super().__init__(); s.register_buffer("bits_to_indices", (2 ** torch.arange(bits)).int())
        codes = torch.arange(2 ** bits); s.register_buffer("codebook", ((codes[:, None].int() & s.bits_to_indices) != 0).float() * 2 - 1)

class Tok(nn.Module):
    def __init__(s, c):
        super().__init__(); s.encoder = Enc(c); s.decoder = Dec(c); s.quantize = Quant(c["token_size"])

def randomize(m):
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 1.0 / math.sqrt(max(1, p[0].numel()))) + (1.0 if n.endswith("norm.weight") or ".norm" in n and n.endswith("weight") and p.ndim == 1 else 0.0))
            if HALF: p.copy_(p.half().float())

HALF = False  # store weights as float16 (rounded before the reference run) to keep files small

def save(path, model_name, cfg, sd, inputs, outputs):
    arrs = {"model": np.array(model_name), "cfg": np.array(json.dumps(cfg))}
    arrs.update({"sd/" + k: (v.detach().numpy().astype(np.float16) if HALF and v.is_floating_point() and "codebook" not in k else v.detach().numpy()) for k, v in sd.items()})
    arrs.update({"in/" + k: np.asarray(v) for k, v in inputs.items()})
    arrs.update({"out/" + k: np.asarray(v) for k, v in outputs.items()})
    np.savez(path, **arrs)

def bert_fixture(path, cfg, B=3, give_mask=True):
    m = Bert(**cfg).eval(); randomize(m)
    L, S, V = m.L, m.S, m.V
    tok = torch.randint(0, V, (B, L, S)); tok[torch.rand(B, L, S) < 0.4] = V
    labels = torch.randint(0, cfg["nclass"], (B,)); drop = torch.tensor([False, True, False][:B])
    with torch.no_grad():
        logits, bits = m(tok, labels, drop if give_mask else torch.ones(B, dtype=torch.bool))
    ins = {"tokens": tok.numpy(), "labels": labels.numpy()}
    if give_mask: ins["drop_label_mask"] = drop.numpy()
    save(path, "maskbit_bert", cfg, m.state_dict(), ins, {"logits": logits.numpy(), "input_bits": bits.numpy()})

def tok_fixture(path, cfg, H, W, B=2):
    m = Tok(cfg).eval(); randomize(m)
    img = torch.rand(B, cfg["num_channels"], H, W)
    with torch.no_grad():
        z = m.encoder(img)
        zz = z.permute(0, 2, 3, 1)
        idx = ((zz > 0).int() * m.quantize.bits_to_indices).sum(-1)
        q = (((idx[..., None].int() & m.quantize.bits_to_indices) != 0).float() * 2 - 1).permute(0, 3, 1, 2)
        dec = m.decoder(q)
        soft = torch.rand_like(q) * 2 - 1
        dsoft = m.decoder(soft)
    save(path, "maskbit_tokenizer", cfg, m.state_dict(), {"image": img.numpy(), "soft_bits": soft.numpy()},
         {"encoder_z": z.numpy(), "indices": idx.numpy(), "decoded": dec.numpy(), "decoded_soft": dsoft.numpy()})

out = sys.argv[1]
if len(sys.argv) > 2 and sys.argv[2] == "small":
    HALF = True
    bert_fixture(f"{out}/maskbit_bert_prenorm_s1.npz", dict(img_size=48, hidden_dim=32, codebook_size=32, codebook_splits=1, depth=3, heads=2, mlp_dim=48, dropout=0.0, nclass=7, input_stride=16, use_prenorm=True))
    bert_fixture(f"{out}/maskbit_bert_s3_nomask.npz", dict(img_size=48, hidden_dim=32, codebook_size=512, codebook_splits=3, depth=2, heads=4, mlp_dim=64, dropout=0.1, nclass=5, input_stride=16, use_prenorm=False), give_mask=False)
    tok_fixture(f"{out}/maskbit_tokenizer_pool.npz", dict(quantizer_type="lookup-free", codebook_size=32, token_size=5, num_channels=3, hidden_channels=32, channel_mult=[1, 1], num_resolutions=2, num_res_blocks=1, num_res_blocks_decoder=2, sample_with_conv=False), 6, 10)
    print("small ok"); sys.exit(0)
out = sys.argv[1]
bert_fixture(f"{out}/bert_pre.npz", dict(img_size=48, hidden_dim=32, codebook_size=32, codebook_splits=1, depth=3, heads=2, mlp_dim=48, dropout=0.0, nclass=7, input_stride=16, use_prenorm=True))
bert_fixture(f"{out}/bert_s3.npz", dict(img_size=64, hidden_dim=48, codebook_size=512, codebook_splits=3, depth=2, heads=3, mlp_dim=96, dropout=0.1, nclass=5, input_stride=16, use_prenorm=False), give_mask=False)
bert_fixture(f"{out}/bert_a_like.npz", dict(img_size=64, hidden_dim=64, codebook_size=64, codebook_splits=2, depth=2, heads=4, mlp_dim=128, dropout=0.0, nclass=10, input_stride=16, use_prenorm=False))
tok_fixture(f"{out}/tok_pool.npz", dict(quantizer_type="lookup-free", codebook_size=32, token_size=5, num_channels=3, hidden_channels=32, channel_mult=[1, 2, 2, 4], num_resolutions=4, num_res_blocks=1, num_res_blocks_decoder=2, sample_with_conv=False), 24, 40)
tok_fixture(f"{out}/tok_odd.npz", dict(quantizer_type="lookup-free", codebook_size=64, token_size=6, num_channels=3, hidden_channels=32, channel_mult=[1, 1, 2], num_resolutions=3, num_res_blocks=2, sample_with_conv=True), 36, 28)
print("ok")
