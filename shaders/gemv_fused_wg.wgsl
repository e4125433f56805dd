// Fused decode GEMVs, workgroup-per-row shape (gemv_wg_subgroup.wgsl or
// gemv_wg_shared.wgsl, whichever the GEMV uses: the GPU profile). A
// workgroup reduces each of its rows with that GEMV's row_part and wg_sum,
// one row after the other, so each row sums exactly as the GEMV sums it.
// Prepended: gemv_fused_common.wgsl, what it says, and the GEMV entry file
// (for red, Lanes and wg_sum).

// The partial dot product of row r of weight `sec` (row_part of its copy).
fn part(sec: u32, r: u32, lid: u32) -> f32 {
    var a: f32;
    switch sec {
        case 0u: {
            a = row_part(0u, r, lid, WG);
        }
        case 1u: {
            a = row_part_b(0u, r, lid, WG);
        }
        default: {
            a = row_part_c(0u, r, lid, WG);
        }
    }
    return a;
}

// One workgroup per RoPE pair over the pairs of q, then k, then v.
@compute @workgroup_size(WG)
fn qkv_rope(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            l: Lanes) {
    var n = wg_linear(wid, nwg);
    let pa = fp.rows_a / 2u;
    let pb = fp.rows_b / 2u;
    // Uniform across the workgroup.
    if (step.n_tokens != 1u || !pos_ok() || n >= pa + pb + fp.rows_c / 2u) {
        return;
    }
    var sec = 0u;
    if (n >= pa) {
        n -= pa;
        sec = 1u;
        if (n >= pb) {
            n -= pb;
            sec = 2u;
        }
    }
    let ra = pair_row(n);
    let da = wg_sum(part(sec, ra, l.lid), l);
    workgroupBarrier();
    let db = wg_sum(part(sec, ra + fp.head_dim / 2u, l.lid), l);
    if (l.lid == 0u) {
        rope_store(sec, ra, da, db);
    }
}

// One workgroup per row r: gate row r, up row r, then the GLU.
@compute @workgroup_size(WG)
fn gate_up(@builtin(workgroup_id) wid: vec3<u32>,
           @builtin(num_workgroups) nwg: vec3<u32>,
           l: Lanes) {
    let r = wg_linear(wid, nwg);
    // Uniform across the workgroup.
    if (step.n_tokens != 1u || r >= fp.rows_a) {
        return;
    }
    let gv = wg_sum(row_part(0u, r, l.lid, WG), l);
    workgroupBarrier();
    let uv = wg_sum(row_part_b(0u, r, l.lid, WG), l);
    if (l.lid == 0u) {
        out_a[r] = glu(gv + bias_of(0u, r), uv + bias_of(1u, r));
    }
}
