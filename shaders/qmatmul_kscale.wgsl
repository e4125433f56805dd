// The 6-bit scale and min of sub-block j (0..8) of a Q4_K / Q5_K block
// (ggml's get_scale_min_k4); `sw` is the word holding scales[0..4].
fn scale_min_k4(sw: u32, j: u32) -> vec2<u32> {
    if (j < 4u) {
        return vec2<u32>(byte_of(w[sw], j) & 63u, byte_of(w[sw + 1u], j) & 63u);
    }
    let i = j - 4u;
    let lo = byte_of(w[sw + 2u], i); // scales[j + 4]
    let sc = (lo & 15u) | ((byte_of(w[sw], i) >> 6u) << 4u);
    let mn = (lo >> 4u) | ((byte_of(w[sw + 1u], i) >> 6u) << 4u);
    return vec2<u32>(sc, mn);
}
