//! Continuous batching: the scheduler that owns the engine's sequence slots.
//!
//! Requests wait in a queue; each [`Scheduler::step`] drops sequences whose
//! client went away, admits waiting requests into free slots (prefix reuse,
//! then the prefill of the rest of the prompt), and advances every active
//! sequence by one token in ONE forward pass. Each sequence samples with its
//! own seeded [`Sampler`]: on the device where the engine has a sampler per
//! slot ([`Engine::decode_picks`]: only each row's pick comes back, the CPU
//! sampler's id for the same seed), else on the host from the row
//! ([`Engine::decode_batch`]). It applies its stop ids and stop
//! strings (a stop string is never emitted: text that could be the start of
//! one is held back), and reports text, log-probabilities and usage through
//! its own event channel.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::error::{Error, Result};
pub use crate::model::{BatchPicks, SlotPick, SlotStep};
use crate::sampling::{Draw, Sampler, SamplingParams};

/// What the scheduler needs from a model: `slots()` independent KV caches.
pub trait Engine {
    fn slots(&self) -> usize;
    /// Positions one slot can hold.
    fn max_context(&self) -> usize;
    /// Tokens the slot's cache holds.
    fn slot_position(&self, slot: usize) -> usize;
    /// Keep the first `n` cached tokens of the slot (0 = empty).
    fn slot_truncate(&mut self, slot: usize, n: usize) -> Result<()>;
    /// Append `tokens` to the slot; the last position's logits.
    fn prefill_slot(&mut self, slot: usize, tokens: &[u32]) -> Result<Vec<f32>>;
    /// One forward pass appending one token to each listed slot; the logits
    /// per entry, in order.
    fn decode_batch(&mut self, steps: &[(usize, u32)]) -> Result<Vec<Vec<f32>>>;
    /// Logits per row.
    fn vocab_size(&self) -> usize;
    /// Whether the engine samples on the device ([`Self::begin_slot_sampling`],
    /// [`Self::decode_picks`]); else the scheduler reads every row with
    /// [`Self::decode_batch`] and samples it on the host.
    fn device_sampling(&self) -> bool;
    /// Set up the slot's device sampler for a sequence: its settings (`r`
    /// unused, no repetition penalty) and the uniform of each of its decode
    /// steps, drawn from its seeded sampler.
    fn begin_slot_sampling(&mut self, slot: usize, d: &Draw, draws: &[f32]) -> Result<()>;
    /// One forward pass as [`Self::decode_batch`], reading back per row its
    /// finiteness and its pick (the device sampler's, or the argmax), and
    /// the logits only of the rows that ask for them or whose pick the
    /// device left to the host.
    fn decode_picks(&mut self, steps: &[SlotStep]) -> Result<BatchPicks>;
}

/// Token ids to text (the tokenizer, or a fake in tests).
pub trait TextDecoder {
    /// The text of a generated sequence as it continues its prompt
    /// (special tokens skipped; a SentencePiece first word keeps its space:
    /// [`crate::tokenizer::Tokenizer::decode_continuation`]).
    fn decode(&self, prompt: &[u32], ids: &[u32]) -> Result<String>;
    /// One token as text, for log-probabilities (special tokens kept).
    fn token_text(&self, id: u32) -> String;
}

