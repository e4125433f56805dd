// Causal grouped-query attention over a head-major KV cache, in f32.
//   q:        [n_tokens, n_heads * d]      (after RoPE)
//   k_cache:  [n_kv_heads, max_ctx, d]     (already holds this step's rows)
//   v_cache:  [n_kv_heads, max_ctx, d]
//   out:      [n_tokens, n_heads * d]
// all read as vec4 (d % 4 == 0, checked on the host).
// Query token t sits at position p = step.pos_offset + t and attends to cache
// positions 0..=p, or with a sliding window (p.window > 0) to the positions j
// with p - j < window, i.e. max(0, p + 1 - window)..=p (transformers'
// sliding_window_overlay: kv_idx > q_idx - sliding_window, AND causal).
// Query head h reads KV head h / (n_heads / n_kv_heads)
// (HF's repeat_kv: each KV head serves a contiguous group of query heads).
// out = softmax(q.K^T * scale) V with the host's scale (d^-0.5, or e.g.
// Gemma's query_pre_attn_scalar^-0.5), softmax in f32 with max subtraction,
// computed online (flash style) over blocks of WG positions.
//
// Windowed queries start at the block holding their first visible position:
// blocks wholly before the window are skipped, not masked, so a decode step
// reads about `window` K/V rows whatever the context length. On a real GPU
// decode attention is bound by memory bandwidth (each K/V row is read once
// and used for one dot product), so masking alone would still stream the
// whole cache every step: with a 4096 window at 32k positions that is 8x the
// necessary traffic and time. (Only the leading partial block is masked.)
//
// One workgroup per (token, head). Per block of WG positions:
//   1. invocation l scores position start + l (a d-long dot product),
//   2. every invocation scans the block's scores for the block max (no
//      reduction tree: 2 barriers per block in total), rescales its running
//      state and publishes its own exp(score - max),
//   3. invocation l = c + D4 * g accumulates the vec4 column(s) c of the
//      output over the block positions g, g + G, g + 2G, ... (G position
//      groups, so every invocation works even when d/4 < WG).
// All invocations share the running max, so at the end the G partial sums
// (and their softmax denominators) are simply added.
//
// Loop budget: llvmpipe (lavapipe) silently ends a shader's loops after 65535
// iterations in total per invocation, so every loop here runs per block of
// WG positions, never per position: the host bounds max_ctx accordingly
// (Attention::llvmpipe_max_ctx, tens of thousands of positions).

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    max_ctx: u32,
    scale: f32,
    // 0 = full causal attention; else the sliding window in positions.
    window: u32,
    _p1: u32,
    _p2: u32,
}

// Invocations per workgroup = positions per block (a multiple of 4).
override WG: u32 = 64u;
override WG4: u32 = WG / 4u;
// Position groups in step 3: WG / (d/4) when d/4 <= WG, else 1.
override G: u32 = 1u;
// vec4 output columns per invocation: ceil((d/4) / WG) when G == 1, else 1.
// An override so the loops over it unroll and `acc` stays in registers.
override DPT4: u32 = 1u;
// Deliberate bug for verify's self-tests (model::Faults): map query head h to
// KV head h % n_kv_heads instead of h / group. Never set in use.
override FAULT_GQA_MODULO: bool = false;
const MAX_DPT4: u32 = 4u;
// Largest head_dim / 4 (q is staged in workgroup memory).
const MAX_D4: u32 = 128u;
// Below any real score; exp(NEG - finite) is 0.
const NEG: f32 = -3.0e38;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> k_cache: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> v_cache: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>;

