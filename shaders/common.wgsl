// Helpers prepended to every wgllm kernel (see src/gpu.rs).

// Per-step values shared by all kernels (binding 1). Mirrors `gpu::Step`.
struct Step {
    n_tokens: u32,
    pos_offset: u32,
    kv_len: u32,
    // Always 0 (gpu::Step::new), read at run time: the opaque zero of
    // two_sum below.
    zero: u32,
}

// bf16 -> f32 widening. Two bf16 values are packed per u32, element 2i in the
// low half and 2i+1 in the high half (little-endian order of the file bytes).
fn bf16_lo(w: u32) -> f32 {
    return bitcast<f32>(w << 16u);
}
fn bf16_hi(w: u32) -> f32 {
    return bitcast<f32>(w & 0xffff0000u);
}
// Element `e` of a packed bf16 array, given the u32 word holding it.
fn bf16_at(word: u32, e: u32) -> f32 {
    return select(bf16_lo(word), bf16_hi(word), (e & 1u) == 1u);
}

// Linear workgroup index for 1D or 2D grids (see Gpu::grid): x + y * X.
fn wg_linear(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// exp(x) within ~1 ulp in f32 (issue #14). The built-in exp is allowed
// 3 + 2|x| ulp by WGSL and lavapipe's is ~8 ulp at worst, 1.4 ulp on average
// (tests/precision.rs probes it), which made the SwiGLU activation the largest
// rounding source of the MLP. Cephes' expf: n = round(x / ln 2),
// r = x - n ln 2 by Cody-Waite (n * 0.693359375 is exact, its constant
// having 9 significant bits and |n| <= 150, and the subtraction is exact by
// Sterbenz; the low part 2.12194440e-4 adds one rounding of ~u |r|), then a
// degree-7 polynomial for exp(r) on |r| <= ln(2)/2 (error < 0.2 ulp) added
// to 1 last, and 2^n applied exactly by ldexp. Measured error: at most ~1 ulp,
// ~0.25 ulp on average. Cost: ~15 flops, for kernels bound by memory.
// Over- and underflow as exp: > 88.72 gives inf, < -104 gives 0, NaN stays NaN.
fn exp_f32(x: f32) -> f32 {
    let xc = clamp(x, -104.0, 88.72283);
    let n = round(xc * 1.442695041);
    var r = xc - n * 0.693359375;
    r = r + n * 2.12194440e-4;
    let z = r * r;
    var q = 1.9875691500e-4;
    q = q * r + 1.3981999507e-3;
    q = q * r + 8.3334519073e-3;
    q = q * r + 4.1665795894e-2;
    q = q * r + 1.6666665459e-1;
    q = q * r + 5.0000001201e-1;
    var y = ldexp((q * z + r) + 1.0, i32(n));
    y = select(y, 0.0, x < -104.0);
    y = select(y, bitcast<f32>(0x7f800000u), x > 88.72283);
    return select(y, x, x != x);
}

// Compensated summation (issue #14): TwoSum (Knuth) splits a + b into its
// rounded sum s and the exact rounding error e (a + b = s + e). Summing a
// dot product's partials with two_sum and adding the errors once at the end
// gives ~2u·Σ|terms| + O(n u²) however long the sum, against ~n·u for the
// plain running sum (u = 2^-24).
// Written as plain adds, TwoSum is algebraically zero error: a compiler that
// reassociates float adds folds (a - (s - (s - a))) + (b - (s - a)) to 0, and
// lavapipe's does (tests/precision.rs probes it; so may other drivers). So s
// and s - a pass through `opaque`: an xor of their bits with a zero the
// compiler cannot see (Step.zero, a uniform), which no float rewrite can
// look through. Cost: two integer xors per add.
fn opaque(v: f32, zero: u32) -> f32 {
    return bitcast<f32>(bitcast<u32>(v) ^ zero);
}
fn opaque4(v: vec4<f32>, zero: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>(bitcast<vec4<u32>>(v) ^ vec4<u32>(zero));
}
struct TwoSum {
    s: f32,
    e: f32,
}
struct TwoSum4 {
    s: vec4<f32>,
    e: vec4<f32>,
}
fn two_sum(a: f32, b: f32, zero: u32) -> TwoSum {
    let s = opaque(a + b, zero);
    let z = opaque(s - a, zero);
    return TwoSum(s, (a - (s - z)) + (b - z));
}
fn two_sum4(a: vec4<f32>, b: vec4<f32>, zero: u32) -> TwoSum4 {
    let s = opaque4(a + b, zero);
    let z = opaque4(s - a, zero);
    return TwoSum4(s, (a - (s - z)) + (b - z));
}
