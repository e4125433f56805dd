// Causal grouped-query attention over a head-major KV cache, in f32.
//   q:        [n_tokens, n_heads * d]      (after RoPE)
//   k_cache:  [n_kv_heads, max_ctx, d]     (already holds this step's rows)
//   v_cache:  [n_kv_heads, max_ctx, d]
//   dst:      PARTIAL false: out [n_tokens, n_heads * d]
//             PARTIAL true:  per (token, head, split) D4 + 1 vec4: the split's
//             unnormalized sum acc = sum_j exp(s_j - m) v_j, then (m, l, 0, 0)
//             with l = sum_j exp(s_j - m); attention_combine.wgsl merges them.
// all read as vec4 (d % 4 == 0, checked on the host).
// Prepended by src/ops/attention.rs: kv_copy.rs's rows prelude,
// attention_common.wgsl (Params, the uniforms, row_range, n_splits) and
// attention_work.wgsl (the q/cache/output bindings, wg_work, NEG).
// Query token t sits at position p = row_pos(t) of KV slot row_slot(t)
// (kv_copy.rs's prelude: step.pos_offset + t of slot 0, or per-row positions
// and slots in a batched step; a slot's region is [n_kv_heads, max_ctx, d])
// and attends to cache positions 0..=p, or with a sliding window (p.window > 0) to the positions j
// with p - j < window, i.e. max(0, p + 1 - window)..=p (transformers'
// sliding_window_overlay: kv_idx > q_idx - sliding_window, AND causal).
// Query head h reads KV head h / (n_heads / n_kv_heads)
// (HF's repeat_kv: each KV head serves a contiguous group of query heads).
// out = softmax(q.K^T * scale) V with the host's scale (d^-0.5, or e.g.
// Gemma's query_pre_attn_scalar^-0.5), softmax in f32 with max subtraction,
// computed online (flash style) over blocks of BLK = WG * PPI positions.
//
// One workgroup per (token, KV head, chunk of HPW query heads of its group,
// KV split). GQA: every K and V row is loaded once for the HPW query heads
// that read it (HPW divides the group size; the whole group when it fits),
// not once per query head. Flash-decoding: with SPLITS > 1 the blocks of a
// query's range are cut into SPLITS contiguous runs, one workgroup each, so a
// decode step (one token, few KV heads) still fills the device; each writes
// its partial (acc, m, l) and a second small pass combines them. The number
// of splits used is n_splits(lo, n) (attention_common.wgsl: at least
// MINU blocks per split, at most SPLITS), from the row's own KV length at run
// time; the dispatch is always SPLITS workgroups per row. Prefill
// (many tokens) runs SPLITS = 1 with PARTIAL false and writes out directly.
//
// Per block of BLK positions:
//   1. invocation l scores positions start + l + WG u (u < PPI) for every
//      head of the chunk (one K row load, HPW dot products) and keeps its own
//      per-head max,
//   2. every invocation scans the WG per-invocation maxima of each head for
//      the block max (no reduction tree: 2 barriers per block in total, and
//      PPI positions per scanned entry), rescales its running state and
//      publishes exp(score - max) for its positions,
//   3. invocation l = c + D4 * g accumulates vec4 column(s) c of the output
//      of every head over the block positions g, g + G, g + 2G, ... (G
//      position groups, so every invocation works even when d/4 < WG); one V
//      row load serves HPW heads.
// All invocations share the running max, so at the end the G partial sums
// (and their softmax denominators) are simply added.
//
// Windowed queries start at the block holding their first visible position:
// blocks wholly before the window are skipped, not masked, so a decode step
// reads about `window` K/V rows whatever the context length. (Only the
// leading partial block is masked.)
//
// Precision: a score is d/4 vec4 dots added with TwoSum (common.wgsl's
// two_sum, whose opaque zero survives a reassociating compiler), so it is
// (qk, qe) with qk + qe exact but for the vec4 dots' own roundings: error
// ~3u·Σ|q_i k_i| (u = 2^-24), where the running f32 sum it replaces had
// ~(d/4 + 2)u·Σ|q_i k_i|. The error term joins the exp argument,
// exp((qk·scale - max) + qe·scale), so a weight is not limited by the
// rounding of its score to f32 either: exp turns a score's absolute error
// into the weight's relative error, and scores reach the hundreds (Qwen2.5,
// one ulp there = 3e-5; issue #14, BENCHMARKS.md "Attention scores as (hi,
// lo)"). scale is applied to both halves (exact for a power of two, as at
// d = 64 and 256; else one more rounding of ~u·|score|). The max is taken
// over qk alone: an exp argument can then exceed 0 by ~u·|qe|, harmless.
// Cost: 6 flops and 2 xors per vec4 dot, one add per weight. The running
// max keeps every exp argument <= 0 (to that ~u), so exp never overflows and
// each weight carries the relative error of its score times |score - max|;
// the sums l and acc are f32 running sums over
// at most BLK / G positions per invocation, then G partials, then SPLITS
// partials in the combine: a blocked (pairwise-like) order whose rounding
// grows like the number of terms per level, not the total length.
//
// Loop budget: llvmpipe (lavapipe) silently ends a shader's loops after 65535
// iterations in total per invocation, so every loop here runs per block of
// BLK positions (the position loops at most PPI or BLK / G deep), and the
// host bounds max_ctx accordingly (Attention::llvmpipe_max_ctx).

