// Quantized weights (ggml blocks in the BlockPad layout of src/qtensor.rs),
// read as words: helpers shared by the quantized linear and embedding
// kernels. Each qmatmul_<type>.wgsl defines, for its type,
//   const QBW: u32   // words per device block
//   const QGPB: u32  // groups of 32 elements per block (1, or 8 for K-quants)
//   fn gscales(bw: u32, g: u32) -> vec4<f32>
//   fn dequant4s(bw: u32, g: u32, j: u32, s: vec4<f32>) -> vec4<f32>
// gscales decodes, once per 32-element group g of the block starting at
// word bw, the f32 scales (and mins) that group's elements use (the
// products d * sc, dmin * m of the K-quants are formed there); dequant4s
// then returns elements 4j .. 4j + 3 (j < 8) of the group from its quants
// and those scales. Together they do exactly the f32 operations of
// src/gguf/dequant.rs (one rounding per product or sum, same order), so
// hoisting the scales out of the per-element work changes no value.

@group(0) @binding(3) var<storage, read> w: array<u32>;

// Deliberate dequantization bugs for the negative-control tests only
// (ARCHITECTURE.md, "Fault injection"): production pipelines are compiled
// with both false, which removes the branches.
// Read the low nibble where the high one is meant and vice versa.
override FAULT_NIBBLE_SWAP: bool = false;
// Read a block's f16 scale as the f32 bits of its whole word.
override FAULT_SCALE_F32: bool = false;

// Byte i (0..3) of a word.
fn byte_of(wd: u32, i: u32) -> u32 {
    return (wd >> (8u * i)) & 0xffu;
}
// Byte i of a word as a signed 8-bit value.
fn sbyte_of(wd: u32, i: u32) -> i32 {
    return bitcast<i32>(wd << (24u - 8u * i)) >> 24u;
}
// Byte at byte offset `off` of the weight buffer.
fn qbyte(off: u32) -> u32 {
    return byte_of(w[off >> 2u], off & 3u);
}

// f16 bits -> f32, exact for every finite value including subnormals (done
// with integer operations so no device flushes f16 subnormals). Scales
// that are infinite or NaN are refused on the host before upload.
fn f16_bits(h: u32) -> f32 {
    let s = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        // m * 2^-24, exact
        return bitcast<f32>(s | bitcast<u32>(f32(m) * 5.9604644775390625e-8));
    }
    return bitcast<f32>(s | ((e + 112u) << 23u) | (m << 13u));
}
// The f16 in the low (hi = false) or high half of word wi: a block scale.
fn scale16(wi: u32, hi: bool) -> f32 {
    let wd = w[wi];
    if (FAULT_SCALE_F32) {
        return bitcast<f32>(wd);
    }
    return f16_bits(select(wd & 0xffffu, wd >> 16u, hi));
}
// Low (hi = false) or high nibble of a byte.
fn nibble(b: u32, hi: bool) -> u32 {
    return select(b & 15u, b >> 4u, hi != FAULT_NIBBLE_SWAP);
}

// The four bytes of a word, unsigned and signed, and their nibbles.
fn bytes4(wd: u32) -> vec4<u32> {
    return (vec4<u32>(wd) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xffu);
}
fn sbytes4(wd: u32) -> vec4<i32> {
    return bitcast<vec4<i32>>(vec4<u32>(wd) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
}
fn nibbles4(wd: u32, hi: bool) -> vec4<u32> {
    let b = bytes4(wd);
    return select(b & vec4<u32>(15u), b >> vec4<u32>(4u), hi != FAULT_NIBBLE_SWAP);
}
// Bits e .. e + 3 of qh, each as 0 or 1.
fn bits4(qh: u32, e: u32) -> vec4<u32> {
    return (vec4<u32>(qh) >> (vec4<u32>(e) + vec4<u32>(0u, 1u, 2u, 3u))) & vec4<u32>(1u);
}

// Elements 4j .. 4j + 3 of group g, scales decoded on the spot.
fn dequant4(bw: u32, g: u32, j: u32) -> vec4<f32> {
    return dequant4s(bw, g, j, gscales(bw, g));
}

// ---- K-quants with 6-bit scales and mins (Q4_K, Q5_K): f16 d, f16 dmin
// (word 0), u8 scales[12] (words 1..3), as ggml's get_scale_min_k4.
// The 6-bit scale and min of sub-block j (0..8) of a Q4_K / Q5_K block
// (ggml's get_scale_min_k4) from the three words s0, s1, s2 holding
// scales[0..12].
fn kscale(s0: u32, s1: u32, s2: u32, j: u32) -> vec2<u32> {
    if (j < 4u) {
        return vec2<u32>(byte_of(s0, j) & 63u, byte_of(s1, j) & 63u);
    }
    let i = j - 4u;
    let lo = byte_of(s2, i); // scales[j + 4]
    let sc = (lo & 15u) | ((byte_of(s0, i) >> 6u) << 4u);
    let mn = (lo >> 4u) | ((byte_of(s1, i) >> 6u) << 4u);
    return vec2<u32>(sc, mn);
}
// The same with the words read from the block's scales at word sw.
fn scale_min_k4(sw: u32, j: u32) -> vec2<u32> {
    return kscale(w[sw], w[sw + 1u], w[sw + 2u], j);
}
// The group part's scales of sub-block g: (d * sc, dmin * m, 0, 0).
fn kgscales(bw: u32, g: u32) -> vec4<f32> {
    let sm = scale_min_k4(bw + 1u, g);
    return vec4<f32>(scale16(bw, false) * f32(sm.x), scale16(bw, true) * f32(sm.y), 0.0, 0.0);
}
// A block's header for the row kernel's qblock: d, dmin and the three
// scale words, each loaded once.
struct KHead {
    d: f32,
    dmin: f32,
    s0: u32,
    s1: u32,
    s2: u32,
}
fn khead(bw: u32) -> KHead {
    return KHead(scale16(bw, false), scale16(bw, true), w[bw + 1u], w[bw + 2u], w[bw + 3u]);
}
// The scales of the sub-block pair 2p, 2p + 1 (the low and high nibbles of
// the same 32 quant bytes): (d * sc, dmin * m) of 2p, then of 2p + 1 (the
// same products as kgscales).
fn kpair(h: KHead, p: u32) -> vec4<f32> {
    let sa = kscale(h.s0, h.s1, h.s2, 2u * p);
    let sb = kscale(h.s0, h.s1, h.s2, 2u * p + 1u);
    return vec4<f32>(h.d * f32(sa.x), h.dmin * f32(sa.y), h.d * f32(sb.x), h.dmin * f32(sb.y));
}
