"""A LLaDA-layout mask predictor in PyTorch (same tensor names and math as the
runtime's `model_type: "llada"`, see DESIGN.md section 1), plus the
baseline LLaDA decoder used to measure accuracy."""
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * self.weight.float()


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, h, kvh = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"]
        hd = d // h
        self.n_heads, self.n_kv_heads, self.head_dim = h, kvh, hd
        eps = cfg["rms_norm_eps"]
        self.attn_norm = RMSNorm(d, eps)
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kvh * hd, bias=False)
        self.v_proj = nn.Linear(d, kvh * hd, bias=False)
        self.attn_out = nn.Linear(h * hd, d, bias=False)
        self.ff_norm = RMSNorm(d, eps)
        m = cfg["mlp_hidden_size"]
        self.ff_proj = nn.Linear(d, m, bias=False)   # gate (SiLU)
        self.up_proj = nn.Linear(d, m, bias=False)
        self.ff_out = nn.Linear(m, d, bias=False)    # down

    def forward(self, x, cos, sin, attn_mask):
        B, L, _ = x.shape
        n = self.attn_norm(x)
        q = self.q_proj(n).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(n).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(n).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin).to(v.dtype)
        k = apply_rope(k, cos, sin).to(v.dtype)
        if self.n_kv_heads != self.n_heads:
            r = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(r, dim=1)
            v = v.repeat_interleave(r, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           scale=1.0 / math.sqrt(self.head_dim))
        a = a.transpose(1, 2).reshape(B, L, -1)
        h = x + self.attn_out(a)
        n = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(n)) * self.up_proj(n))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    xf = x.float()
    return xf * cos + rotate_half(xf) * sin


class LLaDA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, V = cfg["d_model"], cfg["embedding_size"]
        self.model = nn.Module()
        self.model.transformer = nn.Module()
        t = self.model.transformer
        t.wte = nn.Embedding(V, d)
        t.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg["n_layers"])])
        t.ln_f = RMSNorm(d, cfg["rms_norm_eps"])
        t.ff_out = nn.Linear(d, V, bias=False)
        self.head_dim = d // cfg["n_heads"]
        self._init()

    def _init(self):
        std = 0.02
        nl = self.cfg["n_layers"]
        for name, p in self.named_parameters():
            if p.dim() == 2:
                s = std
                if name.endswith("attn_out.weight") or (".blocks." in name and name.endswith("ff_out.weight")):
                    s = std / math.sqrt(2 * nl)
                nn.init.normal_(p, 0.0, s)

    def rope(self, L, device):
        hd = self.head_dim
        theta = float(self.cfg["rope_theta"])
        inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        pos = torch.arange(L, dtype=torch.float32, device=device)
        f = torch.outer(pos, inv_freq)
        emb = torch.cat((f, f), dim=-1)
        return emb.cos()[None, None], emb.sin()[None, None]

    def forward(self, ids, key_valid=None):
        """ids [B, L]; key_valid [B, L] bool (False = padding key, ignored)."""
        B, L = ids.shape
        t = self.model.transformer
        x = t.wte(ids)
        cos, sin = self.rope(L, ids.device)
        mask = None
        if key_valid is not None:
            mask = key_valid[:, None, None, :]
        for blk in t.blocks:
            x = blk(x, cos, sin, mask)
        return t.ff_out(t.ln_f(x))


def load_config(path):
    with open(path) as f:
        return json.load(f)


@torch.no_grad()
def generate_baseline(model, prompts, mask_id, gen_length=64, block_length=32, steps=64,
                      pad_id=0, autocast_bf16=False, min_len=0):
    """Baseline LLaDA `generate`: semi-autoregressive blocks, low-confidence
    remasking, greedy argmax (temperature 0), float64 softmax confidences,
    ties -> lower position.  `prompts` is a list of id lists; prompts of
    different lengths are batched by right-padding after the generation region
    and excluding the padding from the attention keys (each row then computes
    exactly what it would alone: RoPE only sees relative positions).
    Returns the list of generated id lists (length gen_length each) and NFE."""
    B = len(prompts)
    plens = [len(p) for p in prompts]
    L = max(max(plens) + gen_length, min_len)
    x = torch.full((B, L), pad_id, dtype=torch.long)
    valid = torch.zeros((B, L), dtype=torch.bool)
    gstart = torch.tensor(plens)
    for i, p in enumerate(prompts):
        x[i, :len(p)] = torch.tensor(p)
        x[i, len(p):len(p) + gen_length] = mask_id
        valid[i, :len(p) + gen_length] = True
    assert gen_length % block_length == 0
    nblocks = gen_length // block_length
    assert steps % nblocks == 0
    spb = steps // nblocks
    ar = torch.arange(L)[None, :]
    nfe = 0
    for b in range(nblocks):
        bs = gstart[:, None] + b * block_length
        in_block = (ar >= bs) & (ar < bs + block_length)
        m = int(((x == mask_id) & in_block)[0].sum())  # same for every row
        base, rem = divmod(m, spb)
        sched = [base + (1 if i < rem else 0) for i in range(spb)]
        for s in range(spb):
            k = sched[s]
            if k == 0:
                continue
            if autocast_bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(x, valid).float()
            else:
                logits = model(x, valid)
            nfe += 1
            x0 = logits.argmax(-1)
            p = torch.softmax(logits.double(), dim=-1)
            conf = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            cand = (x == mask_id) & in_block
            conf = torch.where(cand, conf, torch.full_like(conf, -math.inf))
            for _ in range(k):
                j = conf.argmax(-1)  # first max -> lowest position on ties
                rows = torch.arange(B)
                x[rows, j] = x0[rows, j]
                conf[rows, j] = -math.inf
    out = [x[i, plens[i]:plens[i] + gen_length].tolist() for i in range(B)]
    return out, nfe