impl TextDecoder for crate::tokenizer::Tokenizer {
    fn decode(&self, prompt: &[u32], ids: &[u32]) -> Result<String> {
        self.decode_continuation(prompt, ids)
    }
    fn token_text(&self, id: u32) -> String {
        crate::tokenizer::Tokenizer::decode(self, &[id]).unwrap_or_default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens taken from a slot's cache (not prefilled again).
    pub cached_tokens: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
}

/// One generated token's log-probability under the model (log-softmax of
/// the raw logits in f64, before temperature and top-p), and the `top` most
/// likely tokens at that step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub top: Vec<TopLogprob>,
    /// Byte offset of the token's text in the completion text.
    pub text_offset: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// New text (possibly empty when only log-probabilities are new).
    Delta {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    /// The request failed (engine error, shutdown); nothing follows.
    Error(String),
}

/// A validated generation request.
pub struct GenRequest {
    pub prompt: Vec<u32>,
    /// At least 1; prompt + max_tokens fits one slot's context.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// `Some(n)`: report each token's log-probability and the top `n`.
    pub logprobs: Option<usize>,
    pub arrived: Instant,
    pub events: UnboundedSender<Event>,
}

/// How a sequence's decode steps pick their token.
enum Picks {
    /// The host samples every row ([`Engine::decode_batch`], or a row read
    /// back with [`Engine::decode_picks`]).
    Host,
    /// The device's argmax (greedy).
    Argmax,
    /// The slot's device sampler, with the uniforms of the decode steps (a
    /// step left to the host is sampled there with the same uniform).
    Device { d: Draw, draws: Vec<f64> },
}

#[derive(Debug, Default)]
struct Slot {
    /// The token ids the engine's cache holds for this slot.
    cached: Vec<u32>,
    busy: bool,
    last_used: u64,
}

struct Seq {
    slot: usize,
    req: GenRequest,
    sampler: Sampler,
    generated: Vec<u32>,
    /// The latest complete decode of `generated` (not ending mid-character).
    text: String,
    /// Bytes of `text` sent to the client.
    emitted: usize,
    /// Log-probabilities not yet sent (sent with the text they belong to).
    pending_lp: Vec<TokenLogprob>,
    /// The sampled token to feed in the next decode step.
    next: u32,
    picks: Picks,
    /// Decode steps run (the index of the next one's uniform).
    steps: usize,
    cached_tokens: usize,
    last_token: Instant,
}

pub struct Scheduler<E: Engine, D: TextDecoder> {
    pub engine: E,
    dec: D,
    stop_ids: Vec<u32>,
    metrics: Arc<Metrics>,
    slots: Vec<Slot>,
    pending: VecDeque<GenRequest>,
    active: Vec<Seq>,
    tick: u64,
    /// Requests submitted and not yet admitted (the HTTP side bounds it).
    queue_depth: Arc<AtomicUsize>,
}

/// Log-softmax of `logits` at `id` in f64, and the `top` most likely tokens.
pub fn logprobs(logits: &[f32], id: u32, top: usize) -> (f64, Vec<(u32, f64)>) {
    let max = logits
        .iter()
        .filter(|x| x.is_finite())
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum: f64 = logits
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| (x as f64 - max).exp())
        .sum();
    let lse = max + sum.ln();
    let lp = |i: usize| logits[i] as f64 - lse;
    let mut best = Vec::new();
    if top > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let n = top.min(idx.len());
        if n < idx.len() {
            idx.select_nth_unstable_by(n - 1, by);
            idx.truncate(n);
        }
        idx.sort_by(by);
        best = idx.into_iter().map(|i| (i, lp(i as usize))).collect();
    }
    (lp(id as usize), best)
}

/// The byte index of the earliest stop string in `text[from..]`.
fn find_stop(text: &str, from: usize, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text[from..].find(s.as_str()).map(|p| from + p))
        .min()
}

/// How many trailing bytes of `text[from..]` are the start of a stop string
/// (to hold back until the next token decides).
fn stop_prefix_len(text: &str, from: usize, stops: &[String]) -> usize {
    let tail = &text[from..];
    let mut best = 0;
    for s in stops {
        // Proper prefixes of s, longest first, on char boundaries of both.
        let ends: Vec<usize> = s.char_indices().skip(1).map(|(k, _)| k).collect();
        for &k in ends.iter().rev() {
            if k <= best {
                break;
            }
            if tail.ends_with(&s[..k]) {
                best = k;
                break;
            }
        }
    }
    best
}

impl<E: Engine, D: TextDecoder> Scheduler<E, D> {
    pub fn new(
        engine: E,
        dec: D,
        stop_ids: Vec<u32>,
        metrics: Arc<Metrics>,
        queue_depth: Arc<AtomicUsize>,
    ) -> Self {
        let slots = (0..engine.slots()).map(|_| Slot::default()).collect();
        metrics.set_ready(engine.slots(), engine.slots() * engine.max_context());
        Scheduler {
            engine,
            dec,
            stop_ids,
            metrics,
            slots,
            pending: VecDeque::new(),
            active: Vec::new(),
            tick: 0,
            queue_depth,
        }
    }

    pub fn submit(&mut self, req: GenRequest) {
        self.pending.push_back(req);
    }

