//! Text generation on a [`Model`]: prefill, then one decode step per token,
//! streaming text as it is produced.

use std::path::Path;

use crate::error::{Error, Hint, Result, Setting};
use crate::model::Model;
#[cfg(not(target_arch = "wasm32"))]
use crate::model::{SampledStep, DECODE_DEPTH};
use crate::ops::argmax::RowStats;
use crate::sampling::{Draw, Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end generation (the EOS ids of the model).
    pub stop_ids: Vec<u32>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    /// `eos`, `max_tokens` or `interrupted`.
    pub stop_reason: String,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// The EOS ids of a model folder: generation_config.json's `eos_token_id`
/// (int, list or null) when the file exists, then config.json's
/// (`config_eos`) that are not already listed. A malformed file or id is an
/// error naming it.
pub fn eos_ids(dir: &Path, config_eos: &[u32]) -> Result<Vec<u32>> {
    let p = dir.join("generation_config.json");
    let text = if p.is_file() {
        Some(std::fs::read(&p).map_err(|e| Error::io(&p, e))?)
    } else {
        None
    };
    eos_ids_from(&p, text.as_deref(), config_eos)
}

/// [`eos_ids`] from generation_config.json's bytes held in memory (`None`:
/// the folder has no such file; `p` labels errors).
pub fn eos_ids_from(p: &Path, text: Option<&[u8]>, config_eos: &[u32]) -> Result<Vec<u32>> {
    let p = p.to_path_buf();
    let mut ids = Vec::new();
    if let Some(text) = text {
        let v: serde_json::Value = serde_json::from_slice(text).map_err(|e| Error::Json {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        let bad = |x: &serde_json::Value| Error::Config {
            path: p.clone(),
            field: "eos_token_id".into(),
            msg: format!(
                "expected a token id (an integer in 0..2^32), a list of them or null, got {x}"
            ),
        };
        let id = |x: &serde_json::Value| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(x))
        };
        match v.get("eos_token_id") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Array(a)) => {
                for x in a {
                    ids.push(id(x)?);
                }
            }
            Some(x) => ids.push(id(x)?),
        }
    }
    for &e in config_eos {
        if !ids.contains(&e) {
            ids.push(e);
        }
    }
    Ok(ids)
}

/// Decodes a growing id sequence to text, emitting only complete characters.
///
/// The text is the ids' text as a continuation of a context (the prompt):
/// `decode(context ++ ids)` less `decode(context)`, special tokens skipped.
/// That differs from decoding the ids alone only for SentencePiece
/// vocabularies with the `▁` prefix, whose decoder drops the first space of
/// a text: after the prompt "The tokenizer will", the generated `▁merge`
/// streams as " merge", as transformers' `TextStreamer` prints it after the
/// prompt (and as llama.cpp prints its pieces). transformers'
/// `skip_prompt=True` streamer and the pipeline's new text decode the
/// generated ids alone and drop that space (transformers 5.23, checked on
/// tests/fixtures/spm/llama.gguf). Byte-level BPE text is the same either
/// way. A context with no text (BOS only) starts a text: nothing is kept.
pub struct StreamDecoder<'t> {
    tok: &'t Tokenizer,
    /// The context's tail that decides how the ids' text begins
    /// ([`Tokenizer::continuation_anchor`]), and its text.
    anchor: Vec<u32>,
    anchor_text: String,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'t> StreamDecoder<'t> {
    /// A decoder for ids that continue `context` (the tokens before them).
    pub fn new(tok: &'t Tokenizer, context: &[u32]) -> Result<Self> {
        let anchor = tok.continuation_anchor(context)?.to_vec();
        let anchor_text = tok.decode_skip_special(&anchor)?;
        Ok(StreamDecoder {
            tok,
            anchor,
            anchor_text,
            ids: Vec::new(),
            emitted: 0,
        })
    }

    /// Add a token; returns the new text that is now complete.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.text()?;
        // A byte-level token can end in the middle of a UTF-8 sequence; the
        // decoder shows that as U+FFFD: wait for the next token.
        // `get` also waits when a decoder rewrote earlier text so that the
        // emitted length is no longer a character boundary.
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(new) = text.get(self.emitted..).map(str::to_string) else {
            return Ok(String::new());
        };
        self.emitted = text.len();
        Ok(new)
    }

    /// The whole text of the ids pushed so far.
    pub fn text(&self) -> Result<String> {
        self.tok
            .decode_after(&self.anchor, &self.anchor_text, &self.ids)
    }
}

