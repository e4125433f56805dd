//! Token sampling from logits, in Hugging Face transformers' order:
//! repetition penalty, then temperature, top-k, top-p, min-p, then a draw.
//! Temperature 0 is greedy (first index of the maximum, like torch.argmax).

use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
pub use crate::ops::sample_full::Draw;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off. HF semantics: a seen token's logit is divided by the
    /// penalty when positive and multiplied when negative.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at (0 = all).
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, v: String, want: &str| {
            Err(Error::invalid(format!("--{f} {v}: expected {want}")))
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                self.temperature.to_string(),
                "a finite value >= 0",
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top-p", self.top_p.to_string(), "a value in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min-p", self.min_p.to_string(), "a value in [0, 1]");
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return bad(
                "repeat-penalty",
                self.repeat_penalty.to_string(),
                "a finite value > 0",
            );
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: rand_chacha::ChaCha8Rng,
}

/// Index of the first maximum; NaN never wins.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x > bv {
            bv = x;
            best = i;
        }
    }
    best as u32
}

/// The id at uniform `r` of the cumulative distribution `probs` (in its
/// order): the first whose cumulative probability exceeds `r`, else the last.
fn pick(probs: &[(u32, f64)], r: f64) -> u32 {
    let mut acc = 0f64;
    for &(i, p) in probs {
        acc += p;
        if r < acc {
            return i;
        }
    }
    probs.last().map(|&(i, _)| i).unwrap_or(0)
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = rand_chacha::ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng })
    }

    /// The penalty's window of `history`: its distinct ids in order of
    /// first appearance (empty without a penalty).
    pub fn window(&self, history: &[u32]) -> Vec<u32> {
        if self.params.repeat_penalty == 1.0 {
            return Vec::new();
        }
        let n = self.params.repeat_last_n;
        let recent = if n == 0 || history.len() <= n {
            history
        } else {
            &history[history.len() - n..]
        };
        let mut seen = std::collections::HashSet::new();
        recent.iter().copied().filter(|&t| seen.insert(t)).collect()
    }

    /// The penalty of one logit, HF's rule (a negative logit times the
    /// penalty, any other divided by it) with the division done as a
    /// multiply by `1 / penalty` rounded to f32 once: within 1 ulp of HF's
    /// quotient, and one correctly rounded multiply, so the GPU sampler
    /// (`ops::sample_full`) computes the same bits on every device.
    fn penalized(&self, l: f32) -> f32 {
        let p = self.params.repeat_penalty;
        if l < 0.0 {
            l * p
        } else {
            l * (1.0 / p)
        }
    }

    /// The GPU sampler's settings for the next step and the penalty window
    /// of `history`, or None where the kernel does not take them (a window
    /// over `ops::sample_full::MAX_WINDOW` ids, a min-p under its floor).
    /// Draws the step's uniform from the RNG (none for greedy), exactly as
    /// [`Self::sample`] would: pass the same [`Draw`] to
    /// [`Self::sample_drawn`] to sample that step on the host instead.
    pub fn gpu_step(&mut self, history: &[u32]) -> Option<(Draw, Vec<u32>)> {
        let window = self.window(history);
        let mut d = self.gpu_settings()?;
        if !d.supported(window.len()) {
            return None;
        }
        if !self.params.is_greedy() {
            d.r = self.rng.random::<f64>();
        }
        Some((d, window))
    }

    /// The GPU sampler's settings for a whole generation (`r` 0: the
    /// uniforms come from [`Self::draw_table`]), or None where the kernel
    /// does not take them (a min-p under its floor).
    pub fn gpu_settings(&self) -> Option<Draw> {
        let d = Draw {
            temperature: self.params.temperature,
            top_k: self.params.top_k,
            top_p: self.params.top_p,
            min_p: self.params.min_p,
            penalty: self.params.repeat_penalty,
            r: 0.0,
        };
        d.supported(0).then_some(d)
    }

    /// The penalty's window as the GPU sampler's history ring takes it:
    /// None without a penalty, else the last `repeat_last_n` tokens (0:
    /// all), the ids [`Self::window`] keeps.
    pub fn penalty_last_n(&self) -> Option<usize> {
        (self.params.repeat_penalty != 1.0).then_some(self.params.repeat_last_n)
    }

    /// The uniforms of the next `steps` steps, drawn now from the RNG in
    /// the order [`Self::sample`] would draw them (one per step; none for
    /// greedy): step k of a generation sampled with `r = table[k]`
    /// ([`Self::sample_drawn`]) gives the ids of `steps` calls of
    /// [`Self::sample`].
    pub fn draw_table(&mut self, steps: usize) -> Vec<f64> {
        if self.params.is_greedy() {
            return Vec::new();
        }
        (0..steps).map(|_| self.rng.random::<f64>()).collect()
    }

    /// [`Self::sample`] with the step's uniform already drawn (`d.r`, from
    /// [`Self::gpu_step`]): the id the GPU sampler would have given.
    pub fn sample_drawn(&self, logits: &[f32], history: &[u32], d: &Draw) -> u32 {
        let mut l = logits.to_vec();
        self.penalize(&mut l, history);
        if self.params.is_greedy() {
            return argmax(&l);
        }
        let probs = self.distribution(&l);
        pick(&probs, d.r)
    }

    /// Apply the repetition penalty to `logits` for the tokens in `history`.
    pub fn penalize(&self, logits: &mut [f32], history: &[u32]) {
        for t in self.window(history) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = self.penalized(*l);
            }
        }
    }

    /// What [`Self::sample_candidates`] needs from the GPU's candidate
    /// kernel (`ops::sample`): the `want` largest raw logits and the raw
    /// logits of the penalty window's ids. None where the candidates cannot
    /// stand for the row: top-k off (every token can be drawn), or a
    /// request larger than the kernel's output.
    pub fn candidate_request(&self, history: &[u32]) -> Option<(usize, Vec<u32>)> {
        use crate::ops::sample::{CAP, MAX_EXTRA};
        let k = if self.params.is_greedy() {
            1
        } else {
            self.params.top_k
        };
        let window = self.window(history);
        let want = k + window.len();
        (k > 0 && want <= CAP && window.len() <= MAX_EXTRA).then_some((want, window))
    }

    /// [`Self::sample`] from candidates instead of the whole row: `cands`
    /// are (id, raw logit) pairs holding at least the row's top-k after the
    /// penalty (what [`Self::candidate_request`] asks the GPU for; the
    /// argument is in `ops::sample`). The penalty, the order, the f64
    /// arithmetic and the draw are those of [`Self::sample`] on the same
    /// values, so the id and the RNG stream are the same.
    pub fn sample_candidates(&mut self, cands: &[(u32, f32)], history: &[u32]) -> u32 {
        let mut v = cands.to_vec();
        for t in self.window(history) {
            if let Some(c) = v.iter_mut().find(|c| c.0 == t) {
                c.1 = self.penalized(c.1);
            }
        }
        if self.params.is_greedy() {
            // argmax's rule: the first (smallest id) of the maximum; NaN
            // never wins.
            let mut best: Option<(u32, f32)> = None;
            for &(i, x) in &v {
                match best {
                    Some((bi, bx)) if !(x > bx || (x == bx && i < bi)) => {}
                    _ if x.is_nan() => {}
                    _ => best = Some((i, x)),
                }
            }
            return best.map_or(0, |b| b.0);
        }
        let probs = self.distribution_of(v.into_iter());
        self.draw(&probs)
    }

    /// Choose the next token from `logits` given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut l = logits.to_vec();
        self.penalize(&mut l, history);
        if self.params.is_greedy() {
            return argmax(&l);
        }
        let probs = self.distribution(&l);
        self.draw(&probs)
    }

    /// One uniform draw from `probs` (the RNG's next f64).
    fn draw(&mut self, probs: &[(u32, f64)]) -> u32 {
        let r: f64 = self.rng.random::<f64>();
        pick(probs, r)
    }

    /// The filtered, renormalized distribution (token, probability), sorted
    /// by descending probability.
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        self.distribution_of(logits.iter().enumerate().map(|(i, &x)| (i as u32, x)))
    }

    /// [`Self::distribution`] over (id, logit) pairs in any order (the
    /// result does not depend on it: ids are unique and the sort is total).
    fn distribution_of(&self, logits: impl Iterator<Item = (u32, f32)>) -> Vec<(u32, f64)> {
        let p = &self.params;
        let t = p.temperature.max(1e-6) as f64;
        let mut v: Vec<(u32, f64)> = logits
            .filter(|(_, x)| x.is_finite())
            .map(|(i, x)| (i, x as f64 / t))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && v.len() > p.top_k {
            v.truncate(p.top_k);
        }
        // softmax over the survivors
        let max = v.first().map(|x| x.1).unwrap_or(0.0);
        let mut sum = 0f64;
        for x in v.iter_mut() {
            x.1 = (x.1 - max).exp();
            sum += x.1;
        }
        for x in v.iter_mut() {
            x.1 /= sum;
        }
        if p.top_p < 1.0 {
            // keep the smallest prefix whose mass reaches top_p (at least one)
            let mut acc = 0f64;
            let mut keep = v.len();
            for (i, x) in v.iter().enumerate() {
                acc += x.1;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            v.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let top = v.first().map(|x| x.1).unwrap_or(0.0);
            let floor = top * p.min_p as f64;
            v.retain(|x| x.1 >= floor);
        }
        let s: f64 = v.iter().map(|x| x.1).sum();
        for x in v.iter_mut() {
            x.1 /= s;
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(f: impl FnOnce(&mut SamplingParams)) -> Sampler {
        let mut p = SamplingParams::default();
        f(&mut p);
        Sampler::new(p).unwrap()
    }

    #[test]
    fn greedy_takes_first_max() {
        let mut s = sampler(|_| {});
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, f32::NAN], &[]), 1);
    }

    #[test]
    fn repetition_penalty_follows_hf() {
        let s = sampler(|p| p.repeat_penalty = 2.0);
        let mut l = vec![4.0, -4.0, 4.0];
        s.penalize(&mut l, &[0, 1, 1]);
        assert_eq!(l, vec![2.0, -8.0, 4.0]);
    }

    #[test]
    fn filters() {
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        let d = sampler(|p| {
            p.temperature = 1.0;
            p.top_k = 2;
        })
        .distribution(&logits);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2]);
        let e1 = std::f64::consts::E;
        assert!((d[0].1 - e1 / (e1 + 1.0)).abs() < 1e-12);
        // top_p 0.5: the top token alone has 0.64 of the mass
        let d = sampler(|p| {
            p.temperature = 1.0;
            p.top_p = 0.5;
        })
        .distribution(&logits);
        assert_eq!(d.len(), 1);
        // min_p 0.3 keeps tokens with p >= 0.3 * p_max: 3 (1.0) and 2 (0.37)
        let d = sampler(|p| {
            p.temperature = 1.0;
            p.min_p = 0.3;
        })
        .distribution(&logits);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_probabilities() {
        let logits = [0.0f32, (3.0f32).ln()];
        let draw = |seed| {
            let mut s = sampler(|p| {
                p.temperature = 1.0;
                p.seed = seed;
            });
            (0..4000)
                .map(|_| s.sample(&logits, &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        // p(1) = 0.75; 4000 draws give a standard error of ~0.007
        assert!((ones - 0.75).abs() < 0.035, "{ones}");
    }

    /// Parameters (temperature, top-k, top-p, min-p, penalty, last n) with
    /// a seed of their own, and two samplers of them (whose RNG streams the
    /// tests hold in step).
    fn samplers(
        set: (f32, usize, f32, f32, f32, usize),
        seed: u64,
    ) -> (SamplingParams, Sampler, Sampler) {
        let (temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n) = set;
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            repeat_last_n,
            seed: seed * 1000 + top_k as u64,
        };
        let a = Sampler::new(params.clone()).unwrap();
        let b = Sampler::new(params.clone()).unwrap();
        (params, a, b)
    }

    /// The exactness claim: over many seeds and parameters, sampling from
    /// the GPU's candidates gives exactly the id (and consumes exactly the
    /// RNG stream) of sampling from the whole row.
    #[test]
    fn sampling_from_candidates_is_sampling_from_the_row() {
        let g = crate::testutil::gpu();
        let vocab = 2000;
        let mut checked = 0;
        for seed in 0..12u64 {
            let mut l = crate::testutil::rand_vec(vocab, 6.0, 100 + seed);
            if seed % 3 == 0 {
                for x in l.iter_mut() {
                    *x = (*x * 4.0).round() / 4.0; // ties
                }
            }
            let history: Vec<u32> = (0..40)
                .map(|i| ((i * 37 + seed * 11) % 2000) as u32)
                .collect();
            for (temperature, top_k, top_p, min_p, penalty, last_n) in [
                (0.0f32, 0usize, 1.0f32, 0.0f32, 1.3f32, 64usize),
                (0.0, 0, 1.0, 0.0, 0.7, 16),
                (0.8, 1, 1.0, 0.0, 1.0, 64),
                (0.8, 40, 1.0, 0.0, 1.0, 64),
                (1.0, 40, 0.9, 0.0, 1.1, 64),
                (0.6, 200, 0.95, 0.05, 1.2, 0),
                (1.5, 10, 0.5, 0.2, 0.8, 8),
                (0.7, 64, 1.0, 0.1, 1.0, 64),
            ] {
                let set = (temperature, top_k, top_p, min_p, penalty, last_n);
                let (params, mut full, mut part) = samplers(set, seed);
                let (want, window) = part.candidate_request(&history).expect("GPU-able");
                let c = crate::ops::sample::candidates_once(g, &l, want, &window).unwrap();
                assert!(!c.overflow);
                let cands = c.with_extra(&window);
                // several draws: the RNG streams stay in step
                for _ in 0..5 {
                    let a = full.sample(&l, &history);
                    let b = part.sample_candidates(&cands, &history);
                    assert_eq!(a, b, "{params:?}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 12 * 8 * 5);
    }

    /// The claim for the GPU sampler (`ops::sample_full`), over many seeds and parameter sets (top-p without
    /// top-k, min-p, the penalty both ways, greedy with a penalty, ties):
    /// the GPU sampler gives exactly the CPU sampler's ids, with the RNG
    /// streams in step, and decides nearly every step itself.
    #[test]
    fn gpu_sampling_gives_the_cpu_samplers_ids() {
        let sets = [
            (0.0f32, 0usize, 1.0f32, 0.0f32, 1.3f32, 64usize),
            (0.0, 0, 1.0, 0.0, 0.7, 16),
            (1.0, 0, 1.0, 0.0, 1.0, 64),
            (0.8, 0, 0.9, 0.0, 1.0, 64),
            (1.2, 0, 1.0, 0.05, 1.0, 64),
            (0.7, 0, 0.95, 0.02, 1.2, 0),
            (3.0, 0, 0.99, 0.0, 1.0, 64),
            (1.0, 1, 1.0, 0.0, 1.0, 64),
            (1.0, 40, 1.0, 0.0, 1.0, 64),
            (1.0, 40, 0.9, 0.0, 1.1, 64),
            (1.5, 10, 0.5, 0.2, 0.8, 8),
            (0.6, 200, 0.95, 0.05, 1.2, 0),
        ];
        let (mut checked, mut undecided, mut sampled) = (0usize, 0usize, 0usize);
        let mut distinct = std::collections::HashSet::new();
        for (vocab, seeds) in [(2000usize, 0..10u64), (49_152, 10..12)] {
            let rig = crate::ops::sample_full::tests::Rig::new(vocab);
            for seed in seeds {
                // a peaked row, as a language model's: a few tokens well
                // above a broad tail
                let mut l = crate::testutil::rand_vec(vocab, 4.0, 100 + seed);
                for (j, x) in l.iter_mut().enumerate().filter(|(j, _)| j % 97 == 5) {
                    *x += 4.0 + (j % 7) as f32;
                }
                if seed % 3 == 0 {
                    for x in l.iter_mut() {
                        *x = (*x * 4.0).round() / 4.0; // ties
                    }
                }
                let history: Vec<u32> = (0..80)
                    .map(|i| ((i * 37 + seed * 11) % vocab as u64) as u32)
                    .collect();
                for set in sets {
                    let (temperature, top_k) = (set.0, set.1);
                    let (params, mut full, mut gpu_s) = samplers(set, seed);
                    let mut pen = l.clone();
                    full.penalize(&mut pen, &history);
                    let dist = full.distribution(&pen);
                    for _ in 0..4 {
                        let want = full.sample(&l, &history);
                        let (d, w) = gpu_s.gpu_step(&history).expect("GPU-able");
                        let pk = rig.run(&l, &d, &w);
                        let got = if pk.uncertain() {
                            undecided += 1;
                            eprintln!("undecided {vocab} {params:?} r {} {pk:?}", d.r);
                            gpu_s.sample_drawn(&l, &history, &d)
                        } else {
                            pk.id
                        };
                        assert_eq!(got, want, "vocab {vocab} {params:?} {pk:?}");
                        if temperature > 0.0 && !pk.uncertain() {
                            // the kernel's sets are the host's
                            let finite = pen.iter().filter(|x| x.is_finite()).count();
                            let k = if top_k == 0 {
                                finite
                            } else {
                                top_k.min(finite)
                            };
                            assert_eq!(pk.survivors as usize, k, "{params:?}");
                            assert_eq!(pk.drawn_from as usize, dist.len(), "{params:?}");
                            sampled += 1;
                        }
                        distinct.insert((vocab, seed, got));
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 12 * sets.len() * 4);
        // The margin is 2e-4 of the mass: undecided steps are rare; if the
        // kernel flagged most steps it would be the host that samples.
        assert!(
            undecided * 20 <= checked,
            "{undecided} of {checked} steps were left to the host"
        );
        assert!(
            sampled > checked / 2,
            "only {sampled} sampled steps decided"
        );
        assert!(distinct.len() > 100, "only {} distinct ids", distinct.len());
    }

    /// The GPU-resident state of a generation (`GpuSampler::begin`): the
    /// window is the tail of a history ring the kernel appends its picks to
    /// (duplicates and all, as `Sampler::window` reads the history), the
    /// uniform is the next entry of the table drawn up front, and a host
    /// decision written back (`fix`) is what the next steps see. Over
    /// several steps of changing rows, the ids are the CPU sampler's.
    #[test]
    fn gpu_history_ring_and_draw_table_give_the_cpu_samplers_ids() {
        let vocab = 3000;
        let rig = crate::ops::sample_full::tests::Rig::new(vocab);
        let (mut checked, mut fixed) = (0, 0);
        for (seed, temperature, top_p, penalty, last_n) in [
            (1u64, 0.0f32, 1.0f32, 1.5f32, 8usize),
            (2, 0.9, 0.95, 1.3, 0),
            (3, 1.1, 1.0, 0.7, 5),
            (4, 0.8, 0.9, 1.0, 64),
        ] {
            let params = SamplingParams {
                temperature,
                top_p,
                repeat_penalty: penalty,
                repeat_last_n: last_n,
                seed,
                ..Default::default()
            };
            let mut cpu = Sampler::new(params.clone()).unwrap();
            let mut gpu_s = Sampler::new(params.clone()).unwrap();
            // a history with repeats, which the penalty counts once
            let mut history: Vec<u32> = (0..30).map(|i| (i * 7 % 11) as u32 * 13).collect();
            let d = gpu_s.gpu_settings().unwrap();
            let draws = gpu_s.draw_table(24);
            let table: Vec<f32> = draws.iter().map(|&r| r as f32).collect();
            let at = rig.begin(&d, gpu_s.penalty_last_n(), &history, &table);
            for k in 0..24 {
                let mut l = crate::testutil::rand_vec(vocab, 3.0, 1000 * seed + k as u64);
                // the history's tokens high, so the penalty decides
                for &t in &history[history.len() - 6..] {
                    l[t as usize] += 6.0;
                }
                let want = cpu.sample(&l, &history);
                let pk = rig.step(&l);
                let dk = Draw {
                    r: draws.get(k).copied().unwrap_or(0.0),
                    ..d
                };
                let got = if pk.uncertain() {
                    gpu_s.sample_drawn(&l, &history, &dk)
                } else {
                    pk.id
                };
                assert_eq!(got, want, "{params:?} step {k} {pk:?}");
                // every 7th step the host takes another id (a roll back)
                let id = if k % 7 == 3 {
                    (got + 1) % vocab as u32
                } else {
                    got
                };
                if id != pk.id {
                    rig.fix(at + k, k, id);
                    fixed += 1;
                }
                history.push(id);
                checked += 1;
            }
        }
        assert_eq!(checked, 4 * 24);
        assert!(fixed >= 4 * 3);
    }

    #[test]
    fn bad_params_are_errors() {
        for f in [
            (|p: &mut SamplingParams| p.temperature = -1.0) as fn(&mut SamplingParams),
            |p| p.top_p = 0.0,
            |p| p.min_p = 2.0,
            |p| p.repeat_penalty = 0.0,
        ] {
            let mut p = SamplingParams::default();
            f(&mut p);
            assert!(Sampler::new(p).is_err());
        }
    }
}
