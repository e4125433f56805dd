// The fused decode GEMVs (src/ops/fused.rs): one dispatch computes several
// linear layers over the same x and finishes their outputs in its epilogue.
//   qkv_rope: q, k and v projections (+ bias), RoPE of q and k (rotate_half
//             on the host-computed cos/sin tables, rope_kv.wgsl's arithmetic)
//             and the KV-cache append (kv_copy.wgsl's layout), one token.
//   gate_up:  gate and up projections (+ bias) and the GLU (elementwise.wgsl's
//             arithmetic), one token.
// Prepended: `const WG, TB: u32`, matmul_common.wgsl (p.k, step, W_BF16) and
// matmul_xw*.wgsl three times: as written (binding w, functions rows_dot4,
// row_part, ...) and renamed for the second and third weight (w_b, w_c;
// rows_dot4_b, row_part_b, ...), so every row is summed by the GEMV's own
// inner loop in the GEMV's own order (bit-identical to the unfused ops).
// Weight "a", "b", "c" are q, k, v (qkv_rope) or gate, up (gate_up).

struct FusedParams {
    // Output rows of each weight.
    rows_a: u32,
    rows_b: u32,
    rows_c: u32,
    // Workgroups of the sections of weight a and b (gemv_fused_rows.wgsl).
    groups_a: u32,
    groups_b: u32,
    head_dim: u32,
    // KV cache positions per head and RoPE table rows.
    max_ctx: u32,
    max_positions: u32,
    // matmul_common.wgsl's: 0 = no bias, 1 = f32, 2 = bf16 (packed two per u32).
    bias_mode: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

// GLU activation: false = SiLU (SwiGLU), true = torch's tanh GELU (GeGLU).
override GLU_GELU_TANH: bool = false;

@group(0) @binding(6) var<uniform> fp: FusedParams;
@group(0) @binding(9) var<storage, read> bias_a: array<u32>;
@group(0) @binding(10) var<storage, read> bias_b: array<u32>;
@group(0) @binding(11) var<storage, read> bias_c: array<u32>;
// qkv_rope: the QRope buffer [n_heads * head_dim], the layer's K and V cache
// [n_kv_heads, max_ctx, head_dim] (slot 0). gate_up: out_a is the GLU output.
@group(0) @binding(12) var<storage, read_write> out_a: array<f32>;
@group(0) @binding(13) var<storage, read_write> out_b: array<f32>;
@group(0) @binding(14) var<storage, read_write> out_c: array<f32>;
@group(0) @binding(15) var<storage, read> cos_t: array<f32>;
@group(0) @binding(16) var<storage, read> sin_t: array<f32>;

// Bias of output `col` of weight `sec` (0 when there is none), read as
// matmul_common.wgsl's store() reads it.
fn bias_of(sec: u32, col: u32) -> f32 {
    if (fp.bias_mode == 0u) {
        return 0.0;
    }
    let i = select(col, col >> 1u, fp.bias_mode == 2u);
    var word: u32;
    switch sec {
        case 0u: {
            word = bias_a[i];
        }
        case 1u: {
            word = bias_b[i];
        }
        default: {
            word = bias_c[i];
        }
    }
    if (fp.bias_mode == 1u) {
        return bitcast<f32>(word);
    }
    return bf16_at(word, col);
}

// elementwise.wgsl's swiglu / gelu_tanh_glu on one element.
fn glu(g: f32, u: f32) -> f32 {
    if (GLU_GELU_TANH) {
        let a = 0.7978845608028654 * (g + 0.044715 * g * g * g);
        return g / (1.0 + exp_f32(-2.0 * a)) * u;
    }
    return g / (1.0 + exp_f32(-g)) * u;
}

// rope_kv.wgsl's rotation of the pair (x1, x2).
fn rotate(x1: f32, x2: f32, c: f32, s: f32) -> vec2<f32> {
    return vec2<f32>(x1 * c - x2 * s, x2 * c + x1 * s);
}

// The qkv rows are taken in RoPE pairs: pair n of a weight is rows
// (pair_row(n), pair_row(n) + head_dim / 2) of one head.
fn pair_row(n: u32) -> u32 {
    let half = fp.head_dim / 2u;
    return (n / half) * fp.head_dim + n % half;
}

// The decode position, and whether the RoPE table and the cache hold it
// (rope_kv.wgsl writes nothing otherwise).
fn pos_ok() -> bool {
    let pos = step.pos_offset;
    return pos < fp.max_positions && pos < fp.max_ctx;
}

// Finish RoPE pair (ra, ra + head_dim / 2) of weight `sec` (0 = q, 1 = k,
// 2 = v) from its two dot products: bias, RoPE (q, k), store (q to QRope, k
// and v to the cache at this step's position).
fn rope_store(sec: u32, ra: u32, da: f32, db: f32) {
    let hd = fp.head_dim;
    let half = hd / 2u;
    let rb = ra + half;
    let va = da + bias_of(sec, ra);
    let vb = db + bias_of(sec, rb);
    let pos = step.pos_offset;
    let h = ra / hd;
    let i = ra - h * hd;
    let dst = (h * fp.max_ctx + pos) * hd;
    if (sec == 2u) {
        out_c[dst + i] = va;
        out_c[dst + i + half] = vb;
        return;
    }
    let c = cos_t[pos * half + i];
    let s = sin_t[pos * half + i];
    let y = rotate(va, vb, c, s);
    if (sec == 0u) {
        out_a[ra] = y.x;
        out_a[rb] = y.y;
        return;
    }
    out_b[dst + i] = y.x;
    out_b[dst + i + half] = y.y;
}