/// The first non-finite logit of a step, as an error naming the step.
/// `step` 0 is the prompt's pass; step k > 0 is the pass over the k-th
/// generated token (which yields token k + 1).
pub fn check_logits(logits: &[f32], step: usize, position: usize) -> Result<()> {
    check_stats(&RowStats::of(logits), logits.len(), step, position)
}

/// [`check_logits`] from the GPU argmax's [`RowStats`] of a row of `len`
/// logits: the same error, word for word.
pub fn check_stats(s: &RowStats, len: usize, step: usize, position: usize) -> Result<()> {
    let Some((first, bits)) = s.first else {
        return Ok(());
    };
    let (nan, inf) = (s.nan, s.inf);
    let what = if step == 0 {
        "step 0 (the prompt's pass)".to_string()
    } else {
        format!("step {step} (after generated token {step})")
    };
    Err(Error::invalid(format!(
        "non-finite logits at generation {what}, {position} tokens in the context: \
         {nan} NaN and {inf} infinite of {len} (first at token id {first}, value {}); \
         the model's activations overflowed f32 (check the weights), generation stopped",
        f32::from_bits(bits)
    )))
}

/// Generate after `prompt_ids`, which are appended to whatever the model
/// already has cached. Calls `on_text` with each complete piece of text.
#[cfg(not(target_arch = "wasm32"))]
pub fn generate(
    model: &mut Model,
    tok: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    on_text: impl FnMut(&str),
) -> Result<Generation> {
    generate_interruptible(model, tok, &[], prompt_ids, opts, &|| false, on_text)
}

/// [`generate`] that also stops, with `stop_reason` `interrupted`, when
/// `interrupted()` turns true (checked before each token is emitted; the
/// step in flight completes first). Every emitted token has then been run
/// through the model, so the KV cache holds the prompt and the whole reply.
///
/// A NaN or infinite logit at any step is an error naming the step (see
/// [`check_logits`]). Greedy decoding without a repetition penalty runs
/// pipelined on the GPU ([`Model::decode_greedy_checked`]: the argmax feeds
/// the next step, only each step's id and its logits' finiteness come
/// back, `DECODE_DEPTH` steps in flight, each id streamed as it arrives);
/// sampling, and greedy with a penalty, run the whole sampler on the GPU,
/// pipelined the same way ([`Model::decode_sampled`], `ops::sample_full`:
/// the uniforms drawn up front, the penalty window a history ring on the
/// GPU, only the id and the row's finiteness come back; a step the kernel
/// cannot decide within its f32 error bound is sampled on the host from its
/// row with the same uniform, and a host id other than the GPU's rolls the
/// steps after it back, so the ids are the CPU sampler's); settings it
/// does not take (a window larger than the history ring, min-p under
/// 1e-30) read back `ops::sample`'s candidates with top-k, else each step's
/// logits.
///
/// `earlier` are the tokens the cache already holds before `prompt_ids`
/// (a chat's previous turns); they only join the repetition penalty's
/// history, which, as in transformers, covers every input token.
#[cfg(not(target_arch = "wasm32"))]
pub fn generate_interruptible(
    model: &mut Model,
    tok: &Tokenizer,
    earlier: &[u32],
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    interrupted: &dyn Fn() -> bool,
    on_text: impl FnMut(&str),
) -> Result<Generation> {
    crate::gpu::block_on(generate_interruptible_async(
        model,
        tok,
        earlier,
        prompt_ids,
        opts,
        interrupted,
        on_text,
    ))
}

