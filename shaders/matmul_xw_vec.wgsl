// Fast activations / weight bindings for k % 8 == 0: rows are whole groups of
// 8 elements, read as vec4<u32> (8 bf16, or half of 8 f32) and two vec4<f32>
// of x. Group g of the chunk = elements 8g .. 8g+7.

@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;

// dot(weight group gw, x group gx) over 8 elements.
fn dot8(gw: u32, gx: u32) -> f32 {
    let wv = w8(gw);
    let xv = x8(gx);
    return dot(wv[0], xv[0]) + dot(wv[1], xv[1]);
}

// Weight group gw as two vec4<f32> (a, b) and x group gx as two vec4<f32>
// (c, d) paired so that the group's dot product is dot(a, c) + dot(b, d):
// bf16 words hold elements (2i, 2i+1) as (low, high), so a = even elements,
// b = odd ones, and x is split the same way; f32 is in order.
fn w8(gw: u32) -> array<vec4<f32>, 2> {
    if (W_BF16) {
        let q = w[gw];
        return array<vec4<f32>, 2>(bitcast<vec4<f32>>(q << vec4<u32>(16u)),
                                   bitcast<vec4<f32>>(q & vec4<u32>(0xffff0000u)));
    }
    return array<vec4<f32>, 2>(bitcast<vec4<f32>>(w[2u * gw]), bitcast<vec4<f32>>(w[2u * gw + 1u]));
}
fn x8(gx: u32) -> array<vec4<f32>, 2> {
    let xa = x[2u * gx];
    let xb = x[2u * gx + 1u];
    if (W_BF16) {
        return array<vec4<f32>, 2>(vec4<f32>(xa.x, xa.z, xb.x, xb.z), vec4<f32>(xa.y, xa.w, xb.y, xb.w));
    }
    return array<vec4<f32>, 2>(xa, xb);
}

// Dot products of 4 weight rows r.x .. r.w with TB token rows t0 .. t0+TB-1
// (token indices clamped to the last token; the caller drops those) by one
// invocation: each x load is shared by 4 rows, each weight load by TB tokens.
// On a CPU-type adapter every lane of the SIMD workgroup is a different row,
// so each load is a gather; sharing them is what brings this near the
// device's streaming read rate (4 rows: ~2x faster than 1; 8: slower).
// Summation (issue #14): each group of 8 products is summed as two 4-wide
// dots and their sum (depth <= 5), gb = 4 group sums are added in a fresh
// partial, and the k/32 partials are accumulated with Knuth's TwoSum, the
// rounding error of every add kept in `cmp` and added at the end. Error bound
// ~(5 + 4 + 2)·u·Σ|x_i w_i| + O(k·u²) (u = 2^-24), against (k/8 + 5)·u for the
// plain running sum (77·u at k = 576, 613·u at k = 4864). Cost: 2·TB more vec4
// registers and 7 flops + 2 xors per 4 groups per row, against 32
// multiply-adds and 8-16 128-bit loads; the kernel is bound by the loads (the
// gathers across lanes), so the flops are hidden (BENCHMARKS.md). On a GPU the
// same holds more so: a decode GEMV is bound by DRAM bandwidth. TwoSum is
// common.wgsl's two_sum4, whose opaque zero keeps a reassociating compiler
// (lavapipe's) from folding the error term to 0 (it did, before: the
// compensation was silently lost).
fn rows_dot4(t0: u32, r: vec4<u32>) -> array<vec4<f32>, TB> {
    let ng = p.k / 8u;
    let wb = r * ng;
    let zero = step.zero;
    // Groups of 8 products per TwoSum'd partial (a local, not a module
    // constant: ops::fused copies this file under other names).
    let gb = 4u;
    var xb: array<u32, TB>;
    var acc: array<vec4<f32>, TB>;
    var cmp: array<vec4<f32>, TB>;
    for (var i = 0u; i < TB; i++) {
        xb[i] = min(t0 + i, step.n_tokens - 1u) * ng;
        acc[i] = vec4<f32>(0.0);
        cmp[i] = vec4<f32>(0.0);
    }
    // Runs of gb groups (32 products) into a fresh partial, the partials
    // added with TwoSum: a quarter of the TwoSum work of one per group.
    for (var g0 = 0u; g0 < ng; g0 += gb) {
        var part: array<vec4<f32>, TB>;
        for (var i = 0u; i < TB; i++) {
            part[i] = vec4<f32>(0.0);
        }
        for (var g = g0; g < min(g0 + gb, ng); g++) {
            let w0 = w8(wb.x + g);
            let w1 = w8(wb.y + g);
            let w2 = w8(wb.z + g);
            let w3 = w8(wb.w + g);
            for (var i = 0u; i < TB; i++) {
                let xv = x8(xb[i] + g);
                part[i] += vec4<f32>(dot(w0[0], xv[0]) + dot(w0[1], xv[1]),
                                     dot(w1[0], xv[0]) + dot(w1[1], xv[1]),
                                     dot(w2[0], xv[0]) + dot(w2[1], xv[1]),
                                     dot(w3[0], xv[0]) + dot(w3[1], xv[1]));
            }
        }
        for (var i = 0u; i < TB; i++) {
            // acc += part, the rounding error kept in cmp (TwoSum)
            let ts = two_sum4(acc[i], part[i], zero);
            cmp[i] += ts.e;
            acc[i] = ts.s;
        }
    }
    for (var i = 0u; i < TB; i++) {
        acc[i] += cmp[i];
    }
    return acc;
}

// Partial dot product over groups lane, lane + lanes, ... of the row;
// neighbouring lanes read neighbouring 16-byte words.
fn row_part(t: u32, r: u32, lane: u32, lanes: u32) -> f32 {
    let ng = p.k / 8u;
    let wb = r * ng;
    let xb = t * ng;
    var a = 0.0;
    for (var g = lane; g < ng; g += lanes) {
        a += dot8(wb + g, xb + g);
    }
    return a;
}

// row_part for TB token rows t0 .. t0+TB-1 (clamped to the last token; the
// caller drops those): each weight group is loaded once for all of them, and
// each token's sum takes exactly row_part's operations in row_part's order,
// so a token's result does not depend on TB or on its place in the block.
fn rows_part(t0: u32, r: u32, lane: u32, lanes: u32) -> array<f32, TB> {
    let ng = p.k / 8u;
    let wb = r * ng;
    var xb: array<u32, TB>;
    var a: array<f32, TB>;
    for (var i = 0u; i < TB; i++) {
        xb[i] = min(t0 + i, step.n_tokens - 1u) * ng;
        a[i] = 0.0;
    }
    for (var g = lane; g < ng; g += lanes) {
        let wv = w8(wb + g);
        for (var i = 0u; i < TB; i++) {
            let xv = x8(xb[i] + g);
            a[i] += dot(wv[0], xv[0]) + dot(wv[1], xv[1]);
        }
    }
    return a;
}
