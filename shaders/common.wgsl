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
    // inf built from x's bits: a constant `bitcast<f32>(0x7f800000u)` is a
    // const-expression, and WGSL (Tint, in browsers) rejects a const inf.
    let inf = bitcast<f32>(0x7f800000u | (bitcast<u32>(x) & 0u));
    y = select(y, inf, x > 88.72283);
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

// bf16 x f32 products split exactly (Dot2, issue #14): x = h + l with h the
// top 16 significand bits of x (a mask, which no float rewrite can undo) and
// l = x - h (exact, at most 8 significant bits). A bf16 weight has 8
// significand bits, so w·h (<= 24 bits) and w·l (<= 16) are exact f32
// products: w·x = w·h + w·l with no rounding, for 2 multiplies per product
// and one mask per x element (shared by every weight row it meets). Valid
// while the products are normal numbers.
fn bf16_split4(x: vec4<f32>) -> TwoSum4 {
    let h = bitcast<vec4<f32>>(bitcast<vec4<u32>>(x) & vec4<u32>(0xffffff00u));
    return TwoSum4(h, x - h);
}
fn bf16_split(x: f32) -> TwoSum {
    let h = bitcast<f32>(bitcast<u32>(x) & 0xffffff00u);
    return TwoSum(h, x - h);
}

// TwoProduct (Dekker, with Veltkamp's split): a * b = p + e exactly, p the
// rounded product, from multiplies and adds alone. fma(a, b, -p) gives e in
// one instruction where the device fuses fma, but WGSL does not promise
// that, and lavapipe (Vulkan and GL) does not: its fma rounds the product
// first, so fma(a, b, -p) is 0 (tests/precision.rs probes both). Each
// factor is split into 12-bit halves (c = 4097 a, hi = c - (c - a)), whose
// products are exact; the error is summed from them in Dekker's order, in
// which every step is exact. `opaque` keeps a reassociating compiler from
// folding the split (hi = a) or reordering the exact steps. Valid while
// |a|, |b| < ~1e34 (4097 a must not overflow) and the product's error is a
// normal number: activations here are far inside that. Cost: ~17 flops and
// 6 xors per product.
fn split_f32(a: f32, zero: u32) -> vec2<f32> {
    let c = opaque(4097.0 * a, zero);
    let hi = c - opaque(c - a, zero);
    return vec2<f32>(hi, a - hi);
}
fn two_prod(a: f32, b: f32, zero: u32) -> TwoSum {
    let p = opaque(a * b, zero);
    let x = split_f32(a, zero);
    let y = split_f32(b, zero);
    let e1 = opaque(x.x * y.x - p, zero);
    let e2 = opaque(e1 + x.x * y.y, zero);
    let e3 = opaque(e2 + x.y * y.x, zero);
    return TwoSum(p, e3 + x.y * y.y);
}
// two_prod(a, a): one split.
fn two_square(a: f32, zero: u32) -> TwoSum {
    let p = opaque(a * a, zero);
    let x = split_f32(a, zero);
    let e1 = opaque(x.x * x.x - p, zero);
    let e2 = opaque(e1 + 2.0 * (x.x * x.y), zero);
    return TwoSum(p, e2 + x.y * x.y);
}

// RMSNorm's pieces (rmsnorm.wgsl, add_rmsnorm.wgsl; issue #14), shared so the
// two stay bit-identical. A sum of squares is carried as (hi, lo): every
// square split exactly (two_square: v² = sq + e) and every add by two_sum,
// so the sum is exact to ~2u however long the row and however it is split
// over lanes.
struct SumSq {
    hi: f32,
    lo: f32,
}
// `v` is an element as (hi, lo) (the residual stream, see stream_add; lo = 0
// for any other tensor): (v + l)^2 = v^2 + 2 v l + l^2, the last below u^2
// v^2 and dropped; 2 v l joins the low part (with l = 0 the value is the
// plain element's, bit for bit).
fn sumsq_add(acc: SumSq, v: f32, l: f32, zero: u32) -> SumSq {
    let sq = two_square(v, zero);
    let t = two_sum(acc.hi, sq.s, zero);
    return SumSq(t.s, acc.lo + ((t.e + sq.e) + 2.0 * v * l));
}
fn sumsq_merge(a: SumSq, b: SumSq, zero: u32) -> SumSq {
    let t = two_sum(a.hi, b.hi, zero);
    return SumSq(t.s, (a.lo + b.lo) + t.e);
}
// 1 / sqrt(ss / width + eps) to ~1u (the built-in inverseSqrt alone is
// allowed 2 ulp and sees the mean already rounded): m = ss / width + eps as
// (t, tl), then one Newton step r' = r + r (1 - m r²) / 2 on
// r = inverseSqrt(t), with 1 - m r² evaluated from exact products
// (two_prod). ss.hi - mh n is exact (Sterbenz: mh n is within an ulp of
// ss.hi), less mh n's own rounding error.
fn rms_inv(ss: SumSq, width: u32, eps: f32, zero: u32) -> f32 {
    let n = f32(width);
    let mh = ss.hi / n;
    let mn = two_prod(mh, n, zero);
    let ml = (((ss.hi - mn.s) - mn.e) + ss.lo) / n;
    let te = two_sum(mh, eps, zero);
    let t = te.s;
    let tl = te.e + ml;
    let r = inverseSqrt(t);
    let r2 = two_square(r, zero);
    let q = two_prod(t, r2.s, zero);
    let e = ((1.0 - q.s) - q.e) - (t * r2.e + tl * r2.s);
    return r + r * (0.5 * e);
}
// w * (x + l) * inv with one rounding: w * x split exactly (two_prod), w * l
// (l the element's low half, 0 outside the residual stream) added to its
// error part; then wx * inv split exactly too, and the error parts added to
// its rounded product last: y = p + (pe + (wxe + w l) inv), the only
// rounding of size u being the final add's.
fn norm_scale(w: f32, x: f32, l: f32, inv: f32, zero: u32) -> f32 {
    let wx = two_prod(w, x, zero);
    let y = two_prod(wx.s, inv, zero);
    return y.s + (y.e + (wx.e + w * l) * inv);
}

// The residual stream as (hi, lo) (issue #14): every element is the
// unevaluated sum hi + lo, renormalised after each add so that hi is
// hi + lo rounded to nearest (what taps show, one rounding of the exact
// stream) and |lo| <= ulp(hi) / 2. A residual add of x:
//   (s, e) = two_sum(hi, x)         s + e = hi + x exactly
//   (hi', lo') = two_sum(s, lo + e) exactly, one rounding in lo + e
// so each add's error is ~u * |lo + e| <= ~u^2 |hi|, where the plain f32
// add rounds by up to u |hi|: the stream holds its 2L adds at ~2^-48
// relative instead of accumulating 2L roundings of 2^-24. (two_sum, not
// fast_two_sum, for the renormalisation: |s| may be below |lo + e| when
// hi + x cancels.) Returned as TwoSum: s = hi', e = lo'.
fn stream_add(hi: f32, lo: f32, x: f32, zero: u32) -> TwoSum {
    let t = two_sum(hi, x, zero);
    return two_sum(t.s, lo + t.e, zero);
}
