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
