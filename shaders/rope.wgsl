// Rotary position embedding, Hugging Face rotate_half convention, in f32.
// Within each head of size d, element i pairs with i + d/2:
//   y[i]       = x[i]       * cos[pos, i] - x[i + d/2] * sin[pos, i]
//   y[i + d/2] = x[i + d/2] * cos[pos, i] + x[i]       * sin[pos, i]
// cos/sin come from host-computed tables `[max_positions, d/2]` (exact HF f32
// angles, accurate cos/sin), so no transcendental runs on the GPU.
// Token t of this step sits at position row_pos(t) (kv_copy.rs's prelude:
// step.pos_offset + t, or per-row positions in a batched step).
// One invocation per (token, head, pair).

struct Params {
    n_heads: u32,
    head_dim: u32,
    max_positions: u32,
    _p0: u32,
}

override WG: u32 = 64u;
// Deliberate bug for verify's self-tests (model::Faults): rotate interleaved
// pairs (2j, 2j+1) as GPT-J/Meta-style RoPE does, with frequency j.
override FAULT_INTERLEAVED: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: StepT;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> cos_t: array<f32>;
@group(0) @binding(4) var<storage, read> sin_t: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = wg_linear(wid, nwg) * WG + lid;
    let half = p.head_dim / 2u;
    let per_token = p.n_heads * half;
    let t = g / per_token;
    // Overshoot of the last workgroup / the 2D grid.
    if (t >= step.n_tokens) {
        return;
    }
    let pos = row_pos(t);
    // The host checks positions against the table; never read past it.
    if (pos >= p.max_positions) {
        return;
    }
    let r = g - t * per_token;
    let h = r / half;
    let i = r - h * half;
    let base = (t * p.n_heads + h) * p.head_dim;
    if (FAULT_INTERLEAVED) {
        let a = x[base + 2u * i];
        let b = x[base + 2u * i + 1u];
        let cf = cos_t[pos * half + i];
        let sf = sin_t[pos * half + i];
        y[base + 2u * i] = a * cf - b * sf;
        y[base + 2u * i + 1u] = b * cf + a * sf;
        return;
    }
    let x1 = x[base + i];
    let x2 = x[base + i + half];
    let c = cos_t[pos * half + i];
    let s = sin_t[pos * half + i];
    y[base + i] = x1 * c - x2 * s;
    y[base + i + half] = x2 * c + x1 * s;
}
