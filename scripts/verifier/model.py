"""The verifier's cross-encoder in plain PyTorch: a BERT encoder (the same computation as
candle-transformers' `BertModel`, which the dataplane runs) read from all-MiniLM-L6-v2's
`model.safetensors`, with low-rank adapters (LoRA) on every dense layer of the encoder, and
the pooler plus one linear layer on top.

Only the adapters, the LayerNorms, the token-type embeddings, the pooler and the classifier
are trained; everything else stays the embedder's weights, which every machine that runs the
local embedder already has. `export` writes just what was trained, so the file is small.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F
from safetensors.torch import load_file

LORA_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


class LoraLinear(nn.Module):
    def __init__(self, weight, bias, rank, alpha, full=False):
        super().__init__()
        # full: the weight itself is trained (no adapter); else frozen, adapted by LoRA.
        self.full = full
        self.weight = nn.Parameter(weight, requires_grad=full)
        self.bias = nn.Parameter(bias)
        self.rank = rank
        out_f, in_f = weight.shape
        if rank > 0:
            self.lora_a = nn.Parameter(torch.randn(rank, in_f) / math.sqrt(in_f))
            self.lora_b = nn.Parameter(torch.zeros(out_f, rank))
            self.scale = alpha / rank

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.rank > 0:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale
        return y

    def merged(self):
        if self.rank == 0:
            return self.weight.detach()
        return (self.weight + self.lora_b @ self.lora_a * self.scale).detach()


class Layer(nn.Module):
    def __init__(self, w, p, heads, rank, alpha, eps, full=False):
        super().__init__()
        lin = lambda n: LoraLinear(w[f"{p}.{n}.weight"], w[f"{p}.{n}.bias"], rank, alpha, full)
        self.q, self.k, self.v = lin("attention.self.query"), lin("attention.self.key"), lin("attention.self.value")
        self.attn_out = lin("attention.output.dense")
        self.ln1 = nn.LayerNorm(w[f"{p}.attention.output.LayerNorm.weight"].shape[0], eps=eps)
        self.ln1.weight.data = w[f"{p}.attention.output.LayerNorm.weight"]
        self.ln1.bias.data = w[f"{p}.attention.output.LayerNorm.bias"]
        self.inter = lin("intermediate.dense")
        self.out = lin("output.dense")
        self.ln2 = nn.LayerNorm(w[f"{p}.output.LayerNorm.weight"].shape[0], eps=eps)
        self.ln2.weight.data = w[f"{p}.output.LayerNorm.weight"]
        self.ln2.bias.data = w[f"{p}.output.LayerNorm.bias"]
        self.heads = heads
        self.names = {
            "attention.self.query": self.q,
            "attention.self.key": self.k,
            "attention.self.value": self.v,
            "attention.output.dense": self.attn_out,
            "intermediate.dense": self.inter,
            "output.dense": self.out,
        }

    def forward(self, x, mask_bias, dropout):
        b, t, d = x.shape
        h = self.heads
        split = lambda y: y.view(b, t, h, d // h).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // h) + mask_bias
        att = F.dropout(att.softmax(-1), dropout, self.training)
        ctx = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = self.ln1(x + F.dropout(self.attn_out(ctx), dropout, self.training))
        y = self.out(F.gelu(self.inter(x)))
        return self.ln2(x + F.dropout(y, dropout, self.training))


class CrossEncoder(nn.Module):
    def __init__(self, base_path, config, rank=16, alpha=32, dropout=0.1, full=False):
        super().__init__()
        w = load_file(base_path)
        eps = config["layer_norm_eps"]
        self.word = nn.Parameter(w["embeddings.word_embeddings.weight"], requires_grad=False)
        self.pos = nn.Parameter(w["embeddings.position_embeddings.weight"], requires_grad=False)
        self.types = nn.Parameter(w["embeddings.token_type_embeddings.weight"])
        self.emb_ln = nn.LayerNorm(self.word.shape[1], eps=eps)
        self.emb_ln.weight.data = w["embeddings.LayerNorm.weight"]
        self.emb_ln.bias.data = w["embeddings.LayerNorm.bias"]
        self.layers = nn.ModuleList(
            Layer(w, f"encoder.layer.{i}", config["num_attention_heads"], rank, alpha, eps, full)
            for i in range(config["num_hidden_layers"])
        )
        self.pooler = nn.Linear(self.word.shape[1], self.word.shape[1])
        self.pooler.weight.data = w["pooler.dense.weight"]
        self.pooler.bias.data = w["pooler.dense.bias"]
        self.classifier = nn.Linear(self.word.shape[1], 1)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)
        self.dropout = dropout

    def encode(self, ids, types, mask):
        """Hidden states of the last layer."""
        t = ids.shape[1]
        x = self.word[ids] + self.pos[:t].unsqueeze(0) + self.types[types]
        x = F.dropout(self.emb_ln(x), self.dropout, self.training)
        mask_bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for layer in self.layers:
            x = layer(x, mask_bias, self.dropout)
        return x

    def forward(self, ids, types, mask):
        t = ids.shape[1]
        x = self.word[ids] + self.pos[:t].unsqueeze(0) + self.types[types]
        x = F.dropout(self.emb_ln(x), self.dropout, self.training)
        mask_bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for layer in self.layers:
            x = layer(x, mask_bias, self.dropout)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return self.classifier(F.dropout(pooled, self.dropout, self.training)).squeeze(-1)

    def export(self):
        """What the dataplane adds to the embedder's weights: merged deltas of the adapted
        dense layers (as low-rank factors, so the file stays small) and the trained small
        tensors in full. Names follow the base file's."""
        out = {}
        for i, layer in enumerate(self.layers):
            p = f"encoder.layer.{i}"
            for name, lin in layer.names.items():
                if lin.full:
                    out[f"{p}.{name}.weight"] = lin.weight.detach()
                elif lin.rank > 0:
                    # delta = B @ A * scale, stored as (B * scale) and A
                    out[f"{p}.{name}.lora_b"] = (lin.lora_b * lin.scale).detach()
                    out[f"{p}.{name}.lora_a"] = lin.lora_a.detach()
                out[f"{p}.{name}.bias"] = lin.bias.detach()
            out[f"{p}.attention.output.LayerNorm.weight"] = layer.ln1.weight.detach()
            out[f"{p}.attention.output.LayerNorm.bias"] = layer.ln1.bias.detach()
            out[f"{p}.output.LayerNorm.weight"] = layer.ln2.weight.detach()
            out[f"{p}.output.LayerNorm.bias"] = layer.ln2.bias.detach()
        out["embeddings.token_type_embeddings.weight"] = self.types.detach()
        out["embeddings.LayerNorm.weight"] = self.emb_ln.weight.detach()
        out["embeddings.LayerNorm.bias"] = self.emb_ln.bias.detach()
        out["pooler.dense.weight"] = self.pooler.weight.detach()
        out["pooler.dense.bias"] = self.pooler.bias.detach()
        out["classifier.weight"] = self.classifier.weight.detach()
        out["classifier.bias"] = self.classifier.bias.detach()
        return {k: v.contiguous().clone() for k, v in out.items()}


