// Bandwidth probe: a pure streaming read of one buffer (see src/bench.rs).
//
// Workgroup w reads the WG * PER_THREAD vec4<u32> starting at
// w * WG * PER_THREAD, in one of two patterns (`LANE_RUNS`):
// - false: at every step of the loop, neighbouring lanes read neighbouring
//   16-byte words (coalesced: what GPUs want);
// - true: each lane reads its own PER_THREAD contiguous words (one stream
//   per lane: what a CPU's prefetchers may prefer).
// Either way a workgroup reads one contiguous block, and every word exactly
// once. bench tries several patterns and sizes and keeps the best.
// Every word read is folded into an xor and a wrapping sum, which go to a
// two-word output through workgroup then global atomics, so no read can be
// dropped by the compiler and the result can be checked against the CPU.
//
// Not a model op: no Step binding (nothing here varies per step).

struct ProbeParams {
    // vec4<u32> words in `data`.
    n_vec4: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

override WG: u32 = 64u;
override PER_THREAD: u32 = 64u;
override LANE_RUNS: bool = false;

@group(0) @binding(0) var<uniform> p: ProbeParams;
@group(0) @binding(1) var<storage, read> data: array<vec4<u32>>;
// [0] = xor of every u32 read, [1] = wrapping sum of every u32 read.
@group(0) @binding(2) var<storage, read_write> out: array<atomic<u32>, 2>;

var<workgroup> wg_xor: atomic<u32>;
var<workgroup> wg_sum: atomic<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    if (lid == 0u) {
        atomicStore(&wg_xor, 0u);
        atomicStore(&wg_sum, 0u);
    }
    workgroupBarrier();
    // Overshooting workgroups of a 2D grid read nothing and add zeros.
    let block = wg_linear(wid, nwg) * WG * PER_THREAD;
    let base = select(block + lid, block + lid * PER_THREAD, LANE_RUNS);
    let stride = select(WG, 1u, LANE_RUNS);
    var x = 0u;
    var s = 0u;
    for (var i = 0u; i < PER_THREAD; i = i + 1u) {
        let idx = base + i * stride;
        if (idx < p.n_vec4) {
            let v = data[idx];
            x = x ^ v.x ^ v.y ^ v.z ^ v.w;
            s = s + v.x + v.y + v.z + v.w;
        }
    }
    atomicXor(&wg_xor, x);
    atomicAdd(&wg_sum, s);
    workgroupBarrier();
    if (lid == 0u) {
        atomicXor(&out[0], atomicLoad(&wg_xor));
        atomicAdd(&out[1], atomicLoad(&wg_sum));
    }
}
