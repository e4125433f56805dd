// Causal grouped-query attention, the row kernel (CPU-device profile), in f32.
// Same bindings (attention_common.wgsl, attention_work.wgsl), layouts and
// semantics as attention.wgsl (see there): q
// [n_tokens, n_heads * d], head-major caches [n_kv_heads, max_ctx, d] per
// slot, query head h reads KV head h / (n_heads / n_kv_heads), token t at
// row_pos(t) sees row_range(t) = lo..n (causal, optional sliding window).
//
// Each invocation owns R = TPL * HPW query rows (TPL tokens x HPW query
// heads of one KV head's group) and keeps their q, running max, softmax sum
// and output sums in private variables; it walks cache positions one at a
// time, loading each K and V row once for all R rows. The host generates
// the per-row statements (ROWS_* below) for the kernel's HPW, TPL and D4,
// so every value lives in a named variable (registers or stack slots, never
// an indexed array) and only the position loop counts against llvmpipe's
// loop budget. No workgroup memory, no barrier.
//
// Why this shape on a CPU device: lavapipe turns every storage or workgroup
// load whose address is not a constant into a per-lane loop of scalar loads
// (gallivm emit_load_mem), so a kernel's cost there is the words it loads
// per lane; register and stack traffic is cheap. Loading q once and each
// K/V word once per R rows is the least it can load (the shared-memory
// kernel reloads q and the softmax weights from workgroup memory for every
// position). On a GPU the same shape would hold 3 * R * d floats per thread
// (spills, low occupancy), which is why the GPU profile keeps attention.wgsl.
//
// Two entry shapes, chosen by the host:
// - prefill (PARTIAL false, PH 1): lane lt of a workgroup owns tokens
//   tb * TQ * TPL + lt + TQ * k, k < TPL; it walks the union of their
//   ranges (a lane's tokens are TQ apart, so at most TQ * (TPL - 1) extra
//   positions, masked), skipping everything before the first window and
//   after the last causal limit (causal block skipping at the finest grain).
// - decode (PARTIAL true, TQ 1, TPL 1, PH = WG): one token per workgroup; the
//   token's range is cut into n_splits(lo, n) runs (from the row's own
//   length, at run time: the dispatch is SPLITS workgroups per row whatever
//   the KV length, and the surplus ones return at once), and lane ph of a
//   run takes its positions ph, ph + PH, ...; each lane writes its partial
//   (acc, m, l) and attention_combine.wgsl merges the ns * PH partials.
//
// Precision: scores are attention.wgsl's (s, se): the vec4 dots added with
// TwoSum, the error term joining the exp argument (see there; the same
// bound, ~3u·Σ|q_i k_i| instead of the running sum's (d/4 + 2)u); the
// running max keeps every exp argument <= 0 (to ~u·|se|). The softmax sum and output sums are blocked: positions add into a
// block sum (lb, ab, kept relative to the current max) that is folded into
// the total (l, a, relative to the max at the last fold) every BP positions,
// so their rounding grows with BP + length / BP terms, not with the length.

// Invocations per workgroup.
override WG: u32 = 8u;
// Token lanes per workgroup (prefill: WG; decode: 1).
override TQ: u32 = 8u;
// Position phases per token: WG / TQ (prefill 1, decode WG).
override PH: u32 = 1u;
// Most KV splits per row (decode); the run-time count is n_splits().
override SPLITS: u32 = 1u;
// Write partials (acc, m, l) per (split, lane) instead of the output.
override PARTIAL: bool = false;
// Positions per block sum (see Precision).
const BP: u32 = 32u;
//@ROWS_CONSTS

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let tpw = TQ * TPL;
    let ntb = (step.n_tokens + tpw - 1u) / tpw;
    // Workgroup-uniform (attention_work.wgsl).
    let wk = wg_work(wg_linear(wid, nwg), ntb);
    if (!wk.ok) {
        return;
    }
    let sp = wk.sp;
    let kvh = wk.kvh;
    let tb = wk.tb;
    let hstride = wk.hstride;
    let h0 = wk.h0;
    let lt = lid / PH;
    let ph = lid % PH;
    let last = step.n_tokens - 1u;
    // Per token k of this lane: t{k}, whether it exists (ok{k}), its query
    // row base, its visible range lo{k}..n{k} (empty when it does not exist).
//@ROWS_TOKENS
    // The positions this lane walks.
    var jlo = 0u;
    var jhi = 0u;
//@ROWS_UNION
    // The slot of the lane's first token (a workgroup's tokens share one
    // slot except in batched steps, where each workgroup holds one token).
    let kvbase = (row_slot(t0c) * p.n_kv_heads + kvh) * p.max_ctx * D4;
    if (PARTIAL) {
        // Decode: one token (host-checked TQ == TPL == 1); this split's run.
        let ns = n_splits(lo0, n0);
        if (sp >= ns) {
            return;
        }
        let span = n0 - lo0;
        let per = (span + ns - 1u) / ns;
        jlo = lo0 + min(sp * per, span);
        jhi = lo0 + min(sp * per + per, span);
    }
    jlo += ph;
//@ROWS_INIT
    var j = jlo;
    loop {
        if (j >= jhi) {
            break;
        }
        let jend = min(jhi, j + BP * PH);
        for (; j < jend; j += PH) {
            let kb = kvbase + j * D4;
//@ROWS_BODY
        }
//@ROWS_FOLD
    }
//@ROWS_OUT
}
