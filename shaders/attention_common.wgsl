// What all three attention passes share (attention.wgsl, attention_rows.wgsl,
// attention_combine.wgsl; src/ops/attention.rs prepends it after
// kv_copy.rs's rows prelude, which defines StepT, row_pos and row_slot): the
// params and step uniforms, a row's visible range and the number of KV
// splits it uses. UNIT positions make a unit (attention.wgsl's block, or 1
// for the row kernel); a split takes at least MINU units and there are at
// most SPLITS (each pass declares SPLITS). The partial passes and the
// combine count the splits from the row's own range with this one function,
// so the combine reads exactly the partials written.

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    max_ctx: u32,
    scale: f32,
    // 0 = full causal attention; else the sliding window in positions.
    window: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: StepT;

override UNIT: u32 = 1u;
override MINU: u32 = 1u;

// Query token t at position row_pos(t) sees cache positions lo..n: causal,
// never past the cache, lo > 0 only under a sliding window.
fn row_range(t: u32) -> vec2<u32> {
    let pos = row_pos(t);
    let n = min(pos + 1u, p.max_ctx);
    var lo = 0u;
    if (p.window > 0u && pos + 1u > p.window) {
        lo = pos + 1u - p.window;
    }
    return vec2<u32>(lo, n);
}

fn n_splits(lo: u32, n: u32) -> u32 {
    let units = (n + UNIT - 1u) / UNIT - lo / UNIT;
    return clamp((units + MINU - 1u) / MINU, 1u, SPLITS);
}
