// Full sampling of row 0 on the GPU: repetition penalty, temperature,
// top-k, top-p, min-p and the draw, in the CPU sampler's order
// (src/sampling.rs), writing only the chosen id. One workgroup.
//
// Exactness (see src/ops/sample_full.rs): the penalty is one correctly
// rounded f32 multiply per window logit, as on the host; top-k, the order
// (value descending by total order, then id ascending) and greedy use only
// comparisons of bit keys. Softmax masses are f32 here and f64 on the host,
// so every decision that depends on a sum (top-p's cut, min-p's floor, the
// draw) is taken only when it holds with a margin of `tol` times a running
// bound of the f32 error on both sides; otherwise the kernel flags the
// step uncertain and the host samples that step from the row instead.
// Prepended: `const WG: u32` and shaders/sample_keys.wgsl.
//
// Nothing is written by the host per step: the penalty's window is the
// tail of a token history ring in `seq` that this kernel appends its pick
// to, and the step's uniform is entry `step` of a per-generation table of
// draws (`draws`, filled from the sampler's RNG in the CPU sampler's
// order). seq: [0] tokens in the history, [1] the step (index into
// `draws`), [2] the row of `logits` to sample (0 but in a batched step of
// several sequences, where the host writes it per step), [3] unused,
// [4 + (j % hist_cap)] = history token j.
//
// work: [0, V) penalized logit bits; list of the top-k survivors:
// [V, 2V) ids, [2V, 3V) keys, [3V, 4V) unnormalized probabilities.
// out: [0] id, [1] uncertainty bits (0 = decided), [2] survivors of top-k,
// [3] tokens left to the draw.

