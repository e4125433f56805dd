// Helpers prepended to every wgllm kernel (see src/gpu.rs).

// Per-step values shared by all kernels (binding 1). Mirrors `gpu::Step`.
struct Step {
    n_tokens: u32,
    pos_offset: u32,
    kv_len: u32,
    _pad: u32,
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