    /// Nothing queued and nothing running.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.active.is_empty()
    }

    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// The token ids each slot's cache holds (for tests and metrics).
    pub fn slot_tokens(&self, slot: usize) -> &[u32] {
        &self.slots[slot].cached
    }

    fn dequeued(&self) {
        let _ = self
            .queue_depth
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    fn publish(&self) {
        self.metrics.queue_depth(self.pending.len());
        let kv: usize = self.slots.iter().map(|s| s.cached.len()).sum();
        self.metrics.occupancy(self.active.len(), kv);
    }

    /// One scheduling round: drop abandoned requests, admit waiting ones
    /// into free slots, then one batched decode step over all active ones.
    pub fn step(&mut self) {
        self.tick += 1;
        // Clients that went away: free their slot now.
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].req.events.is_closed() {
                let s = self.active.swap_remove(i);
                self.release(s.slot);
                self.metrics.finished("cancelled");
            } else {
                i += 1;
            }
        }
        let before = self.pending.len();
        self.pending.retain(|r| !r.events.is_closed());
        for _ in self.pending.len()..before {
            self.dequeued();
            self.metrics.finished("cancelled");
        }
        // Admissions join between decode steps.
        while !self.pending.is_empty() && self.slots.iter().any(|s| !s.busy) {
            let req = self.pending.pop_front().expect("non-empty");
            self.dequeued();
            self.admit(req);
        }
        self.publish();
        if !self.active.is_empty() {
            self.decode_step();
        }
        self.publish();
    }

    /// Fail every queued and active request (shutdown past its grace).
    pub fn cancel_all(&mut self, why: &str) {
        for r in self.pending.drain(..) {
            let _ = r.events.send(Event::Error(why.to_string()));
            self.metrics.finished("cancelled");
            let _ = self
                .queue_depth
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        }
        for s in std::mem::take(&mut self.active) {
            let _ = s.req.events.send(Event::Error(why.to_string()));
            self.slots[s.slot].busy = false;
            self.metrics.finished("cancelled");
        }
        self.publish();
    }

    fn release(&mut self, slot: usize) {
        self.slots[slot].busy = false;
        self.slots[slot].last_used = self.tick;
    }

    /// A failed engine call: the slot's cache is unknown now, start it over.
    fn fail(&mut self, slot: usize, req: &GenRequest, e: &Error) {
        let _ = req.events.send(Event::Error(e.to_string()));
        self.metrics.finished("error");
        self.slots[slot].cached.clear();
        self.slots[slot].busy = false;
        if self.engine.slot_truncate(slot, 0).is_err() {
            // Nothing better to do: the next admission truncates again.
        }
    }

    /// The free slot to use for `prompt` and how many of its cached tokens
    /// to keep: the longest common prefix (at least one prompt token is run,
    /// its logits give the first new token); with no prefix to reuse, the
    /// least recently used slot, so that other slots' caches survive.
    fn pick_slot(&self, prompt: &[u32]) -> (usize, usize) {
        let mut best: Option<(usize, usize, u64)> = None;
        for (i, s) in self.slots.iter().enumerate() {
            if s.busy {
                continue;
            }
            let common = s
                .cached
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(prompt.len().saturating_sub(1));
            let better = match best {
                None => true,
                Some((_, k, lu)) => common > k || (common == k && s.last_used < lu),
            };
            if better {
                best = Some((i, common, s.last_used));
            }
        }
        let (slot, keep, _) = best.expect("a free slot");
        (slot, keep)
    }

    fn admit(&mut self, req: GenRequest) {
        let (slot, mut keep) = self.pick_slot(&req.prompt);
        if self.engine.slot_position(slot) != self.slots[slot].cached.len() {
            // The engine and our record disagree: trust neither.
            keep = 0;
        }
        self.slots[slot].busy = true;
        let res = self.engine.slot_truncate(slot, keep).and_then(|_| {
            self.slots[slot].cached.truncate(keep);
            let l = self.engine.prefill_slot(slot, &req.prompt[keep..])?;
            self.slots[slot]
                .cached
                .extend_from_slice(&req.prompt[keep..]);
            crate::generate::check_logits(&l, 0, self.slots[slot].cached.len())?;
            Ok(l)
        });
        let logits = match res {
            Ok(l) => l,
            Err(e) => return self.fail(slot, &req, &e),
        };
        self.metrics
            .admitted(req.prompt.len(), req.prompt.len() - keep);
        let sampler = match Sampler::new(req.sampling.clone()) {
            Ok(s) => s,
            Err(e) => {
                self.release(slot);
                let _ = req.events.send(Event::Error(e.to_string()));
                self.metrics.finished("error");
                return;
            }
        };
        let mut seq = Seq {
            slot,
            req,
            sampler,
            generated: Vec::new(),
            text: String::new(),
            emitted: 0,
            pending_lp: Vec::new(),
            next: 0,
            picks: Picks::Host,
            steps: 0,
            cached_tokens: keep,
            last_token: Instant::now(),
        };
        let r = match self.on_logits(&mut seq, &logits) {
            Ok(false) => self.begin_picks(&mut seq).map(|_| false),
            done => done,
        };
        match r {
            Ok(true) => self.release(slot),
            Ok(false) => self.active.push(seq),
            Err(e) => self.fail(slot, &seq.req, &e),
        }
    }

    /// Choose how an admitted sequence's decode steps pick (after its first
    /// token, sampled on the host from the prefill's row): on a device
    /// that samples, greedy takes the argmax, and seeded sampling the
    /// slot's sampler with every remaining step's uniform drawn now, in
    /// the CPU sampler's order (`Sampler::draw_table`), so the ids are the
    /// ones the host would draw.
    fn begin_picks(&mut self, seq: &mut Seq) -> Result<()> {
        if !self.engine.device_sampling() || seq.sampler.params.repeat_penalty != 1.0 {
            return Ok(());
        }
        if seq.sampler.params.is_greedy() {
            seq.picks = Picks::Argmax;
            return Ok(());
        }
        let Some(d) = seq.sampler.gpu_settings() else {
            return Ok(());
        };
        let draws = seq
            .sampler
            .draw_table(seq.req.max_tokens - seq.generated.len());
        let f: Vec<f32> = draws.iter().map(|&r| r as f32).collect();
        self.engine.begin_slot_sampling(seq.slot, &d, &f)?;
        seq.picks = Picks::Device { d, draws };
        Ok(())
    }

    fn decode_step(&mut self) {
        if self.engine.device_sampling() {
            return self.decode_step_picks();
        }
        let steps: Vec<(usize, u32)> = self.active.iter().map(|s| (s.slot, s.next)).collect();
        let res = self.engine.decode_batch(&steps).and_then(|v| {
            if v.len() == steps.len() {
                Ok(v)
            } else {
                Err(Error::invalid(format!(
                    "decode_batch returned {} logit rows for {} sequences",
                    v.len(),
                    steps.len()
                )))
            }
        });
        self.metrics.decode_step(steps.len());
        let all = match res {
            Ok(v) => v,
            Err(e) => return self.fail_active(&e),
        };
        let bytes: usize = all.iter().map(|l| 4 * l.len()).sum();
        self.metrics.decode_readback(bytes as u64, 0);
        let mut keep = Vec::with_capacity(self.active.len());
        for (mut seq, logits) in std::mem::take(&mut self.active).into_iter().zip(all) {
            self.slots[seq.slot].cached.push(seq.next);
            let pos = self.slots[seq.slot].cached.len();
            let r = crate::generate::check_logits(&logits, seq.generated.len(), pos)
                .and_then(|_| self.on_logits(&mut seq, &logits));
            match r {
                Ok(true) => self.release(seq.slot),
                Ok(false) => keep.push(seq),
                Err(e) => self.fail(seq.slot, &seq.req, &e),
            }
        }
        self.active = keep;
    }

    fn fail_active(&mut self, e: &Error) {
        for s in std::mem::take(&mut self.active) {
            self.fail(s.slot, &s.req, e);
        }
    }

    /// [`Self::decode_step`] on a device that samples: only the picks come
    /// back, and the rows of sequences that sample on the host, want
    /// log-probabilities, or whose pick the device left to the host.
    fn decode_step_picks(&mut self) {
        let steps: Vec<SlotStep> = self
            .active
            .iter()
            .map(|s| SlotStep {
                slot: s.slot,
                token: s.next,
                sample: matches!(s.picks, Picks::Device { .. }),
                want_row: s.req.logprobs.is_some() || matches!(s.picks, Picks::Host),
            })
            .collect();
        let res = self.engine.decode_picks(&steps).and_then(|v| {
            if v.picks.len() == steps.len() {
                Ok(v)
            } else {
                Err(Error::invalid(format!(
                    "decode_picks returned {} picks for {} sequences",
                    v.picks.len(),
                    steps.len()
                )))
            }
        });
        self.metrics.decode_step(steps.len());
        let all = match res {
            Ok(v) => v,
            Err(e) => return self.fail_active(&e),
        };
        let host = all.picks.iter().filter(|p| p.pick.uncertain()).count();
        self.metrics.decode_readback(all.bytes_read, host);
        let vocab = self.engine.vocab_size();
        let mut keep = Vec::with_capacity(self.active.len());
        for (mut seq, p) in std::mem::take(&mut self.active).into_iter().zip(all.picks) {
            self.slots[seq.slot].cached.push(seq.next);
            let pos = self.slots[seq.slot].cached.len();
            let r = crate::generate::check_stats(&p.stats, vocab, seq.generated.len(), pos)
                .and_then(|_| self.pick(&mut seq, &p))
                .and_then(|id| self.on_token(&mut seq, id, p.row.as_deref()));
            match r {
                Ok(true) => self.release(seq.slot),
                Ok(false) => keep.push(seq),
                Err(e) => self.fail(seq.slot, &seq.req, &e),
            }
        }
        self.active = keep;
    }

    /// The id of a decode step's row: the device's pick, or the host's
    /// sample of the row where the device left it (same uniform) or the
    /// sequence samples on the host.
    fn pick(&self, seq: &mut Seq, p: &SlotPick) -> Result<u32> {
        let step = seq.steps;
        seq.steps += 1;
        let row = || {
            p.row.as_deref().ok_or_else(|| {
                Error::invalid(format!(
                    "decode step {step} of slot {}: the engine returned no logits row to sample on the host",
                    seq.slot
                ))
            })
        };
        Ok(match &seq.picks {
            Picks::Argmax => p.pick.id,
            Picks::Device { .. } if !p.pick.uncertain() => p.pick.id,
            Picks::Device { d, draws } => {
                let r = *draws.get(step).ok_or_else(|| {
                    Error::invalid(format!(
                        "decode step {step} of slot {}: past the {} uniforms drawn at admission",
                        seq.slot,
                        draws.len()
                    ))
                })?;
                seq.sampler.sample_drawn(row()?, &[], &Draw { r, ..*d })
            }
            Picks::Host => seq.sampler.sample(row()?, &[]),
        })
    }

    /// Sample from a step's logits; `Ok(true)` when the sequence finished.
    fn on_logits(&mut self, seq: &mut Seq, logits: &[f32]) -> Result<bool> {
        // The repetition penalty is off for the server (OpenAI has no such
        // field), so the sampler needs no history.
        let id = seq.sampler.sample(logits, &[]);
        self.on_token(seq, id, Some(logits))
    }

    /// A step picked `id` (`logits`: its row, where read back; needed for
    /// log-probabilities); `Ok(true)` when the sequence finished.
    fn on_token(&mut self, seq: &mut Seq, id: u32, logits: Option<&[f32]>) -> Result<bool> {
        let now = Instant::now();
        if seq.generated.is_empty() {
            self.metrics
                .ttft(now.duration_since(seq.req.arrived).as_secs_f64());
        } else {
            self.metrics
                .inter_token(now.duration_since(seq.last_token).as_secs_f64());
        }
        seq.last_token = now;
        if self.stop_ids.contains(&id) {
            self.finish(seq, FinishReason::Stop, None)?;
            return Ok(true);
        }
        seq.generated.push(id);
        self.metrics.generated(1);
        if let Some(top) = seq.req.logprobs {
            let logits = logits.ok_or_else(|| {
                Error::invalid("log-probabilities asked for, but the step read back no logits row")
            })?;
            let (lp, best) = logprobs(logits, id, top);
            seq.pending_lp.push(TokenLogprob {
                token: self.dec.token_text(id),
                logprob: lp,
                top: best
                    .into_iter()
                    .map(|(t, l)| TopLogprob {
                        token: self.dec.token_text(t),
                        logprob: l,
                    })
                    .collect(),
                text_offset: seq.text.len(),
            });
        }
        let full = self.dec.decode(&seq.req.prompt, &seq.generated)?;
        // A byte-level token can end mid-character (shown as U+FFFD), and a
        // decoder may rewrite earlier text: wait for a clean extension.
        if !full.ends_with('\u{FFFD}') && full.is_char_boundary(seq.emitted) {
            seq.text = full;
        }
        if let Some(at) = find_stop(&seq.text, seq.emitted, &seq.req.stop) {
            self.finish(seq, FinishReason::Stop, Some(at))?;
            return Ok(true);
        }
        if seq.generated.len() >= seq.req.max_tokens {
            self.finish(seq, FinishReason::Length, None)?;
            return Ok(true);
        }
        let hold = stop_prefix_len(&seq.text, seq.emitted, &seq.req.stop);
        let upto = seq.text.len() - hold;
        self.emit(seq, upto);
        seq.next = id;
        Ok(false)
    }

    /// Send `text[emitted..upto]` with the log-probabilities of the tokens
    /// that start before `upto` (or all of them with `all_lp`).
    fn emit_range(&self, seq: &mut Seq, upto: usize, all_lp: bool) {
        let text = seq.text[seq.emitted..upto].to_string();
        let n = if all_lp {
            seq.pending_lp.len()
        } else {
            seq.pending_lp
                .iter()
                .take_while(|t| t.text_offset < upto)
                .count()
        };
        let logprobs: Vec<TokenLogprob> = seq.pending_lp.drain(..n).collect();
        seq.emitted = upto;
        if !text.is_empty() || !logprobs.is_empty() {
            let _ = seq.req.events.send(Event::Delta { text, logprobs });
        }
    }

    fn emit(&self, seq: &mut Seq, upto: usize) {
        self.emit_range(seq, upto, false)
    }

    /// The end of a sequence: the rest of its text (up to a stop string,
    /// which is not sent), then `Done`.
    fn finish(&self, seq: &mut Seq, reason: FinishReason, stop_at: Option<usize>) -> Result<()> {
        let mut reason = reason;
        let upto = match stop_at {
            Some(at) => at,
            None => {
                // The final text, even if it ends mid-character.
                seq.text = self.dec.decode(&seq.req.prompt, &seq.generated)?;
                if !seq.text.is_char_boundary(seq.emitted) {
                    seq.emitted = seq.text.len().min(seq.emitted);
                    while !seq.text.is_char_boundary(seq.emitted) {
                        seq.emitted -= 1;
                    }
                }
                match find_stop(&seq.text, seq.emitted, &seq.req.stop) {
                    Some(at) => {
                        reason = FinishReason::Stop;
                        at
                    }
                    None => seq.text.len(),
                }
            }
        };
        self.emit_range(seq, upto, stop_at.is_none() && upto == seq.text.len());
        self.metrics.finished(reason.as_str());
        let _ = seq.req.events.send(Event::Done {
            finish_reason: reason,
            usage: Usage {
                prompt_tokens: seq.req.prompt.len(),
                completion_tokens: seq.generated.len(),
                cached_tokens: seq.cached_tokens,
            },
        });
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    /// A deterministic "model": the next token is a hash of the whole slot
    /// history, so any mix-up of slots or positions changes the output.
    /// Token 0 is EOS when `eos` is set; ids map to letters.
    pub struct FakeEngine {
        pub ctx: usize,
        pub caches: Vec<Vec<u32>>,
        pub vocab: usize,
        pub batches: Vec<usize>,
        pub prefilled: Vec<usize>,
        /// Sample on the "device" (`decode_picks`): the host's sampler with
        /// each step's f32 uniform, every third sampled step left to the
        /// host.
        pub device: bool,
        /// Per slot: the device sampler's settings, uniforms and step.
        pub samplers: Vec<Option<(Draw, Vec<f32>, usize)>>,
    }

    impl FakeEngine {
        pub fn new(slots: usize) -> Self {
            FakeEngine {
                ctx: 64,
                caches: vec![Vec::new(); slots],
                vocab: 26,
                batches: Vec::new(),
                prefilled: Vec::new(),
                device: false,
                samplers: vec![None; slots],
            }
        }
        fn logits(&self, slot: usize) -> Vec<f32> {
            let h = self.caches[slot]
                .iter()
                .fold(7u64, |h, &t| h.wrapping_mul(31).wrapping_add(t as u64 + 1));
            let best = (h % (self.vocab as u64 - 1) + 1) as usize;
            (0..self.vocab)
                .map(|i| if i == best { 5.0 } else { (i % 3) as f32 })
                .collect()
        }
    }

    impl Engine for FakeEngine {
        fn slots(&self) -> usize {
            self.caches.len()
        }
        fn max_context(&self) -> usize {
            self.ctx
        }
        fn slot_position(&self, slot: usize) -> usize {
            self.caches[slot].len()
        }
        fn slot_truncate(&mut self, slot: usize, n: usize) -> Result<()> {
            self.caches[slot].truncate(n);
            Ok(())
        }
        fn prefill_slot(&mut self, slot: usize, tokens: &[u32]) -> Result<Vec<f32>> {
            self.prefilled.push(tokens.len());
            self.caches[slot].extend_from_slice(tokens);
            Ok(self.logits(slot))
        }
        fn decode_batch(&mut self, steps: &[(usize, u32)]) -> Result<Vec<Vec<f32>>> {
            self.batches.push(steps.len());
            for &(s, t) in steps {
                self.caches[s].push(t);
            }
            Ok(steps.iter().map(|&(s, _)| self.logits(s)).collect())
        }
        fn vocab_size(&self) -> usize {
            self.vocab
        }
        fn device_sampling(&self) -> bool {
            self.device
        }
        fn begin_slot_sampling(&mut self, slot: usize, d: &Draw, draws: &[f32]) -> Result<()> {
            self.samplers[slot] = Some((*d, draws.to_vec(), 0));
            Ok(())
        }
        fn decode_picks(&mut self, steps: &[SlotStep]) -> Result<BatchPicks> {
            use crate::ops::argmax::RowStats;
            use crate::ops::sample_full::{Picked, U_DRAW};
            let pairs: Vec<(usize, u32)> = steps.iter().map(|s| (s.slot, s.token)).collect();
            let rows = self.decode_batch(&pairs)?;
            let mut picks = Vec::new();
            for (s, l) in steps.iter().zip(rows) {
                let mut pick = Picked {
                    id: crate::sampling::argmax(&l),
                    why: 0,
                    survivors: 0,
                    drawn_from: 0,
                };
                if s.sample {
                    let (d, draws, step) = self.samplers[s.slot].as_mut().expect("begun");
                    let sampler = Sampler::new(SamplingParams {
                        temperature: d.temperature,
                        top_k: d.top_k,
                        top_p: d.top_p,
                        min_p: d.min_p,
                        ..Default::default()
                    })?;
                    let r = draws[*step] as f64;
                    pick.id = sampler.sample_drawn(&l, &[], &Draw { r, ..*d });
                    if *step % 3 == 1 {
                        (pick.id, pick.why) = (0, U_DRAW);
                    }
                    *step += 1;
                }
                let row = (s.want_row || pick.uncertain()).then(|| l.clone());
                picks.push(SlotPick {
                    pick,
                    stats: RowStats::of(&l),
                    row,
                });
            }
            Ok(BatchPicks {
                picks,
                bytes_read: 0,
            })
        }
    }

    pub struct Letters;
    impl TextDecoder for Letters {
        fn decode(&self, _prompt: &[u32], ids: &[u32]) -> Result<String> {
            Ok(ids
                .iter()
                .map(|&i| char::from(b'a' + (i % 26) as u8))
                .collect())
        }
        fn token_text(&self, id: u32) -> String {
            self.decode(&[], &[id]).unwrap()
        }
    }

    fn sched(slots: usize) -> Scheduler<FakeEngine, Letters> {
        Scheduler::new(
            FakeEngine::new(slots),
            Letters,
            vec![],
            Arc::new(Metrics::default()),
            Arc::new(AtomicUsize::new(0)),
        )
    }

    fn req(prompt: &[u32], max: usize, stop: &[&str]) -> (GenRequest, UnboundedReceiver<Event>) {
        let (tx, rx) = unbounded_channel();
        (
            GenRequest {
                prompt: prompt.to_vec(),
                max_tokens: max,
                sampling: SamplingParams::default(),
                stop: stop.iter().map(|s| s.to_string()).collect(),
                logprobs: None,
                arrived: Instant::now(),
                events: tx,
            },
            rx,
        )
    }

    /// All text and the finish of a finished request.
    fn collect(rx: &mut UnboundedReceiver<Event>) -> (String, Option<FinishReason>, Usage) {
        let mut text = String::new();
        let mut fin = None;
        let mut usage = Usage::default();
        while let Ok(e) = rx.try_recv() {
            match e {
                Event::Delta { text: t, .. } => text += &t,
                Event::Done {
                    finish_reason,
                    usage: u,
                } => {
                    fin = Some(finish_reason);
                    usage = u;
                }
                Event::Error(e) => panic!("{e}"),
            }
        }
        (text, fin, usage)
    }

    fn run_all(s: &mut Scheduler<FakeEngine, Letters>) {
        for _ in 0..1000 {
            if s.is_idle() {
                return;
            }
            s.step();
        }
        panic!("did not finish");
    }

    #[test]
    fn batched_output_equals_alone_and_batches_share_one_pass() {
        let prompts: Vec<Vec<u32>> = (0..4).map(|i| vec![i + 1, 2 * i + 3, 5]).collect();
        let mut alone = Vec::new();
        for p in &prompts {
            let mut s = sched(1);
            let (r, mut rx) = req(p, 12, &[]);
            s.submit(r);
            run_all(&mut s);
            alone.push(collect(&mut rx));
        }
        let mut s = sched(4);
        let mut rxs = Vec::new();
        for p in &prompts {
            let (r, rx) = req(p, 12, &[]);
            s.submit(r);
            rxs.push(rx);
        }
        run_all(&mut s);
        for (rx, a) in rxs.iter_mut().zip(&alone) {
            let got = collect(rx);
            assert_eq!(&got, a);
            assert_eq!(got.1, Some(FinishReason::Length));
            assert_eq!(got.0.len(), 12);
        }
        // 11 decode steps (the first token comes from the prefill), each
        // over all 4 sequences.
        assert_eq!(s.engine.batches, vec![4; 11]);
    }

    #[test]
    fn more_requests_than_slots_wait_and_reuse_the_longest_prefix() {
        let mut s = sched(2);
        let (a, mut ra) = req(&[1, 2, 3, 4], 3, &[]);
        let (b, mut rb) = req(&[9, 9], 3, &[]);
        let (c, mut rc) = req(&[1, 2, 3, 4, 5, 6], 3, &[]);
        s.submit(a);
        s.submit(b);
        s.submit(c);
        s.step();
        assert_eq!(s.active(), 2, "two slots, the third request waits");
        run_all(&mut s);
        let (_, fa, _) = collect(&mut ra);
        let (_, fb, _) = collect(&mut rb);
        let (tc, fc, uc) = collect(&mut rc);
        assert!(fa.is_some() && fb.is_some() && fc.is_some());
        // c shares a's 4 prompt tokens: they are reused, 2 are prefilled.
        assert_eq!(uc.cached_tokens, 4);
        assert_eq!(s.engine.prefilled, vec![4, 2, 2]);
        // Same text as c alone.
        let mut alone = sched(1);
        let (c2, mut rc2) = req(&[1, 2, 3, 4, 5, 6], 3, &[]);
        alone.submit(c2);
        run_all(&mut alone);
        assert_eq!(collect(&mut rc2).0, tc);
    }

    #[test]
    fn stop_strings_are_held_back_and_never_sent() {
        // Find what the fake says for this prompt, then stop on a piece of it.
        let mut s = sched(1);
        let (r, mut rx) = req(&[3, 1, 4], 10, &[]);
        s.submit(r);
        run_all(&mut s);
        let (full, _, _) = collect(&mut rx);
        let stop = full[4..6].to_string();
        let at = full.find(&stop).unwrap();
        let mut s = sched(1);
        let (r, mut rx) = req(&[3, 1, 4], 10, &["zzzz", &stop]);
        s.submit(r);
        let mut deltas = Vec::new();
        run_all(&mut s);
        let mut fin = None;
        let mut usage = Usage::default();
        while let Ok(e) = rx.try_recv() {
            match e {
                Event::Delta { text, .. } => deltas.push(text),
                Event::Done {
                    finish_reason,
                    usage: u,
                } => {
                    fin = Some(finish_reason);
                    usage = u;
                }
                Event::Error(e) => panic!("{e}"),
            }
        }
        assert_eq!(deltas.concat(), full[..at]);
        assert_eq!(fin, Some(FinishReason::Stop));
        assert_eq!(usage.completion_tokens, at + stop.len());
        // No delta ever contained the start of the stop string.
        assert!(deltas.iter().all(|d| !d.contains(&stop)), "{deltas:?}");
    }

    #[test]
    fn stop_prefix_helpers() {
        let stops = vec!["abc".to_string(), "é!".to_string()];
        assert_eq!(stop_prefix_len("xxab", 0, &stops), 2);
        assert_eq!(stop_prefix_len("xxa", 0, &stops), 1);
        assert_eq!(stop_prefix_len("xxa", 3, &stops), 0);
        assert_eq!(stop_prefix_len("xé", 0, &stops), 2);
        assert_eq!(stop_prefix_len("xabc", 0, &stops), 0);
        assert_eq!(find_stop("xxabcé!", 0, &stops), Some(2));
        assert_eq!(find_stop("xxabcé!", 3, &stops), Some(5));
    }

    #[test]
    fn a_dropped_receiver_frees_the_slot() {
        let mut s = sched(1);
        let (a, ra) = req(&[1, 2], 50, &[]);
        let (b, mut rb) = req(&[4, 4], 3, &[]);
        s.submit(a);
        s.submit(b);
        s.step();
        s.step();
        assert_eq!(s.active(), 1);
        drop(ra);
        run_all(&mut s);
        assert_eq!(collect(&mut rb).1, Some(FinishReason::Length));
        assert_eq!(s.metrics.outcome_count("cancelled"), 1);
    }

    /// Seeded sampling through the device path (picks only, every third
    /// sampled step left to the host) gives the host path's text, beside
    /// greedy and log-probability requests in the same batches.
    #[test]
    fn device_picks_give_the_host_samplers_ids() {
        let run = |device: bool| {
            let mut s = sched(4);
            s.engine.device = device;
            let mut rxs = Vec::new();
            for i in 0..6u32 {
                let (mut r, rx) = req(&[i + 1, 2 * i + 3, 5], 14, &[]);
                r.sampling = SamplingParams {
                    temperature: [0.0, 0.7, 1.0, 1.6][i as usize % 4],
                    top_p: [1.0, 0.9, 1.0, 0.95][i as usize % 4],
                    seed: 100 + i as u64,
                    ..Default::default()
                };
                r.logprobs = (i == 2).then_some(2);
                s.submit(r);
                rxs.push(rx);
            }
            run_all(&mut s);
            let mut out = Vec::new();
            for rx in &mut rxs {
                let mut all = Vec::new();
                while let Ok(e) = rx.try_recv() {
                    all.push(e);
                }
                out.push(all);
            }
            (out, s.metrics.render())
        };
        let (host, _) = run(false);
        let (dev, m) = run(true);
        assert_eq!(host, dev);
        assert!(host
            .iter()
            .all(|evs| matches!(evs.last(), Some(Event::Done { .. }))));
        // the fake left some sampled steps to the host
        let n = m
            .lines()
            .find_map(|l| l.strip_prefix("wgllm_decode_host_sampled_total "))
            .and_then(|v| v.parse::<u64>().ok());
        assert!(n.is_some_and(|n| n > 0), "{m}");
    }

    #[test]
    fn logprobs_are_a_log_softmax() {
        let (lp, top) = logprobs(&[0.0, (3.0f32).ln(), f32::NEG_INFINITY], 1, 2);
        assert!((lp - 0.75f64.ln()).abs() < 1e-6, "{lp}");
        assert_eq!(top[0].0, 1);
        assert_eq!(top[1].0, 0);
        assert!((top[1].1 - 0.25f64.ln()).abs() < 1e-6);
    }
}
