//! Token sampling from logits, in Hugging Face transformers' order:
//! repetition penalty, then temperature, top-k, top-p, min-p, then a draw.
//! Temperature 0 is greedy (first index of the maximum, like torch.argmax).

use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

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

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = rand_chacha::ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng })
    }

    /// Apply the repetition penalty to `logits` for the tokens in `history`.
    pub fn penalize(&self, logits: &mut [f32], history: &[u32]) {
        let p = self.params.repeat_penalty;
        if p == 1.0 {
            return;
        }
        let n = self.params.repeat_last_n;
        let recent = if n == 0 || history.len() <= n {
            history
        } else {
            &history[history.len() - n..]
        };
        let mut seen = std::collections::HashSet::new();
        for &t in recent {
            if let Some(l) = logits.get_mut(t as usize) {
                if seen.insert(t) {
                    *l = if *l < 0.0 { *l * p } else { *l / p };
                }
            }
        }
    }

    /// Choose the next token from `logits` given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut l = logits.to_vec();
        self.penalize(&mut l, history);
        if self.params.is_greedy() {
            return argmax(&l);
        }
        let probs = self.distribution(&l);
        let r: f64 = self.rng.random::<f64>();
        let mut acc = 0f64;
        for &(i, p) in &probs {
            acc += p;
            if r < acc {
                return i;
            }
        }
        probs.last().map(|&(i, _)| i).unwrap_or(0)
    }

    /// The filtered, renormalized distribution (token, probability), sorted
    /// by descending probability.
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let p = &self.params;
        let t = p.temperature.max(1e-6) as f64;
        let mut v: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, x)| x.is_finite())
            .map(|(i, &x)| (i as u32, x as f64 / t))
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
