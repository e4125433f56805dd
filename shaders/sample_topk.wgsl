// Sampling candidates: every logit of row 0 whose value ranks among the
// `want` largest (ties at the threshold included), plus the raw logits of
// `n_extra` given ids (the repetition penalty's window). Only comparisons and
// copies: no arithmetic touches a logit, so the candidates are exactly the
// CPU's on every device (see src/ops/sample.rs for why they suffice).
//
// One workgroup: an MSB-first radix select (4 passes of 8 bits, histograms
// in workgroup atomics) finds the want-th largest key, then one pass writes
// every candidate at or above it. Keys order finite f32 as their values do
// (-0 and +0 tie); NaN and infinities are never candidates
// (the argmax's finiteness report stops generation at such a step).
// Prepended: `const WG: u32` and shaders/sample_keys.wgsl (`is_finite`,
// `gkey`: -0 and +0 tie).
//
// out: [0] candidates found (may exceed cap: then only cap were written and
// the caller falls back to the full row), [1] the threshold key,
// [2 + 2j], [3 + 2j] = id, logit bits of candidate j (any order),
// [2 + 2 cap + e] = logit bits of extra id e.

struct Params {
    vocab: u32,
    want: u32,
    n_extra: u32,
    cap: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> extra: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> n_out: atomic<u32>;
var<workgroup> s_prefix: u32;
var<workgroup> s_want: u32;
var<workgroup> s_all: u32;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    if (lid == 0u) {
        s_prefix = 0u;
        s_want = max(p.want, 1u);
        s_all = 0u;
        atomicStore(&n_out, 0u);
    }
    for (var d = 0u; d < 4u; d += 1u) {
        let shift = 24u - 8u * d;
        // the bits decided by earlier passes (none in the first)
        let hi_mask = select(0xffffffffu << ((shift + 8u) & 31u), 0u, d == 0u);
        for (var b = lid; b < 256u; b += WG) {
            atomicStore(&hist[b], 0u);
        }
        workgroupBarrier();
        let prefix = s_prefix;
        for (var i = lid; i < p.vocab; i += WG) {
            let b = bitcast<u32>(logits[i]);
            if (is_finite(b)) {
                let k = gkey(b);
                if ((k & hi_mask) == prefix) {
                    atomicAdd(&hist[(k >> shift) & 255u], 1u);
                }
            }
        }
        workgroupBarrier();
        if (lid == 0u) {
            let want = s_want;
            var acc = 0u;
            var digit = 0u;
            var found = false;
            for (var b = 255; b >= 0; b -= 1) {
                let c = atomicLoad(&hist[u32(b)]);
                if (acc + c >= want) {
                    digit = u32(b);
                    found = true;
                    break;
                }
                acc += c;
            }
            if (found) {
                s_want = want - acc;
                s_prefix = prefix | (digit << shift);
            } else {
                // fewer finite logits than wanted: every finite one
                s_all = 1u;
            }
        }
        workgroupBarrier();
    }
    let thr = select(s_prefix, 0u, s_all != 0u);
    for (var i = lid; i < p.vocab; i += WG) {
        let b = bitcast<u32>(logits[i]);
        if (is_finite(b) && gkey(b) >= thr) {
            let slot = atomicAdd(&n_out, 1u);
            if (slot < p.cap) {
                out[2u + 2u * slot] = i;
                out[3u + 2u * slot] = b;
            }
        }
    }
    for (var e = lid; e < p.n_extra; e += WG) {
        let id = min(extra[e], p.vocab - 1u);
        out[2u + 2u * p.cap + e] = bitcast<u32>(logits[id]);
    }
    workgroupBarrier();
    if (lid == 0u) {
        out[0] = atomicLoad(&n_out);
        out[1] = thr;
    }
}
