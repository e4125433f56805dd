// Prefill matmul for CPU-type adapters (the CPU-device profile): invocations
// over output rows, no workgroup memory and no barriers, each invocation a
// register block of R = 4·RQ weight rows x TB consecutive tokens.
// Prepended: `const WG, TB, RQ: u32`, matmul_common.wgsl and
// matmul_xw_vec.wgsl (k % 8 == 0 only; other k take gemv_rows.wgsl). The
// host (ops::matmul::rowblk_source) writes the per-(token, row quad)
// statements out at the //@ markers, so every sum lives in a named variable:
// no private array is indexed (lavapipe lowers an indexed private array to
// scratch memory or to if-ladders) and the only loops are over k.
// Workgroup g covers token block g / per_blk and a block of R·WG rows; lane
// `lid` owns rows r0 + m·WG, m = 0 .. R-1 (neighbouring lanes, neighbouring
// rows, as in gemv_rows.wgsl).
//
// Why this shape on lavapipe: a workgroup runs as 8-wide SIMD on one core and
// every storage load whose address differs per lane is a loop of scalar loads
// (gallivm `emit_load_mem`), so the cost is the words loaded per lane per
// multiply-add. Per group of 8 elements an invocation loads R weight words
// (vec4<u32> = 8 bf16, widened once into two vec4<f32> and used for all TB
// tokens) and 2·TB x words (each used for all R rows), for 8·R·TB
// multiply-adds: R = 4, TB = 4 (gemv_rows.wgsl) is 12 loads per 128;
// R = 8, TB = 8 is 24 per 512. Registers are free there (spills land in L1).
//
// Summation: every output is summed in exactly rows_dot4's order (each group
// of 8 products as two 4-wide dots and their sum, 4 group sums into a fresh
// partial, the partials added with two_sum4 and the compensation added at the
// end), so an output has the error bound of the precision table's row GEMV and
// the same bits as the decode GEMV gives that token alone. With Dot2
// (ops::matmul::rowblk_source_with, opt-in by tensor role) each (token, row)
// is instead a vec4 of TwoSum'd exact products (d2step) folded at the end
// (d2fold, store_dot2): within about one rounding of the exact x·Wᵀ + b,
// and no longer the decode GEMV's bits.

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = wg_linear(wid, nwg);
    let span = 4u * RQ * WG;
    let per_blk = (p.rows + span - 1u) / span;
    let t0 = (g / per_blk) * TB;
    let r0 = (g % per_blk) * span + lid;
    if (t0 >= step.n_tokens || r0 >= p.rows) {
        return;
    }
    let ng = p.k / 8u;
    let zero = step.zero;
    let last = vec4<u32>(p.rows - 1u);
    let lt = step.n_tokens - 1u;
    // Per row quad q: rows rq{q} = r0 + (4q + j)·WG (rows past the end
    // recompute the last row and are not stored), their word offsets wb{q}.
    // Per token i: x offset xb{i} (tokens past the end recompute the last).
    // acc/cmp/part per (token, quad): a{i}_{q}, c{i}_{q}, s{i}_{q}.
//@INIT
    // Runs of 4 groups (32 products) into a fresh partial, the partials
    // added with TwoSum (rows_dot4's order).
    for (var g0 = 0u; g0 < ng; g0 += 4u) {
//@ZERO
        for (var gg = g0; gg < min(g0 + 4u, ng); gg++) {
            // each weight word loaded and widened once for the TB tokens
//@BODY
        }
//@FOLD
    }
//@OUT
}
