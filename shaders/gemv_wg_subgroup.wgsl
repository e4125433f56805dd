// GEMV, one workgroup per output row, reduced with subgroupAdd.
// Prepended: `const WG: u32`, matmul_common.wgsl and one matmul_xw*.wgsl.
// WG is a multiple of the adapter's largest subgroup size, so subgroups are
// full. No assumption is made about which invocations form a subgroup: every
// lane 0 leaves its subgroup's sum in its own slot (others leave 0), then each
// subgroup sums all WG slots (lane s takes slots s, s + size, ...) and one
// invocation stores the total. The fused kernels (gemv_fused_wg.wgsl) reduce
// with the same wg_sum, so their rows sum exactly as this GEMV's do.

var<workgroup> red: array<f32, WG>;

// Where an invocation sits in its workgroup and subgroup.
struct Lanes {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sid: u32,
    @builtin(subgroup_size) ssz: u32,
}

// The workgroup's sum of v, returned to every invocation. Call it in uniform
// control flow; between two calls the caller puts a workgroupBarrier (red is
// reused).
fn wg_sum(v: f32, l: Lanes) -> f32 {
    let s = subgroupAdd(v);
    red[l.lid] = select(0.0, s, l.sid == 0u);
    workgroupBarrier();
    var a = 0.0;
    for (var i = l.sid; i < WG; i += l.ssz) {
        a += red[i];
    }
    return subgroupAdd(a);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        l: Lanes) {
    let g = wg_linear(wid, nwg);
    let t = g / p.rows;
    let r = g % p.rows;
    // Uniform across the workgroup.
    if (t >= step.n_tokens) {
        return;
    }
    let total = wg_sum(row_part(t, r, l.lid, WG), l);
    if (l.lid == 0u) {
        store(t, r, total);
    }
}
