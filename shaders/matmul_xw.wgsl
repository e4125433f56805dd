// Generic activations / weight bindings for any k: x [n_tokens, k] f32 and the
// weight chunk [rows, k] as array<u32>. With bf16 and odd k a row can start in
// the high half of a word: element e of the chunk lives in word e >> 1.

@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<u32>;

// Element e of the weight chunk (row-major, chunk-relative).
fn load_w(e: u32) -> f32 {
    if (W_BF16) {
        return bf16_at(w[e >> 1u], e);
    }
    return bitcast<f32>(w[e]);
}

// Full dot product of x row t with weight row r by one invocation, two
// independent accumulators so two loads are in flight.
fn row_dot(t: u32, r: u32) -> f32 {
    let k = p.k;
    let xb = t * k;
    var a0 = 0.0;
    var a1 = 0.0;
    if (W_BF16) {
        var e = r * k;
        let end = e + k;
        var j = xb;
        // a row starting in the high half of a word (odd k, odd row)
        if ((e & 1u) == 1u) {
            a0 += bf16_hi(w[e >> 1u]) * x[j];
            e += 1u;
            j += 1u;
        }
        loop {
            if (e + 1u >= end) {
                break;
            }
            let wd = w[e >> 1u];
            a0 += bf16_lo(wd) * x[j];
            a1 += bf16_hi(wd) * x[j + 1u];
            e += 2u;
            j += 2u;
        }
        if (e < end) {
            a0 += bf16_lo(w[e >> 1u]) * x[j];
        }
    } else {
        let wb = r * k;
        var i = 0u;
        loop {
            if (i + 1u >= k) {
                break;
            }
            a0 += bitcast<f32>(w[wb + i]) * x[xb + i];
            a1 += bitcast<f32>(w[wb + i + 1u]) * x[xb + i + 1u];
            i += 2u;
        }
        if (i < k) {
            a0 += bitcast<f32>(w[wb + i]) * x[xb + i];
        }
    }
    return a0 + a1;
}

// 4 rows x TB tokens by one invocation (see matmul_xw_vec.wgsl); the
// generic path simply runs the dot products one after the other.
fn rows_dot4(t0: u32, r: vec4<u32>) -> array<vec4<f32>, TB> {
    var acc: array<vec4<f32>, TB>;
    for (var i = 0u; i < TB; i++) {
        let t = min(t0 + i, step.n_tokens - 1u);
        acc[i] = vec4<f32>(row_dot(t, r.x), row_dot(t, r.y), row_dot(t, r.z), row_dot(t, r.w));
    }
    return acc;
}

// Partial dot product over elements lane, lane + lanes, ... of the row (one
// lane of a workgroup sharing the row).
fn row_part(t: u32, r: u32, lane: u32, lanes: u32) -> f32 {
    let xb = t * p.k;
    let wb = r * p.k;
    var a = 0.0;
    for (var i = lane; i < p.k; i += lanes) {
        a += load_w(wb + i) * x[xb + i];
    }
    return a;
}

// row_part for TB token rows t0 .. t0+TB-1 (clamped to the last token; the
// caller drops those): each weight element is loaded once for all of them,
// each token's sum in row_part's order (see matmul_xw_vec.wgsl).
fn rows_part(t0: u32, r: u32, lane: u32, lanes: u32) -> array<f32, TB> {
    let wb = r * p.k;
    var xb: array<u32, TB>;
    var a: array<f32, TB>;
    for (var i = 0u; i < TB; i++) {
        xb[i] = min(t0 + i, step.n_tokens - 1u) * p.k;
        a[i] = 0.0;
    }
    for (var e = lane; e < p.k; e += lanes) {
        let wv = load_w(wb + e);
        for (var i = 0u; i < TB; i++) {
            a[i] += wv * x[xb[i] + e];
        }
    }
    return a;
}
