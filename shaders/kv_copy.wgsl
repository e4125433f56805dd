// Append this step's K (after RoPE) and V rows to one layer's KV cache.
//   k_new, v_new: f32 [n_tokens, n_kv_heads * head_dim]
//   k_cache, v_cache: f32 [n_kv_heads, max_ctx, head_dim] (head-major)
// Token t goes to position row_pos(t) of KV slot row_slot(t) (the prelude
// from kv_copy.rs: step.pos_offset + t of slot 0, or per-row positions).
// A slot's region is [n_kv_heads, max_ctx, head_dim]; slots follow each other. Positions at or past max_ctx
// are never written (the host rejects such steps too).
// One invocation per (token, kv head, element), K and V together.

struct Params {
    n_kv_heads: u32,
    head_dim: u32,
    max_ctx: u32,
    _p0: u32,
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: StepT;
@group(0) @binding(2) var<storage, read> k_new: array<f32>;
@group(0) @binding(3) var<storage, read> v_new: array<f32>;
@group(0) @binding(4) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(5) var<storage, read_write> v_cache: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = wg_linear(wid, nwg) * WG + lid;
    let width = p.n_kv_heads * p.head_dim;
    let t = g / width;
    if (t >= step.n_tokens) {
        return;
    }
    let pos = row_pos(t);
    if (pos >= p.max_ctx) {
        return;
    }
    let r = g - t * width;
    let h = r / p.head_dim;
    let j = r - h * p.head_dim;
    let dst = ((row_slot(t) * p.n_kv_heads + h) * p.max_ctx + pos) * p.head_dim + j;
    k_cache[dst] = k_new[g];
    v_cache[dst] = v_new[g];
}
