// Prefill matmul y[t, n] = x[t, :] · W[n, :] (+ b), tiled in workgroup memory
// and register-tiled: a workgroup computes a BM x BN block of outputs (tokens
// x weight rows), each invocation a TM x TN sub-block, stepping over k in
// slabs of BK staged in workgroup memory (k-major, so the inner loop reads TM
// and TN consecutive floats).
// Prepended: `const BM, BN, BK, TM, TN: u32`, matmul_common.wgsl, the x/W
// bindings and the slab loads `stage_x`, `stage_w`, by k (src/ops/matmul.rs,
// `SlabLoads`): for k % 8 == 0 matmul_tile_vec.wgsl (x and W bound as vec4;
// one load = 4 elements of x, 8 of a bf16 weight); else matmul_xw.wgsl's
// generic bindings and matmul_tile_any.wgsl (bf16 with even k: one u32 = 2
// elements per load, as every row starts on a word; odd k or f32: element
// loads). Either way the
// slabs hold the same f32 values, so the sums below, and the outputs, are
// the same bits. Workgroup g covers token tile g / ncol, row tile g % ncol.
//
// Summation (issue #14): blocked, the blocks summed with compensation. Each
// output's k products are summed SUB = min(BK, 8) at a time into a fresh
// partial (a multiply-add chain the compiler may fuse), and the k/SUB partials
// are added to the running total with Knuth's TwoSum, the rounding error of
// every add kept in a second register (cmp) and added once at the end. A
// recursive sum of n products has the worst-case bound ~n·u·Σ|x_i w_i|
// (u = 2^-24); this order has ~(SUB + 2)·u·Σ|x_i w_i| + O(k·u²): 10·u for any
// k, instead of 576·u (SmolLM2's k) or 4864·u (Qwen2.5's down_proj). Cost:
// 2·TM·TN more registers and 6 flops per output per SUB multiply-adds. On a
// real GPU this kernel is bound by workgroup-memory loads (TM + TN per TM·TN
// multiply-adds) and barriers, leaving ALU slack for those flops; on lavapipe
// see BENCHMARKS.md. TwoSum is common.wgsl's two_sum, whose opaque zero keeps
// a reassociating compiler (lavapipe's) from folding the error term to 0 (it
// did, before: the compensation was silently lost).

// With DOT2 (a host constant; issue #14, opt-in by tensor role, see
// ARCHITECTURE.md "Dot2 for chosen projections"): Ogita-Rump-Oishi's Dot2
// instead. Every product is split exactly (bf16_split: x = h + l, w·h and
// w·l exact for a bf16 w; two_prod for f32 weights), the high parts added
// to acc with TwoSum, the low parts and every TwoSum error into cmp, and
// the bias added by TwoSum in store_dot2 before the one rounding:
// |y - exact| <= u·|exact| + γ_k²·(Σ|x_i w_i| + |b|), i.e. within about one
// rounding of the exact x·Wᵀ + b however much the sum cancels. Cost per
// product: 2 multiplies, one TwoSum (6 flops, 2 xors), 2 adds; one mask and
// one subtract per x element per kk, shared by TN rows.

const NT: u32 = (BM / TM) * (BN / TN);
// Products per partial sum.
const SUB: u32 = min(BK, 8u);

var<workgroup> xs: array<f32, BK * BM>;
var<workgroup> ws: array<f32, BK * BN>;

@compute @workgroup_size(NT)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = wg_linear(wid, nwg);
    let ncol = (p.rows + BN - 1u) / BN;
    let m0 = (g / ncol) * BM;
    let n0 = (g % ncol) * BN;
    // Uniform across the workgroup.
    if (m0 >= step.n_tokens) {
        return;
    }
    let k = p.k;
    let ntok = step.n_tokens;
    let zero = step.zero;
    let tx = lid % (BN / TN);
    let ty = lid / (BN / TN);
    var acc: array<f32, TM * TN>;
    var cmp: array<f32, TM * TN>;
    for (var i = 0u; i < TM * TN; i++) {
        acc[i] = 0.0;
        cmp[i] = 0.0;
    }
    for (var k0 = 0u; k0 < k; k0 += BK) {
        // The slabs of x and W (matmul_tile_any.wgsl or matmul_tile_vec.wgsl).
        stage_x(m0, k0, lid);
        stage_w(n0, k0, lid);
        workgroupBarrier();
        // Blocked summation: each run of SUB = min(BK, 8) products goes into a
        // fresh partial, added to the total with TwoSum (see the header).
        for (var k1 = 0u; k1 < BK; k1 += SUB) {
            var part: array<f32, TM * TN>;
            for (var i = 0u; i < TM * TN; i++) {
                part[i] = 0.0;
            }
            for (var kk = k1; kk < min(k1 + SUB, BK); kk++) {
                var a: array<f32, TM>;
                var b: array<f32, TN>;
                for (var i = 0u; i < TM; i++) {
                    a[i] = xs[kk * BM + ty * TM + i];
                }
                for (var j = 0u; j < TN; j++) {
                    b[j] = ws[kk * BN + tx * TN + j];
                }
                if (DOT2) {
                    // Dot2: every product exact (bf16_split / two_prod)
                    // and TwoSum'd into acc, the errors into cmp.
                    for (var i = 0u; i < TM; i++) {
                        let xa = bf16_split(a[i]);
                        for (var j = 0u; j < TN; j++) {
                            var pr: TwoSum;
                            if (W_BF16) {
                                pr = TwoSum(xa.s * b[j], xa.e * b[j]);
                            } else {
                                pr = two_prod(a[i], b[j], zero);
                            }
                            let ts = two_sum(acc[i * TN + j], pr.s, zero);
                            acc[i * TN + j] = ts.s;
                            cmp[i * TN + j] += ts.e + pr.e;
                        }
                    }
                    continue;
                }
                for (var i = 0u; i < TM; i++) {
                    for (var j = 0u; j < TN; j++) {
                        part[i * TN + j] += a[i] * b[j];
                    }
                }
            }
            // acc += part with the rounding error kept in cmp (TwoSum).
            for (var i = 0u; i < TM * TN && !DOT2; i++) {
                let ts = two_sum(acc[i], part[i], zero);
                cmp[i] += ts.e;
                acc[i] = ts.s;
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < TM; i++) {
        let tok = m0 + ty * TM + i;
        for (var j = 0u; j < TN; j++) {
            let r = n0 + tx * TN + j;
            if (tok < ntok && r < p.rows) {
                if (DOT2) {
                    store_dot2(tok, r, acc[i * TN + j], cmp[i * TN + j]);
                } else {
                    store(tok, r, acc[i * TN + j] + cmp[i * TN + j]);
                }
            }
        }
    }
}