def from_file(base_path, config, verifier_path):
    """A CrossEncoder with a verifier file merged in (what the dataplane runs)."""
    from safetensors import safe_open

    layers = None
    with safe_open(verifier_path, "pt") as f:
        meta = f.metadata() or {}
        delta = {k: f.get_tensor(k).float() for k in f.keys()}
    if "layers" in meta:
        layers = int(meta["layers"])
    cfg = dict(config)
    if layers:
        cfg["num_hidden_layers"] = layers
    model = CrossEncoder(base_path, cfg, rank=0)
    state = {}
    for i, layer in enumerate(model.layers):
        p = f"encoder.layer.{i}"
        for name, lin in layer.names.items():
            b, a = delta.get(f"{p}.{name}.lora_b"), delta.get(f"{p}.{name}.lora_a")
            if b is not None:
                lin.weight.data = lin.weight.data + b @ a
            if f"{p}.{name}.weight" in delta:
                lin.weight.data = delta[f"{p}.{name}.weight"]
            if f"{p}.{name}.bias" in delta:
                lin.bias.data = delta[f"{p}.{name}.bias"]
        for ln, key in ((layer.ln1, "attention.output.LayerNorm"), (layer.ln2, "output.LayerNorm")):
            ln.weight.data = delta[f"{p}.{key}.weight"]
            ln.bias.data = delta[f"{p}.{key}.bias"]
    model.types.data = delta["embeddings.token_type_embeddings.weight"]
    model.emb_ln.weight.data = delta["embeddings.LayerNorm.weight"]
    model.emb_ln.bias.data = delta["embeddings.LayerNorm.bias"]
    model.pooler.weight.data = delta["pooler.dense.weight"]
    model.pooler.bias.data = delta["pooler.dense.bias"]
    model.classifier.weight.data = delta["classifier.weight"]
    model.classifier.bias.data = delta["classifier.bias"]
    model.eval()
    return model, meta