/// [`generate_interruptible`] as a future: the one generation loop, which
/// the browser build awaits (each step's readback yields to the page).
/// The pipelined greedy path blocks on the device, so it is native-only:
/// in a browser greedy takes the step-at-a-time loop.
pub async fn generate_interruptible_async(
    model: &mut Model,
    tok: &Tokenizer,
    earlier: &[u32],
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    interrupted: &dyn Fn() -> bool,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    if prompt_ids.is_empty() {
        return Err(Error::invalid(
            "the prompt encodes to no tokens: give a non-empty prompt",
        ));
    }
    let needed = model
        .position()
        .saturating_add(prompt_ids.len())
        .saturating_add(opts.max_tokens);
    if needed > model.max_context {
        return Err(Error::invalid(format!(
            "prompt ({} tokens{}) + {} new tokens = {needed} exceeds the context of {} tokens",
            prompt_ids.len(),
            if model.position() > 0 {
                format!(" after {} cached", model.position())
            } else {
                String::new()
            },
            opts.max_tokens,
            model.max_context
        ))
        .hint(
            Hint::new()
                .text("lower ")
                .name(Setting::MaxTokens)
                .text(" or raise ")
                .name(Setting::MaxContext),
        ));
    }
    let history: Vec<u32> = earlier.iter().chain(prompt_ids).copied().collect();
    let dec = StreamDecoder::new(tok, &history)?;
    let mut e = Emit {
        history,
        out: Vec::new(),
        dec,
        stop_reason: "max_tokens".to_string(),
    };
    let mut accept = |e: &mut Emit<'_>, id: u32| e.accept(id, opts, interrupted, &mut on_text);
    let vocab = model.cfg.vocab_size;

    let t0 = crate::gpu::now_s();
    let mut prefill_s = 0.0;
    let mut t1 = crate::gpu::now_s();
    let mut decode_steps = 0usize;
    let pipelined = cfg!(not(target_arch = "wasm32"))
        && opts.max_tokens > 0
        && sampler.params.is_greedy()
        && sampler.params.repeat_penalty == 1.0;
    if pipelined {
        #[cfg(not(target_arch = "wasm32"))]
        {
            // Greedy without a penalty is the GPU argmax: pipelined, with no
            // host round trip between steps. The argmax reports each step's
            // finiteness with its id, so the first non-finite step still stops
            // generation with the same error as the host check below.
            let (first, st) = model.forward_next_checked(prompt_ids)?;
            check_stats(&st, vocab, 0, model.position())?;
            prefill_s = crate::gpu::now_s() - t0;
            t1 = crate::gpu::now_s();
            if accept(&mut e, first)? {
                let start = model.position();
                let steps = opts.max_tokens - e.out.len();
                model.decode_greedy_checked(first, steps, DECODE_DEPTH, |id, st| {
                    decode_steps += 1;
                    check_stats(&st, vocab, decode_steps, start + decode_steps)?;
                    accept(&mut e, id)
                })?;
            }
        }
    } else if let Some(d) = sampler.gpu_settings().filter(|_| {
        opts.max_tokens > 0
            && model.sampled_fits(sampler.penalty_last_n(), e.history.len(), opts.max_tokens)
    }) {
        // The whole sampler on the GPU with nothing written per step: the
        // uniforms are drawn up front in the CPU sampler's order, the
        // penalty window is a history ring the kernel appends its picks
        // to. Only each pick and its row's finiteness come back; a step the
        // kernel cannot decide within its error bound is sampled on the
        // host from its row with the same uniform (the CPU sampler's id
        // either way), and the GPU's state takes the host's id.
        let draws = sampler.draw_table(opts.max_tokens);
        let table: Vec<f32> = draws.iter().map(|&r| r as f32).collect();
        let last_n = sampler.penalty_last_n();
        model.begin_sampled(&d, last_n, &e.history, opts.max_tokens, &table)?;
        // the host's id for step k from its row
        let host = |row: &[f32], history: &[u32], k: usize| {
            let r = draws.get(k).copied().unwrap_or(0.0);
            sampler.sample_drawn(row, history, &Draw { r, ..d })
        };
        let (pk, st) = model.forward_sampled_step_async(prompt_ids).await?;
        check_stats(&st, vocab, 0, model.position())?;
        let mut id = pk.id;
        if pk.uncertain() {
            id = host(&model.last_logits_async().await?, &e.history, 0);
            model.fix_sampled(0, id)?;
        }
        prefill_s = crate::gpu::now_s() - t0;
        t1 = crate::gpu::now_s();
        if accept(&mut e, id)? {
            let start = model.position();
            let steps = opts.max_tokens - e.out.len();
            #[cfg(not(target_arch = "wasm32"))]
            {
                // Pipelined: each pick feeds the next step on the GPU, and
                // a host id that differs rolls the steps after it back.
                model.decode_sampled(id, 1, steps, DECODE_DEPTH, |pk, st, row| {
                    decode_steps += 1;
                    check_stats(&st, vocab, decode_steps, start + decode_steps)?;
                    let id = row.map_or(pk.id, |l| host(l, &e.history, decode_steps));
                    Ok(if accept(&mut e, id)? {
                        SampledStep::Next(id)
                    } else {
                        SampledStep::Stop
                    })
                })?;
            }
            #[cfg(target_arch = "wasm32")]
            for _ in 0..steps {
                // In a browser one step at a time (each readback yields).
                let (pk, st) = model.forward_sampled_step_async(&[id]).await?;
                decode_steps += 1;
                check_stats(&st, vocab, decode_steps, start + decode_steps)?;
                id = pk.id;
                if pk.uncertain() {
                    id = host(&model.last_logits_async().await?, &e.history, decode_steps);
                    model.fix_sampled(decode_steps, id)?;
                }
                if !accept(&mut e, id)? {
                    break;
                }
            }
        }
    } else if opts.max_tokens > 0 {
        // One blocking step at a time. The GPU sampler picks the id
        // (`ops::sample_full`); where it does not take the settings, with
        // top-k the GPU picks the candidates and only they come back
        // (`ops::sample`: the same ids as sampling the whole row), else the
        // whole row is read back. Any way a non-finite step stops here.
        let mut input = prompt_ids.to_vec();
        loop {
            let id = if let Some((draw, window)) = sampler.gpu_step(&e.history) {
                // The whole sampler on the GPU: only the id comes back,
                // unless the kernel could not decide the step within its
                // error bound; then the host samples the row with the same
                // uniform (the CPU sampler's id either way).
                let (pk, st) = model.forward_sampled_async(&input, &draw, &window).await?;
                check_stats(&st, vocab, decode_steps, model.position())?;
                if pk.uncertain() {
                    let logits = model.last_logits_async().await?;
                    sampler.sample_drawn(&logits, &e.history, &draw)
                } else {
                    pk.id
                }
            } else {
                match sampler.candidate_request(&e.history) {
                    Some((want, window)) => {
                        let (c, st) = model
                            .forward_candidates_async(&input, want, &window)
                            .await?;
                        check_stats(&st, vocab, decode_steps, model.position())?;
                        if c.overflow {
                            let logits = model.last_logits_async().await?;
                            sampler.sample(&logits, &e.history)
                        } else {
                            sampler.sample_candidates(&c.with_extra(&window), &e.history)
                        }
                    }
                    None => {
                        let logits = model.forward_logits_async(&input).await?;
                        check_logits(&logits, decode_steps, model.position())?;
                        sampler.sample(&logits, &e.history)
                    }
                }
            };
            if decode_steps == 0 {
                prefill_s = crate::gpu::now_s() - t0;
                t1 = crate::gpu::now_s();
            }
            if !accept(&mut e, id)? {
                break;
            }
            input = vec![id];
            decode_steps += 1;
        }
    }
    let decode_s = crate::gpu::now_s() - t1;
    Ok(Generation {
        prompt_ids: prompt_ids.to_vec(),
        text: e.dec.text()?,
        generated_ids: e.out,
        stop_reason: e.stop_reason,
        prefill_tokens_per_s: if prefill_s > 0.0 {
            prompt_ids.len() as f64 / prefill_s
        } else {
            0.0
        },
        decode_tokens_per_s: if decode_s > 0.0 {
            decode_steps as f64 / decode_s
        } else {
            0.0
        },
    })
}

