// The tiled matmul's slab loads (matmul.wgsl) over the generic bindings
// (matmul_xw.wgsl), for any k: slab k0 .. k0 + BK of BM tokens of x and of BN
// weight rows into workgroup memory, k-major, zero outside the data.
// Prepended: `const W_PAIRS: bool` (bf16 with even k: every row starts on a
// word boundary, so a slab row is read one u32, two elements, at a time).

// x: consecutive invocations read consecutive k of one token.
fn stage_x(m0: u32, k0: u32, lid: u32) {
    let k = p.k;
    for (var i = lid; i < BM * BK; i += NT) {
        let mm = i / BK;
        let kk = i % BK;
        let tok = m0 + mm;
        let gk = k0 + kk;
        var v = 0.0;
        if (tok < step.n_tokens && gk < k) {
            v = x[tok * k + gk];
        }
        xs[kk * BM + mm] = v;
    }
}

fn stage_w(n0: u32, k0: u32, lid: u32) {
    let k = p.k;
    if (W_BF16 && W_PAIRS) {
        for (var i = lid; i < BN * BK / 2u; i += NT) {
            let nn = i / (BK / 2u);
            let kk = 2u * (i % (BK / 2u));
            let row = n0 + nn;
            let gk = k0 + kk;
            var lo = 0.0;
            var hi = 0.0;
            // k even: gk < k implies gk + 1 < k
            if (row < p.rows && gk < k) {
                let wd = w[(row * k + gk) >> 1u];
                lo = bf16_lo(wd);
                hi = bf16_hi(wd);
            }
            ws[kk * BN + nn] = lo;
            ws[(kk + 1u) * BN + nn] = hi;
        }
    } else {
        for (var i = lid; i < BN * BK; i += NT) {
            let nn = i / BK;
            let kk = i % BK;
            let row = n0 + nn;
            let gk = k0 + kk;
            var v = 0.0;
            if (row < p.rows && gk < k) {
                v = load_w(row * k + gk);
            }
            ws[kk * BN + nn] = v;
        }
    }
}
