// RoPE of q and of k, and the KV-cache append, in one dispatch (the decode
// and prefill fast path; taps record the three ops apart, see model.rs).
// The arithmetic per element is rope.wgsl's (rotate_half on the same
// host-computed cos/sin tables) and the cache layout is kv_copy.wgsl's:
//   q_out  f32 [n_tokens, n_heads * head_dim]        (the QRope buffer)
//   k_cache, v_cache f32 [n_kv_heads, max_ctx, head_dim] (head-major)
// The rotated k goes straight to the cache, and v is copied there.
// One invocation per (token, head, pair) over n_heads q heads then
// n_kv_heads kv heads. Token t sits at position row_pos(t) of KV slot
// row_slot(t) (kv_copy.rs's prelude).

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    max_positions: u32,
    max_ctx: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

override WG: u32 = 64u;
// rope.wgsl's deliberate bug (model::Faults::rope_interleaved).
override FAULT_INTERLEAVED: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: StepT;
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> k: array<f32>;
@group(0) @binding(4) var<storage, read> v: array<f32>;
@group(0) @binding(5) var<storage, read> cos_t: array<f32>;
@group(0) @binding(6) var<storage, read> sin_t: array<f32>;
@group(0) @binding(7) var<storage, read_write> q_out: array<f32>;
@group(0) @binding(8) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(9) var<storage, read_write> v_cache: array<f32>;

// Rotate the pair of element i of the head at `base` of `src` (rope.wgsl).
fn rotate(x1: f32, x2: f32, c: f32, s: f32) -> vec2<f32> {
    return vec2<f32>(x1 * c - x2 * s, x2 * c + x1 * s);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = wg_linear(wid, nwg) * WG + lid;
    let half = p.head_dim / 2u;
    let heads = p.n_heads + p.n_kv_heads;
    let per_token = heads * half;
    let t = g / per_token;
    if (t >= step.n_tokens) {
        return;
    }
    let pos = row_pos(t);
    if (pos >= p.max_positions || pos >= p.max_ctx) {
        return;
    }
    let r = g - t * per_token;
    let h = r / half;
    let i = r - h * half;
    // Element pair (a, b) of the head and the angle's index.
    var a = i;
    var b = i + half;
    let f = i;
    if (FAULT_INTERLEAVED) {
        a = 2u * i;
        b = 2u * i + 1u;
    }
    let c = cos_t[pos * half + f];
    let s = sin_t[pos * half + f];
    if (h < p.n_heads) {
        let base = (t * p.n_heads + h) * p.head_dim;
        let y = rotate(q[base + a], q[base + b], c, s);
        q_out[base + a] = y.x;
        q_out[base + b] = y.y;
        return;
    }
    let kh = h - p.n_heads;
    let src = (t * p.n_kv_heads + kh) * p.head_dim;
    let dst = ((row_slot(t) * p.n_kv_heads + kh) * p.max_ctx + pos) * p.head_dim;
    let y = rotate(k[src + a], k[src + b], c, s);
    k_cache[dst + a] = y.x;
    k_cache[dst + b] = y.y;
    v_cache[dst + a] = v[src + a];
    v_cache[dst + b] = v[src + b];
}