/// What generation has emitted so far.
struct Emit<'t> {
    /// Every input token (earlier turns, prompt) and every emitted one: the
    /// repetition penalty's window.
    history: Vec<u32>,
    out: Vec<u32>,
    dec: StreamDecoder<'t>,
    stop_reason: String,
}

impl Emit<'_> {
    /// Take the next token `id`; false when generation ends here (EOS, an
    /// interruption, or --max-tokens reached with `id`).
    fn accept(
        &mut self,
        id: u32,
        opts: &GenerateOptions,
        interrupted: &dyn Fn() -> bool,
        on_text: &mut impl FnMut(&str),
    ) -> Result<bool> {
        if opts.stop_ids.contains(&id) {
            self.stop_reason = "eos".into();
            return Ok(false);
        }
        if interrupted() {
            // `id` was chosen but is dropped: it was never run.
            self.stop_reason = "interrupted".into();
            return Ok(false);
        }
        self.out.push(id);
        self.history.push(id);
        on_text(&self.dec.push(id)?);
        Ok(self.out.len() < opts.max_tokens)
    }
}

/// A multi-turn conversation on one [`Model`] that keeps the KV cache
/// across turns: each turn renders the whole conversation with the chat
/// template and runs only the tokens past the longest common prefix with
/// what the cache holds.
///
/// An interrupted reply (see [`generate_interruptible`]) is kept in the
/// history as the assistant's (partial) message, as llama.cpp's interactive
/// mode keeps it in its context; the cache then holds exactly the tokens
/// that were run, and the next turn re-renders and reuses the common prefix.
pub struct Conversation {
    pub template: crate::chat::ChatTemplate,
    pub messages: Vec<crate::chat::ChatMessage>,
    /// The token ids the model's KV cache holds, in order.
    cached: Vec<u32>,
}