var<workgroup> q_sh: array<vec4<f32>, MAX_D4>;
var<workgroup> s_sh: array<vec4<f32>, WG4>;
var<workgroup> p_sh: array<f32, WG>;
var<workgroup> red: array<vec4<f32>, WG>;
var<workgroup> l_sh: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let idx = wg_linear(wid, nwg);
    // Workgroup-uniform: overshoot of the (possibly 2D) grid.
    if (idx >= step.n_tokens * p.n_heads) {
        return;
    }
    let t = idx / p.n_heads;
    let h = idx - t * p.n_heads;
    var kvh = h / (p.n_heads / p.n_kv_heads);
    if (FAULT_GQA_MODULO) {
        kvh = h % p.n_kv_heads;
    }
    let d4 = p.head_dim / 4u;
    let qbase = idx * d4;
    for (var i = lid; i < d4; i += WG) {
        q_sh[i] = q[qbase + i];
    }
    workgroupBarrier();

    // Causal: positions lo..=pos_offset+t, never past the cache; lo > 0 only
    // under a sliding window. Both are workgroup-uniform.
    let n = min(step.pos_offset + t + 1u, p.max_ctx);
    var lo = 0u;
    if (p.window > 0u && step.pos_offset + t + 1u > p.window) {
        lo = step.pos_offset + t + 1u - p.window;
    }
    let kvbase = kvh * p.max_ctx * d4;
    // This invocation's output column(s) and position group.
    let c = lid % d4;
    let g = lid / d4;
    let in_group = g < G;

    var m = NEG;
    var l = 0.0;
    var acc: array<vec4<f32>, MAX_DPT4>;
    for (var k = 0u; k < DPT4; k++) {
        acc[k] = vec4<f32>(0.0);
    }

    // The first block is the one holding lo (earlier blocks are never read).
    for (var start = lo - lo % WG; start < n; start += WG) {
        let j = start + lid;
        let valid = j >= lo && j < n;
        var sc = NEG;
        if (valid) {
            let kb = kvbase + j * d4;
            var qk = 0.0;
            for (var i = 0u; i < d4; i++) {
                qk += dot(q_sh[i], k_cache[kb + i]);
            }
            sc = qk * p.scale;
        }
        s_sh[lid / 4u][lid % 4u] = sc;
        workgroupBarrier();

        // Invalid positions hold NEG, which never wins the max.
        var mb4 = s_sh[0];
        for (var r = 1u; r < WG4; r++) {
            mb4 = max(mb4, s_sh[r]);
        }
        let m_new = max(m, max(max(mb4.x, mb4.y), max(mb4.z, mb4.w)));
        let corr = exp(m - m_new);
        p_sh[lid] = select(0.0, exp(sc - m_new), valid);
        workgroupBarrier();

        l *= corr;
        for (var k = 0u; k < DPT4; k++) {
            acc[k] *= corr;
        }
        if (in_group) {
            let cnt = min(WG, n - start);
            // Skip the leading positions before lo (their weights are 0): the
            // first r >= lo - start in this invocation's stride g, g + G, ...
            var r0 = g;
            if (lo > start + g) {
                r0 = g + (lo - start - g + G - 1u) / G * G;
            }
            for (var r = r0; r < cnt; r += G) {
                let pr = p_sh[r];
                l += pr;
                let vb = kvbase + (start + r) * d4;
                for (var k = 0u; k < DPT4; k++) {
                    let col = c + k * WG;
                    if (col < d4) {
                        acc[k] += pr * v_cache[vb + col];
                    }
                }
            }
        }
        m = m_new;
        // No barrier needed here: the next block writes s_sh (read above
        // before the second barrier) and p_sh only after its first barrier,
        // which every invocation reaches after finishing this block.
    }

    if (G == 1u) {
        // Active invocations own whole columns (and saw every position).
        for (var k = 0u; k < DPT4; k++) {
            let col = c + k * WG;
            if (in_group && col < d4) {
                out[qbase + col] = acc[k] / l;
            }
        }
        return;
    }
    // G > 1: DPT4 == 1 and d4 <= WG. Add the G partial sums of column c.
    red[lid] = acc[0];
    l_sh[lid] = l;
    workgroupBarrier();
    if (lid < d4) {
        var a = red[lid];
        var ls = l_sh[lid];
        for (var gg = 1u; gg < G; gg++) {
            a += red[gg * d4 + lid];
            ls += l_sh[gg * d4 + lid];
        }
        out[qbase + lid] = a / ls;
    }
}
