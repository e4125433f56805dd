// Fused decode GEMVs, row-per-invocation shape (gemv_rows.wgsl's: the CPU
// device profile). Each invocation computes 4 output rows with rows_dot4
// (the x loads shared by the 4 rows), as the GEMV does; only which 4 rows
// share an invocation differs, and a row's sum does not depend on that.
// Prepended: gemv_fused_common.wgsl and what it says.

// q|k|v sections of groups_a, groups_b and the rest of the workgroups; an
// invocation takes RoPE pairs n and n + WG of its section (4 rows, one weight).
@compute @workgroup_size(WG)
fn qkv_rope(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    if (step.n_tokens != 1u || !pos_ok()) {
        return;
    }
    var g = wg_linear(wid, nwg);
    var sec = 0u;
    var rows = fp.rows_a;
    if (g >= fp.groups_a) {
        g -= fp.groups_a;
        sec = 1u;
        rows = fp.rows_b;
        if (g >= fp.groups_b) {
            g -= fp.groups_b;
            sec = 2u;
            rows = fp.rows_c;
        }
    }
    let pairs = rows / 2u;
    let n0 = g * 2u * WG + lid;
    if (n0 >= pairs) {
        return;
    }
    // past the end: recompute the last pair, not stored
    let n1 = min(n0 + WG, pairs - 1u);
    let half = fp.head_dim / 2u;
    let r = vec4<u32>(pair_row(n0), pair_row(n0) + half, pair_row(n1), pair_row(n1) + half);
    var v: vec4<f32>;
    switch sec {
        case 0u: {
            v = rows_dot4(0u, r)[0];
        }
        case 1u: {
            v = rows_dot4_b(0u, r)[0];
        }
        default: {
            v = rows_dot4_c(0u, r)[0];
        }
    }
    rope_store(sec, r.x, v.x, v.y);
    if (n0 + WG < pairs) {
        rope_store(sec, r.z, v.z, v.w);
    }
}

// Rows r0, r0 + WG, r0 + 2 WG, r0 + 3 WG of gate and of up, then the GLU.
@compute @workgroup_size(WG)
fn gate_up(@builtin(workgroup_id) wid: vec3<u32>,
           @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let r0 = wg_linear(wid, nwg) * 4u * WG + lid;
    if (step.n_tokens != 1u || r0 >= fp.rows_a) {
        return;
    }
    let r = vec4<u32>(r0, r0 + WG, r0 + 2u * WG, r0 + 3u * WG);
    // rows past the end recompute the last row and are not stored
    let rc = min(r, vec4<u32>(fp.rows_a - 1u));
    let gv = rows_dot4(0u, rc)[0];
    let uv = rows_dot4_b(0u, rc)[0];
    for (var j = 0u; j < 4u; j++) {
        if (r[j] < fp.rows_a) {
            out_a[r[j]] = glu(gv[j] + bias_of(0u, r[j]), uv[j] + bias_of(1u, r[j]));
        }
    }
}