impl Conversation {
    /// A new conversation; the model's cache is reset on the first turn.
    pub fn new(template: crate::chat::ChatTemplate, system: Option<String>) -> Self {
        Conversation {
            template,
            messages: system
                .map(crate::chat::ChatMessage::system)
                .into_iter()
                .collect(),
            cached: Vec::new(),
        }
    }

    /// The token ids the KV cache holds (what the model has run).
    pub fn cached(&self) -> &[u32] {
        &self.cached
    }

    /// The token ids of the conversation so far plus a generation prompt.
    pub fn render_ids(&self, tok: &Tokenizer) -> Result<Vec<u32>> {
        let ids = tok.encode(&self.template.render(&self.messages, true)?)?;
        if ids.is_empty() {
            return Err(Error::invalid(
                "the chat template renders the conversation to no tokens",
            ));
        }
        Ok(ids)
    }

    /// One turn: the user's message, then the reply (streamed to `on_text`).
    /// On an error the user's message is taken back and the cache and
    /// [`Conversation::cached`] still agree, so the conversation can go on.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn turn(
        &mut self,
        model: &mut Model,
        tok: &Tokenizer,
        user: String,
        opts: &GenerateOptions,
        interrupted: &dyn Fn() -> bool,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        crate::gpu::block_on(self.turn_async(model, tok, user, opts, interrupted, on_text))
    }

    /// [`Conversation::turn`] as a future (the browser's chat awaits it).
    pub async fn turn_async(
        &mut self,
        model: &mut Model,
        tok: &Tokenizer,
        user: String,
        opts: &GenerateOptions,
        interrupted: &dyn Fn() -> bool,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        if self.cached.len() != model.position() {
            // The model was used by someone else since the last turn.
            model.reset();
            self.cached.clear();
        }
        self.messages.push(crate::chat::ChatMessage::user(user));
        // The message is the reply's own text (its ids decoded alone, as
        // transformers' chat pipeline stores it), not the streamed
        // continuation: a SentencePiece reply streams as " Hi" after
        // `[/INST]`, and the template puts its own separator before the
        // message when it renders it again.
        let g = self.reply(model, tok, opts, interrupted, on_text).await;
        let g = g.and_then(|g| Ok((tok.decode_skip_special(&g.generated_ids)?, g)));
        match g {
            Ok((text, g)) => {
                self.messages
                    .push(crate::chat::ChatMessage::assistant(text));
                Ok(g)
            }
            Err(e) => {
                self.messages.pop();
                Err(e)
            }
        }
    }

    async fn reply(
        &mut self,
        model: &mut Model,
        tok: &Tokenizer,
        opts: &GenerateOptions,
        interrupted: &dyn Fn() -> bool,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let ids = self.render_ids(tok)?;
        let common = self
            .cached
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count();
        // Run at least one token: the next token's logits come from it.
        let keep = common.min(ids.len() - 1);
        model.truncate(keep)?;
        self.cached.truncate(keep);
        let fed = &ids[keep..];
        let res =
            generate_interruptible_async(model, tok, &ids[..keep], fed, opts, interrupted, on_text)
                .await;
        // What the cache holds now, from the model's own count: the fed
        // tokens, then the generated ones, as far as they were run.
        let ran = model.position().saturating_sub(keep);
        let generated: &[u32] = res.as_ref().map(|g| &g.generated_ids[..]).unwrap_or(&[]);
        if ran > fed.len() + generated.len() {
            // An error after unknown tokens ran: start the cache afresh.
            model.reset();
            self.cached.clear();
        } else {
            self.cached
                .extend(fed.iter().chain(generated).take(ran).copied());
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_ids_from_both_configs_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(eos_ids(dir.path(), &[2]).unwrap(), vec![2]);
        let gen = dir.path().join("generation_config.json");
        for (text, want) in [
            (r#"{"eos_token_id": [7, 2]}"#, vec![7, 2]),
            (r#"{"eos_token_id": 5}"#, vec![5, 2]),
            (r#"{"eos_token_id": null}"#, vec![2]),
            (r#"{}"#, vec![2]),
        ] {
            std::fs::write(&gen, text).unwrap();
            assert_eq!(eos_ids(dir.path(), &[2]).unwrap(), want, "{text}");
        }
        for (text, want) in [
            (r#"{"eos_token_id": 4294967298}"#, "`eos_token_id`"),
            (r#"{"eos_token_id": [1, -1]}"#, "got -1"),
            (r#"{"eos_token_id": "2"}"#, "expected a token id"),
            ("{not json", "invalid JSON"),
        ] {
            std::fs::write(&gen, text).unwrap();
            let e = eos_ids(dir.path(), &[2]).unwrap_err().to_string();
            assert!(
                e.contains("generation_config.json") && e.contains(want),
                "{e}"
            );
        }
    }

    #[test]
    fn non_finite_logits_name_the_step() {
        assert!(check_logits(&[0.0, -3.5, f32::MAX], 4, 10).is_ok());
        let e = check_logits(&[0.0, f32::NAN, f32::INFINITY, f32::NAN], 0, 7)
            .unwrap_err()
            .to_string();
        assert!(e.contains("generation step 0 (the prompt's pass)"), "{e}");
        assert!(e.contains("2 NaN and 1 infinite of 4"), "{e}");
        assert!(e.contains("first at token id 1"), "{e}");
        assert!(e.contains("7 tokens in the context"), "{e}");
        let e = check_logits(&[f32::NEG_INFINITY, 1.0], 12, 30)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("step 12 (after generated token 12)") && e.contains("value -inf"),
            "{e}"
        );
    }
}
