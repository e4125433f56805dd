// GEMV, one workgroup per output row, reduced with subgroupAdd.
// Prepended: `const WG: u32`, matmul_common.wgsl and one matmul_xw*.wgsl.
// WG is a multiple of the adapter's largest subgroup size, so subgroups are
// full. No assumption is made about which invocations form a subgroup: every
// lane 0 leaves its subgroup's sum in its own slot (others leave 0), then each
// subgroup sums all WG slots (lane s takes slots s, s + size, ...) and one
// invocation stores the total.

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_invocation_id) sid: u32,
        @builtin(subgroup_size) ssz: u32) {
    let g = wg_linear(wid, nwg);
    let t = g / p.rows;
    let r = g % p.rows;
    // Uniform across the workgroup.
    if (t >= step.n_tokens) {
        return;
    }
    let s = subgroupAdd(row_part(t, r, lid, WG));
    red[lid] = select(0.0, s, sid == 0u);
    workgroupBarrier();
    var a = 0.0;
    for (var i = sid; i < WG; i += ssz) {
        a += red[i];
    }
    let total = subgroupAdd(a);
    if (lid == 0u) {
        store(t, r, total);
    }
}
