// Bit keys of f32 logits shared by the sampling kernels (sample_full.wgsl,
// sample_topk.wgsl): prepended to each. Comparisons of these keys are the
// only operations that order logits there, so the order is exact on every
// device.

fn is_finite(b: u32) -> bool {
    return (b & 0x7f800000u) != 0x7f800000u;
}

// Total-order key of f32 bits (as f64::total_cmp on the widened value:
// -0 below +0).
fn tkey(b: u32) -> u32 {
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

// The greedy argmax's and the candidates' key: -0 and +0 tie (the argmax
// compares with `>`).
fn gkey(b: u32) -> u32 {
    return tkey(select(b, 0u, b == 0x80000000u));
}