// Invocations per workgroup (a multiple of 4).
override WG: u32 = 64u;
// Positions each invocation scores per block; BLK = WG * PPI.
override PPI: u32 = 1u;
override BLK: u32 = 64u;
// Query heads per workgroup (divides n_heads / n_kv_heads; <= MAXH).
override HPW: u32 = 1u;
// head_dim / 4 (the kernel is compiled per head_dim).
override D4: u32 = 16u;
// Position groups in step 3: WG / D4 when D4 <= WG, else 1.
override G: u32 = 1u;
// vec4 output columns per invocation: ceil(D4 / WG) when G == 1, else 1.
override DPT4: u32 = 1u;
// KV splits per (token, KV head, head chunk).
override SPLITS: u32 = 1u;
// Write partials (acc, m, l) per split instead of the normalized output.
override PARTIAL: bool = false;
// Workgroup array sizes (computed on the host, see Attention::build).
override QSH: u32 = 16u;   // HPW * D4
override MX4: u32 = 16u;   // HPW * WG / 4
override PSH: u32 = 64u;   // HPW * BLK
override RED: u32 = 64u;   // HPW * WG when G > 1, else 1
const MAXH: u32 = 8u;
const MAX_PPI: u32 = 8u;
const MAX_DPT4: u32 = 4u;

var<workgroup> q_sh: array<vec4<f32>, QSH>;
var<workgroup> mx_sh: array<vec4<f32>, MX4>;
var<workgroup> p_sh: array<f32, PSH>;
var<workgroup> red: array<vec4<f32>, RED>;
var<workgroup> l_sh: array<f32, RED>;

