#!/usr/bin/env python3
"""Each op's own rounding error, from its input tap (issue #14).

    /work/venv/bin/python tools/precision_op_by_op.py MODEL_DIR REF.safetensors [DUMP.safetensors ...]

REF is a transformers f32 dump with every tap at every position
(tools/dump_reference.py --dtype f32, or a fixture's reference_f32.safetensors);
each DUMP is `wgllm verify --dump` of the same tokens. For every layer and run,
every op of a Llama/Qwen2 layer (attn_norm, q/k/v, q/k RoPE, attention,
attn_out, mlp_norm, mlp_out) is recomputed in float64 (numpy, RoPE on
transformers' own f32 angles) from THAT run's input tap and compared with its
output tap: max |d| at the last position / at any position, then the sum over
layers. Env NL limits the layers. What this leaves out: the residual adds
(wgllm's `resid_attn`/`out` taps are the hi half of its (hi, lo) stream, so
its norms' figures here include the low halves the tap does not show).
"""
import sys, json, math, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__import__('os').path.abspath(__file__)))
import numpy_forward as nf
from safetensors.numpy import load_file
if len(sys.argv) < 3:
    sys.exit(__doc__)
d = sys.argv[1]; refp = sys.argv[2]; dumps = sys.argv[3:]
cfg = json.load(open(d + '/config.json'))
W = nf.load_bf16_safetensors(d + '/model.safetensors')
ref = load_file(refp)
runs = {'tf': ref}
for p in dumps: runs[p.split('/')[-1]] = load_file(p)
H, nh, nkv = cfg['hidden_size'], cfg['num_attention_heads'], cfg['num_key_value_heads']
hd = cfg.get('head_dim') or H // nh
eps = cfg['rms_norm_eps']
def f(x): return x.astype(np.float64)
def lin(name, v):
    y = f(v) @ f(W[name + '.weight']).T
    if name + '.bias' in W: y = y + W[name + '.bias']
    return y
inv32 = ref['rope.inv_freq']
def rope32(x, n):
    S = x.shape[0]
    ang = (np.arange(S, dtype=np.float32)[:, None] * inv32[None, :]).astype(np.float64)
    cos = np.cos(np.concatenate([ang, ang], 1))[:, None, :]; sin = np.sin(np.concatenate([ang, ang], 1))[:, None, :]
    xh = f(x).reshape(S, n, hd); rot = np.concatenate([-xh[..., hd // 2:], xh[..., :hd // 2]], -1)
    return (xh * cos + rot * sin).reshape(S, n * hd)
def attn(q, k, v):
    S = q.shape[0]; qh = f(q).reshape(S, nh, hd); kh = f(k).reshape(S, nkv, hd); vh = f(v).reshape(S, nkv, hd)
    out = np.empty((S, nh, hd)); sc = 1 / math.sqrt(hd)
    for h in range(nh):
        g = h // (nh // nkv); s = qh[:, h] @ kh[:, g].T * sc
        s = np.where(np.tri(S) > 0, s, -np.inf); s -= s.max(1, keepdims=True); p = np.exp(s); p /= p.sum(1, keepdims=True)
        out[:, h] = p @ vh[:, g]
    return out.reshape(S, nh * hd)
def silu(x): return x / (1 + np.exp(-x))
tot = {}
for i in range(int(__import__('os').environ.get('NL', cfg['num_hidden_layers']))):
    p = f'model.layers.{i}.'; t = f'layers.{i}.'
    for rn, r in runs.items():
        stream = r['embed'] if i == 0 else r[f'layers.{i-1}.out']
        ops = {
          'attn_norm': (nf.rmsnorm(f(stream), f(W[p + 'input_layernorm.weight']), eps), r[t + 'attn_norm']),
          'q': (lin(p + 'self_attn.q_proj', r[t + 'attn_norm']), r[t + 'q']),
          'k': (lin(p + 'self_attn.k_proj', r[t + 'attn_norm']), r[t + 'k']),
          'v': (lin(p + 'self_attn.v_proj', r[t + 'attn_norm']), r[t + 'v']),
          'q_rope': (rope32(r[t + 'q'], nh), r[t + 'q_rope']),
          'k_rope': (rope32(r[t + 'k'], nkv), r[t + 'k_rope']),
          'attn': (attn(r[t + 'q_rope'], r[t + 'k_rope'], r[t + 'v']), r[t + 'attn']),
          'attn_out': (lin(p + 'self_attn.o_proj', r[t + 'attn']), r[t + 'attn_out']),
          'mlp_norm': (nf.rmsnorm(f(r[t + 'resid_attn']), f(W[p + 'post_attention_layernorm.weight']), eps), r[t + 'mlp_norm']),
          'mlp_out': (lin(p + 'mlp.down_proj', silu(lin(p + 'mlp.gate_proj', r[t + 'mlp_norm'])) * lin(p + 'mlp.up_proj', r[t + 'mlp_norm'])), r[t + 'mlp_out']),
        }
        row = []
        for k, (want, got) in ops.items():
            e_last = np.abs(f(got[-1]) - want[-1]).max(); e_all = np.abs(f(got) - want).max()
            row.append(f'{k} {e_last:.1e}/{e_all:.1e}')
            tot.setdefault((rn, k), 0.0); tot[(rn, k)] += e_all
        print(f'L{i} {rn:28}', '  '.join(row))
print('sum over layers of all-position max err:')
for k in ['attn_norm','q','k','v','q_rope','k_rope','attn','attn_out','mlp_norm','mlp_out']:
    print(f'{k:10}', '  '.join(f'{rn}:{tot[(rn,k)]:.2e}' for rn in runs))
