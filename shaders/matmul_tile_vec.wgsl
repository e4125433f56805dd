// The tiled matmul's x/W bindings and slab loads (matmul.wgsl) as vec4, for
// k % 8 == 0 (and BK % 8 == 0, host-checked): a slab row of BK elements is
// whole vec4 of x and whole 8-element groups of the weight, each wholly
// inside or outside k, so one bounds check covers a load. The values written
// to workgroup memory, and where, are those of matmul_tile_any.wgsl (the
// same bf16 widening), so the sums are the same bits.
//
// Lanes: consecutive invocations take consecutive vec4 of one slab row (x:
// BK / 4 lanes per token, a bf16 weight: BK / 8 per row, f32: BK / 4), so a
// warp's loads are whole 16-byte pieces of contiguous row segments; each
// lane then writes its 4 or 8 values to workgroup memory k-major.

// x [n_tokens, k] f32 and the weight chunk [rows, k]: 8 bf16 (or 4 f32) per
// vec4<u32>.
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;

fn stage_x(m0: u32, k0: u32, lid: u32) {
    let k4 = p.k / 4u;
    for (var i = lid; i < BM * BK / 4u; i += NT) {
        let mm = i / (BK / 4u);
        let kk = 4u * (i % (BK / 4u));
        let tok = m0 + mm;
        let gk = k0 + kk;
        var v = vec4<f32>(0.0);
        if (tok < step.n_tokens && gk < p.k) {
            v = x[tok * k4 + gk / 4u];
        }
        xs[kk * BM + mm] = v.x;
        xs[(kk + 1u) * BM + mm] = v.y;
        xs[(kk + 2u) * BM + mm] = v.z;
        xs[(kk + 3u) * BM + mm] = v.w;
    }
}

fn stage_w(n0: u32, k0: u32, lid: u32) {
    let k = p.k;
    if (W_BF16) {
        // One vec4<u32> = 8 elements; word j holds elements 2j (low half)
        // and 2j + 1 (high half), widened as bf16_lo / bf16_hi do.
        for (var i = lid; i < BN * BK / 8u; i += NT) {
            let nn = i / (BK / 8u);
            let kk = 8u * (i % (BK / 8u));
            let row = n0 + nn;
            let gk = k0 + kk;
            var q = vec4<u32>(0u);
            if (row < p.rows && gk < k) {
                q = w[(row * k + gk) / 8u];
            }
            let lo = bitcast<vec4<f32>>(q << vec4<u32>(16u));
            let hi = bitcast<vec4<f32>>(q & vec4<u32>(0xffff0000u));
            ws[kk * BN + nn] = lo.x;
            ws[(kk + 1u) * BN + nn] = hi.x;
            ws[(kk + 2u) * BN + nn] = lo.y;
            ws[(kk + 3u) * BN + nn] = hi.y;
            ws[(kk + 4u) * BN + nn] = lo.z;
            ws[(kk + 5u) * BN + nn] = hi.z;
            ws[(kk + 6u) * BN + nn] = lo.w;
            ws[(kk + 7u) * BN + nn] = hi.w;
        }
    } else {
        // f32: one vec4<u32> = 4 elements' bits.
        for (var i = lid; i < BN * BK / 4u; i += NT) {
            let nn = i / (BK / 4u);
            let kk = 4u * (i % (BK / 4u));
            let row = n0 + nn;
            let gk = k0 + kk;
            var v = vec4<f32>(0.0);
            if (row < p.rows && gk < k) {
                v = bitcast<vec4<f32>>(w[(row * k + gk) / 4u]);
            }
            ws[kk * BN + nn] = v.x;
            ws[(kk + 1u) * BN + nn] = v.y;
            ws[(kk + 2u) * BN + nn] = v.z;
            ws[(kk + 3u) * BN + nn] = v.w;
        }
    }
}