struct Params {
    vocab: u32,
    // the penalty's window: the last `last_n` history tokens (0 = all)
    last_n: u32,
    // 0 = off
    top_k: u32,
    // 1: argmax of the penalized row (temperature 0)
    greedy: u32,
    inv_t: f32,
    top_p: f32,
    min_p: f32,
    penalty: f32,
    inv_penalty: f32,
    // safety factor on the error bounds
    tol: f32,
    // bisection steps that cover an id in 0..vocab
    id_steps: u32,
    // 1: apply the penalty to the window (0: no penalty, no window)
    penalize: u32,
    // entries of seq's history ring, of `draws`
    hist_cap: u32,
    n_draws: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<u32>;
@group(0) @binding(2) var<storage, read_write> seq: array<u32>;
@group(0) @binding(3) var<storage, read> draws: array<f32>;
@group(0) @binding(4) var<storage, read_write> work: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<u32>;

const U_TINY: u32 = 1u;      // a penalized logit near the subnormal range
const U_TOP_P: u32 = 2u;     // top-p's cut within the margin
const U_MIN_P: u32 = 4u;     // a probability within the margin of min-p's floor
const U_DRAW: u32 = 8u;      // the draw within the margin of a boundary

var<workgroup> red: array<f32, WG>;
var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> a_max: atomic<u32>;
var<workgroup> a_min: atomic<u32>;
var<workgroup> a_len: atomic<u32>;
var<workgroup> a_flags: atomic<u32>;
var<workgroup> a_cnt: atomic<u32>;
// scalars shared between phases
var<workgroup> s_lo: u32;
var<workgroup> s_hi: u32;
var<workgroup> s_prefix: u32;
var<workgroup> s_want: u32;
var<workgroup> s_len: u32;
var<workgroup> s_need_id: u32;
var<workgroup> s_nfin: u32;
var<workgroup> a_tail: atomic<u32>;
var<workgroup> s_head: u32;

fn is_nan(b: u32) -> bool {
    return (b & 0x7fffffffu) > 0x7f800000u;
}

fn untkey(k: u32) -> u32 {
    return select(~k, k ^ 0x80000000u, (k & 0x80000000u) != 0u);
}

fn tiny(b: u32) -> bool {
    let a = b & 0x7fffffffu;
    return a != 0u && a < 0x03800000u; // below 2^-120
}

// Unit roundoff of f32.
const U: f32 = 5.9604645e-8;

// Compensated (Kahan) addition of x to (sum, compensation): each
// invocation's partial sum is then within 2 ulp of its terms' sum.
fn kadd(a: vec2<f32>, x: f32) -> vec2<f32> {
    let y = x - a.y;
    let t = a.x + y;
    return vec2<f32>(t, (t - a.x) - y);
}

// Relative error bound, in units of U, of exp(z) here against the host's
// f64 exp(x / t - max / t): WGSL's exp is within 3 + 2|z| ulp; rounding
// x - max, the f32 1/t and the product add |z| * 1.5 ulp; 1 more for luck.
fn ebound(z: f32) -> f32 {
    return (4.0 + 4.0 * abs(z)) * U;
}

fn wg_sum(lid: u32, x: f32) -> f32 {
    red[lid] = x;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let v = workgroupUniformLoad(&red[0]);
    workgroupBarrier();
    return v;
}

// Token (k, i) comes before or is (ck, ci) in the sampler's order.
fn upto(k: u32, i: u32, ck: u32, ci: u32) -> bool {
    return k > ck || (k == ck && i <= ci);
}

// Does list entry j take part in a search? `cut`: top-p's last token
// (ck, ci) bounds it; `minp`: its probability reaches min-p's floor.
fn member(j: u32, cut: bool, ck: u32, ci: u32, minp: bool) -> bool {
    let V = p.vocab;
    if (cut && !upto(work[2u * V + j], work[V + j], ck, ci)) {
        return false;
    }
    return !minp || bitcast<f32>(work[3u * V + j]) >= p.min_p;
}

// Mass of the members whose key is >= k (all: k = 0).
fn mass_from(lid: u32, k: u32, cut: bool, ck: u32, ci: u32, minp: bool) -> f32 {
    let V = p.vocab;
    var acc = vec2<f32>(0.0);
    for (var j = lid; j < s_len; j += WG) {
        if (work[2u * V + j] >= k && member(j, cut, ck, ci, minp)) {
            acc = kadd(acc, bitcast<f32>(work[3u * V + j]));
        }
    }
    return wg_sum(lid, acc.x);
}

// Mass of the members with key k and id <= i.
fn mass_group(lid: u32, k: u32, i: u32, cut: bool, ck: u32, ci: u32, minp: bool) -> f32 {
    let V = p.vocab;
    var acc = vec2<f32>(0.0);
    for (var j = lid; j < s_len; j += WG) {
        if (work[2u * V + j] == k && work[V + j] <= i && member(j, cut, ck, ci, minp)) {
            acc = kadd(acc, bitcast<f32>(work[3u * V + j]));
        }
    }
    return wg_sum(lid, acc.x);
}

// Mass of the members strictly before (k, i), and (k, i)'s own.
fn mass_before(lid: u32, k: u32, i: u32, cut: bool, ck: u32, ci: u32, minp: bool) -> vec2<f32> {
    let V = p.vocab;
    var b = vec2<f32>(0.0);
    var own = 0.0;
    for (var j = lid; j < s_len; j += WG) {
        if (member(j, cut, ck, ci, minp)) {
            let kj = work[2u * V + j];
            let ij = work[V + j];
            let e = bitcast<f32>(work[3u * V + j]);
            if (kj > k || (kj == k && ij < i)) {
                b = kadd(b, e);
            } else if (kj == k && ij == i) {
                own += e;
            }
        }
    }
    return vec2<f32>(wg_sum(lid, b.x), wg_sum(lid, own));
}

// The first token (key, id) in the sampler's order whose cumulative mass
// over the members exceeds `goal` (`strict`) or reaches it; `ok` false
// when that is not decided with margin `tol` (absolute) on both sides. No
// mass before it is exact on both sides (the tokens before it have no less
// probability than it, so none of them was rounded to 0 here).
struct Cut {
    k: u32,
    i: u32,
    ok: bool,
}

fn find_cut(lid: u32, goal: f32, strict: bool, tol: f32, cut: bool, ck: u32, ci: u32, minp: bool) -> Cut {
    let total = mass_from(lid, 0u, cut, ck, ci, minp);
    // bisection on the key: the largest k whose mass from k crosses
    if (lid == 0u) {
        s_lo = 0u;
        s_hi = 0xffffffffu;
    }
    workgroupBarrier();
    for (var it = 0u; it < 32u; it += 1u) {
        let lo = s_lo;
        let hi = s_hi;
        let mid = lo + ((hi - lo) >> 1u) + ((hi - lo) & 1u);
        let m = mass_from(lid, mid, cut, ck, ci, minp);
        if (lid == 0u && lo < hi) {
            if ((strict && m > goal) || (!strict && m >= goal)) {
                s_lo = mid;
            } else {
                s_hi = mid - 1u;
            }
        }
        workgroupBarrier();
    }
    let k = s_lo;
    let base = select(mass_from(lid, k + 1u, cut, ck, ci, minp), 0.0, k == 0xffffffffu);
    // bisection on the id within the key's group: the smallest id that crosses
    if (lid == 0u) {
        s_lo = 0u;
        s_hi = p.vocab - 1u;
    }
    workgroupBarrier();
    for (var it = 0u; it < p.id_steps; it += 1u) {
        let lo = s_lo;
        let hi = s_hi;
        let mid = lo + ((hi - lo) >> 1u);
        let m = base + mass_group(lid, k, mid, cut, ck, ci, minp);
        if (lid == 0u && lo < hi) {
            if ((strict && m > goal) || (!strict && m >= goal)) {
                s_hi = mid;
            } else {
                s_lo = mid + 1u;
            }
        }
        workgroupBarrier();
    }
    let i = s_lo;
    workgroupBarrier();
    let bo = mass_before(lid, k, i, cut, ck, ci, minp);

    let ok = ((strict && total > goal) || (!strict && total >= goal))
        && bo.y > 0.0 && (bo.x == 0.0 || bo.x <= goal - tol) && bo.x + bo.y >= goal + tol;
    return Cut(k, i, ok);
}

// One pass of `select_kth`'s MSB-first radix select, over byte `d` of the
// key (`ids` false: keys descending) or of the id among the ties of key
// `ck` (`ids` true: ids ascending): narrows s_prefix to the byte that holds
// the s_want-th token, and s_want to its rank within that byte's bucket.
fn radix_pass(lid: u32, d: u32, ids: bool, ck: u32) {
    let V = p.vocab;
    let shift = 24u - 8u * d;
    // the bits decided by earlier passes (none in the first)
    let hi_mask = select(0xffffffffu << ((shift + 8u) & 31u), 0u, d == 0u);
    for (var b = lid; b < 256u; b += WG) {
        atomicStore(&hist[b], 0u);
    }
    workgroupBarrier();
    let prefix = s_prefix;
    for (var i = lid; i < V; i += WG) {
        let b = work[i];
        let k = tkey(b);
        let v = select(k, i, ids);
        if (is_finite(b) && (!ids || k == ck) && (v & hi_mask) == prefix) {
            // buckets in scan order: keys descending, ids ascending
            let digit = (v >> shift) & 255u;
            atomicAdd(&hist[select(255u - digit, digit, ids)], 1u);
        }
    }
    workgroupBarrier();
    if (lid == 0u) {
        let w = s_want;
        var acc = 0u;
        for (var r = 0u; r < 256u; r += 1u) {
            let c = atomicLoad(&hist[r]);
            if (acc + c >= w) {
                s_want = w - acc;
                s_prefix = prefix | (select(255u - r, r, ids) << shift);
                if (!ids) {
                    // more ties at the threshold than the k-th needs
                    s_need_id = select(0u, 1u, d == 3u && w - acc < c);
                }
                break;
            }
            acc += c;
        }
    }
    workgroupBarrier();
}

// The `want`-th token (1-based) in the order (key descending, id
// ascending) among the finite penalized logits, as (key, id): a radix
// select on the key, then on the id within the key's ties.
fn select_kth(lid: u32, want: u32) -> vec2<u32> {
    if (lid == 0u) {
        s_want = want;
        s_prefix = 0u;
        s_need_id = 0u;
    }
    workgroupBarrier();
    for (var d = 0u; d < 4u; d += 1u) {
        radix_pass(lid, d, false, 0u);
    }
    let ck = s_prefix;
    var ci = 0xffffffffu;
    if (workgroupUniformLoad(&s_need_id) != 0u) {
        // the s_want-th smallest id among the key's ties
        if (lid == 0u) {
            s_prefix = 0u;
        }
        workgroupBarrier();
        for (var d = 0u; d < 4u; d += 1u) {
            radix_pass(lid, d, true, ck);
        }
        ci = s_prefix;
    }
    workgroupBarrier();
    return vec2<u32>(ck, ci);
}

// Write the step's output and append its pick to the history ring (every
// invocation read `seq` at the start, before the barriers since).
fn finish(lid: u32, hl: u32, st: u32, id: u32, why: u32, survivors: u32, left: u32) {
    if (lid == 0u) {
        out[0] = id;
        out[1] = why;
        out[2] = survivors;
        out[3] = left;
        seq[4u + hl % p.hist_cap] = id;
        seq[0] = hl + 1u;
        seq[1] = st + 1u;
    }
}

fn set_len(lid: u32, n: u32) {
    if (lid == 0u) {
        s_len = n;
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    let V = p.vocab;
    if (lid == 0u) {
        atomicStore(&a_max, 0u);
        atomicStore(&a_min, 0xffffffffu);
        atomicStore(&a_len, 0u);
        atomicStore(&a_flags, 0u);
        atomicStore(&a_cnt, 0u);
        atomicStore(&a_tail, 0u);
    }
    // the history and the step, as the host or the previous step left them
    let hl = seq[0];
    let st = seq[1];
    let row = seq[2] * V;
    var n_window = 0u;
    if (p.penalize != 0u) {
        n_window = min(select(min(p.last_n, hl), hl, p.last_n == 0u), p.hist_cap);
    }
    let w0 = hl - n_window;
    // The penalized row: a bit copy, then one multiply per window token. A
    // token the window holds twice is written twice with the same bits (the
    // product of its raw logit, read from `logits`), so the order does not
    // matter.
    for (var i = lid; i < V; i += WG) {
        work[i] = logits[row + i];
    }
    storageBarrier();
    workgroupBarrier();
    for (var e = lid; e < n_window; e += WG) {
        let id = seq[4u + (w0 + e) % p.hist_cap];
        if (id < V) {
            let lb = logits[row + id];
            let l = bitcast<f32>(lb);
            var q = l * p.inv_penalty;
            if (l < 0.0) {
                q = l * p.penalty;
            }
            let qb = bitcast<u32>(q);
            if (is_finite(lb) && (tiny(lb) || tiny(qb))) {
                atomicOr(&a_flags, U_TINY);
            }
            work[id] = qb;
        }
    }
    storageBarrier();
    workgroupBarrier();

    if (p.greedy != 0u) {
        // argmax: the first (smallest id) of the maximum; NaN never wins;
        // an all -inf (or all NaN) row gives 0, as on the host.
        for (var i = lid; i < V; i += WG) {
            let b = work[i];
            if (!is_nan(b)) {
                atomicMax(&a_max, gkey(b));
            }
        }
        workgroupBarrier();
        let km = atomicLoad(&a_max);
        for (var i = lid; i < V; i += WG) {
            let b = work[i];
            if (!is_nan(b) && gkey(b) == km) {
                atomicMin(&a_min, i);
            }
        }
        workgroupBarrier();
        let none = km <= gkey(0xff800000u);
        let id = select(atomicLoad(&a_min), 0u, none);
        finish(lid, hl, st, id, atomicLoad(&a_flags) & U_TINY, 0u, 0u);
        return;
    }

    // the finite count and the maximum
    var nfin = 0u;
    for (var i = lid; i < V; i += WG) {
        let b = work[i];
        if (is_finite(b)) {
            nfin += 1u;
            atomicMax(&a_max, tkey(b));
        }
    }
    atomicAdd(&a_cnt, nfin);
    workgroupBarrier();
    if (lid == 0u) {
        s_nfin = atomicLoad(&a_cnt);
    }
    let n_fin = workgroupUniformLoad(&s_nfin);
    let m = bitcast<f32>(untkey(atomicLoad(&a_max)));
    // top-k: the k-th token in the order (key descending, id ascending)
    var ck = 0u;
    var ci = 0xffffffffu;
    if (p.top_k != 0u && p.top_k < n_fin) {
        let c = select_kth(lid, p.top_k);
        ck = c.x;
        ci = c.y;
    }
    // The survivors' list with exp((x - max) / t), the head first: the
    // survivors with z = (x - max) / t >= -16 by key, a prefix of the
    // order. A search whose goal falls within the head's mass (the usual
    // top-p nucleus and draw of a language model) runs over the head alone.
    let head_key = tkey(bitcast<u32>(m - 16.0 / p.inv_t));
    var part = vec2<f32>(0.0);
    var phead = vec2<f32>(0.0);
    var perr = vec2<f32>(0.0);
    for (var round = 0u; round < 2u; round += 1u) {
        let n_head = atomicLoad(&a_len);
        for (var i = lid; i < V; i += WG) {
            let b = work[i];
            if (is_finite(b) && upto(tkey(b), i, ck, ci)) {
                let in_head = tkey(b) >= head_key;
                if (in_head != (round == 0u)) {
                    continue;
                }
                var j = 0u;
                if (in_head) {
                    j = atomicAdd(&a_len, 1u);
                } else {
                    j = n_head + atomicAdd(&a_tail, 1u);
                }
                let x = bitcast<f32>(b);
                let z = (x - m) * p.inv_t;
                let e = select(exp(z), 1.0, x == m);
                work[V + j] = i;
                work[2u * V + j] = tkey(b);
                work[3u * V + j] = bitcast<u32>(e);
                part = kadd(part, e);
                if (in_head) {
                    phead = kadd(phead, e);
                }
                // this probability's error bound against the host's f64 value
                perr = kadd(perr, e * ebound(z));
            }
        }
        workgroupBarrier();
        if (lid == 0u) {
            s_head = atomicLoad(&a_len);
        }
    }
    let n_head = workgroupUniformLoad(&s_head);
    storageBarrier();
    workgroupBarrier();
    if (lid == 0u) {
        s_len = atomicLoad(&a_len) + atomicLoad(&a_tail);
    }
    workgroupBarrier();
    let total = wg_sum(lid, part.x);
    let head_total = wg_sum(lid, phead.x);
    let n_list = workgroupUniformLoad(&s_len);
    // Every sum below is over a subset of the list, so it is within `bound`
    // of the host's f64 sum: the probabilities' errors, and the summation's
    // (2 ulp per compensated partial, log2(WG) for the tree, 2 spare).
    let bound = wg_sum(lid, perr.x) + (4.0 + log2(f32(WG))) * U * total;
    let tol = p.tol * bound;

    var flags = 0u;
    var cut = false;
    var pk = 0u;
    var pi = 0u;
    // the list entries the filters below can keep
    var scope = n_list;
    if (n_list > 0u && p.top_p < 1.0) {
        let goal = p.top_p * total;
        // The head is a prefix of the order: a cut it reaches is the cut,
        // and then every token left is in it (when the cut is not decided,
        // the host samples the step anyway).
        scope = select(n_list, n_head, head_total >= goal);
        set_len(lid, scope);
        let c = find_cut(lid, goal, false, tol, false, 0u, 0u, false);
        cut = true;
        pk = c.k;
        pi = c.i;
        if (!c.ok) {
            flags |= U_TOP_P;
        }
    }
    let minp = p.min_p > 0.0;
    if (n_list > 0u && minp) {
        // every floor decision away from the margin (the maximum's own
        // probability is exactly 1 on both sides)
        let top = atomicLoad(&a_max);
        for (var j = lid; j < scope; j += WG) {
            if (member(j, cut, pk, pi, false)) {
                let e = bitcast<f32>(work[3u * V + j]);
                let x = bitcast<f32>(untkey(work[2u * V + j]));
                let exact = work[2u * V + j] == top || x == m;
                let z = (x - m) * p.inv_t;
                if (!exact && abs(e - p.min_p) <= p.tol * (ebound(z) * e + U * p.min_p)) {
                    atomicOr(&a_flags, U_MIN_P);
                }
            }
        }
    }
    // the draw: the first token whose cumulative mass exceeds r * mass
    var id = 0u;
    var left = 0u;
    if (n_list > 0u) {
        var cnt = 0u;
        for (var j = lid; j < scope; j += WG) {
            if (member(j, cut, pk, pi, minp)) {
                cnt += 1u;
            }
        }
        atomicStore(&a_cnt, 0u);
        workgroupBarrier();
        atomicAdd(&a_cnt, cnt);
        let s = mass_from(lid, 0u, cut, pk, pi, minp);
        let goal = draws[min(st, p.n_draws - 1u)] * s;
        set_len(lid, n_head);
        let sh = mass_from(lid, 0u, cut, pk, pi, minp);
        set_len(lid, select(scope, n_head, sh > goal));
        let c = find_cut(lid, goal, true, tol, cut, pk, pi, minp);
        id = c.i;
        left = atomicLoad(&a_cnt);
        if (!c.ok) {
            flags |= U_DRAW;
        }
    }
    workgroupBarrier();
    finish(lid, hl, st, id, flags | atomicLoad(&a_flags), n_list, left);
}