fn max4(v: vec4<f32>) -> f32 {
    return max(max(v.x, v.y), max(v.z, v.w));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    // Workgroup-uniform: a token per token block (attention_work.wgsl).
    let wk = wg_work(wg_linear(wid, nwg), step.n_tokens);
    if (!wk.ok) {
        return;
    }
    let sp = wk.sp;
    let kvh = wk.kvh;
    let t = wk.tb;
    // Causal: positions lo..=pos_offset+t, never past the cache; lo > 0 only
    // under a sliding window. Both are workgroup-uniform. The split count
    // follows the row's own length (n_splits, shared with the combine); the
    // workgroups past it return here, before any barrier.
    let rr = row_range(t);
    let lo = rr.x;
    let n = rr.y;
    let ns = n_splits(lo, n);
    if (sp >= ns) {
        return;
    }
    let hstride = wk.hstride;
    let h0 = wk.h0;
    let row0 = t * p.n_heads;
    for (var i = lid; i < HPW * D4; i += WG) {
        let r = i / D4;
        q_sh[i] = q[(row0 + h0 + r * hstride) * D4 + i % D4];
    }
    workgroupBarrier();

    // Blocks b0..b1 hold lo..n (earlier blocks are never read); this split
    // takes its run of them. Every block of the range holds a visible
    // position, so a non-empty split has a finite max.
    let b0 = lo / BLK;
    let nb = (n + BLK - 1u) / BLK - b0;
    let per = (nb + ns - 1u) / ns;
    let sb0 = b0 + min(sp * per, nb);
    let sb1 = b0 + min(sp * per + per, nb);
    let kvbase = (row_slot(t) * p.n_kv_heads + kvh) * p.max_ctx * D4;
    // This invocation's output column(s) and position group.
    let c = lid % D4;
    let g = lid / D4;
    let in_group = g < G;

    var m: array<f32, MAXH>;
    var l: array<f32, MAXH>;
    var acc: array<vec4<f32>, 32>; // MAXH * MAX_DPT4
    for (var r = 0u; r < HPW; r++) {
        m[r] = NEG;
        l[r] = 0.0;
        for (var k = 0u; k < DPT4; k++) {
            acc[r * MAX_DPT4 + k] = vec4<f32>(0.0);
        }
    }

    for (var b = sb0; b < sb1; b++) {
        let start = b * BLK;
        var s: array<f32, 64>; // MAX_PPI * MAXH
        var se: array<f32, 64>; // the scores' error terms, as s
        var lm: array<f32, MAXH>;
        for (var r = 0u; r < HPW; r++) {
            lm[r] = NEG;
        }
        for (var u = 0u; u < PPI; u++) {
            let j = start + u * WG + lid;
            var qk: array<f32, MAXH>;
            var qe: array<f32, MAXH>;
            for (var r = 0u; r < HPW; r++) {
                qk[r] = 0.0;
                qe[r] = 0.0;
            }
            if (j >= lo && j < n) {
                let kb = kvbase + j * D4;
                for (var i = 0u; i < D4; i++) {
                    let kv = k_cache[kb + i];
                    for (var r = 0u; r < HPW; r++) {
                        // qk += dot, the rounding error kept in qe (TwoSum;
                        // see Precision above)
                        let ts = two_sum(qk[r], dot(q_sh[r * D4 + i], kv), step.zero);
                        qk[r] = ts.s;
                        qe[r] += ts.e;
                    }
                }
                for (var r = 0u; r < HPW; r++) {
                    qk[r] *= p.scale;
                    qe[r] *= p.scale;
                    lm[r] = max(lm[r], qk[r]);
                }
            } else {
                for (var r = 0u; r < HPW; r++) {
                    qk[r] = NEG;
                }
            }
            for (var r = 0u; r < HPW; r++) {
                s[u * MAXH + r] = qk[r];
                se[u * MAXH + r] = qe[r];
            }
        }
        for (var r = 0u; r < HPW; r++) {
            let e = r * WG + lid;
            mx_sh[e / 4u][e % 4u] = lm[r];
        }
        workgroupBarrier();

        // Invalid positions hold NEG, which never wins the max.
        var corr: array<f32, MAXH>;
        var mn: array<f32, MAXH>;
        for (var r = 0u; r < HPW; r++) {
            var mb4 = mx_sh[r * (WG / 4u)];
            for (var e = 1u; e < WG / 4u; e++) {
                mb4 = max(mb4, mx_sh[r * (WG / 4u) + e]);
            }
            mn[r] = max(m[r], max4(mb4));
            corr[r] = exp_f32(m[r] - mn[r]);
        }
        for (var u = 0u; u < PPI; u++) {
            let jr = u * WG + lid;
            let valid = start + jr >= lo && start + jr < n;
            for (var r = 0u; r < HPW; r++) {
                p_sh[r * BLK + jr] = select(0.0, exp_f32((s[u * MAXH + r] - mn[r]) + se[u * MAXH + r]), valid);
            }
        }
        workgroupBarrier();

        for (var r = 0u; r < HPW; r++) {
            l[r] *= corr[r];
            for (var k = 0u; k < DPT4; k++) {
                acc[r * MAX_DPT4 + k] *= corr[r];
            }
            m[r] = mn[r];
        }
        if (in_group) {
            let cnt = min(BLK, n - start);
            // Skip the leading positions before lo (their weights are 0): the
            // first jr >= lo - start in this invocation's stride g, g + G, ...
            var r0 = g;
            if (lo > start + g) {
                r0 = g + (lo - start - g + G - 1u) / G * G;
            }
            for (var jr = r0; jr < cnt; jr += G) {
                let vb = kvbase + (start + jr) * D4;
                for (var k = 0u; k < DPT4; k++) {
                    let col = c + k * WG;
                    if (col < D4) {
                        let v = v_cache[vb + col];
                        for (var r = 0u; r < HPW; r++) {
                            acc[r * MAX_DPT4 + k] += p_sh[r * BLK + jr] * v;
                        }
                    }
                }
                for (var r = 0u; r < HPW; r++) {
                    l[r] += p_sh[r * BLK + jr];
                }
            }
        }
        // No barrier needed here: the next block writes mx_sh (read above
        // before the second barrier) and p_sh only after its first barrier,
        // which every invocation reaches after finishing this block.
    }

    if (G == 1u) {
        // Active invocations own whole columns (and saw every position).
        if (in_group) {
            for (var r = 0u; r < HPW; r++) {
                let hrow = row0 + h0 + r * hstride;
                for (var k = 0u; k < DPT4; k++) {
                    let col = c + k * WG;
                    if (col < D4) {
                        put(hrow, sp, col, acc[r * MAX_DPT4 + k], m[r], l[r]);
                    }
                }
            }
        }
        return;
    }
    // G > 1: DPT4 == 1 and D4 <= WG. Add the G partial sums of column c.
    for (var r = 0u; r < HPW; r++) {
        red[r * WG + lid] = acc[r * MAX_DPT4];
        l_sh[r * WG + lid] = l[r];
    }
    workgroupBarrier();
    if (lid < D4) {
        for (var r = 0u; r < HPW; r++) {
            var a = red[r * WG + lid];
            var ls = l_sh[r * WG + lid];
            for (var gg = 1u; gg < G; gg++) {
                a += red[r * WG + gg * D4 + lid];
                ls += l_sh[r * WG + gg * D4 + lid];
            }
            put(row0 + h0 + r * hstride, sp, lid, a, m[r], ls);
        }
    }
}

// Column col of query row hrow (= token * n_heads + head): the normalized
// output, or split sp's partial.
fn put(hrow: u32, sp: u32, col: u32, a: vec4<f32>, m: f32, l: f32) {
    if (!PARTIAL) {
        dst[hrow * D4 + col] = a / l;
        return;
    }
    let base = (hrow * SPLITS + sp) * (D4 + 1u);
    dst[base + col] = a;
    if (col == 0u) {
        dst[base + D4] = vec4<f32>(m, l, 0.0, 0.0);
    }
}
