// Linear layers y = x · Wᵀ (+ b): the parts shared by every GEMV and tiled
// kernel (src/ops/matmul.rs assembles each kernel from these pieces).
//
// Params, the bias and the output. One Params per weight chunk: the chunk
// holds rows [row_start, row_start + rows) of the [n, k] weight, starting at
// element 0 of its own buffer, and writes those output columns of y [t, n].

struct Params {
    k: u32,
    n: u32,
    row_start: u32,
    rows: u32,
    // 0 = no bias, 1 = f32 bias, 2 = bf16 bias (packed two per u32).
    bias_mode: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

// Weight storage: bf16 packed two per u32 (true) or f32 bits (false).
override W_BF16: bool = true;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
// bias [n] (global column index, never split); a dummy word when bias_mode = 0
@group(0) @binding(4) var<storage, read> bias: array<u32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

// The bias of output column col (0 when there is none).
fn bias_at(col: u32) -> f32 {
    var b = 0.0;
    if (p.bias_mode == 1u) {
        b = bitcast<f32>(bias[col]);
    } else if (p.bias_mode == 2u) {
        b = bf16_at(bias[col >> 1u], col);
    }
    return b;
}

// Write output (token t, chunk row r), adding the bias in f32.
fn store(t: u32, r: u32, v: f32) {
    let col = p.row_start + r;
    y[t * p.n + col] = v + bias_at(col);
}

// store for a Dot2 sum (issue #14): the output is s + e (s the TwoSum'd
// running sum, e its accumulated errors), the bias added by TwoSum too, so
// x·W + b is rounded once.
fn store_dot2(t: u32, r: u32, s: f32, e: f32) {
    let col = p.row_start + r;
    let ts = two_sum(s, bias_at(col), step.zero);
    y[t * p.n + col] = ts.s + (ts.e + e);
}
