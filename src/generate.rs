//! Text generation on a [`Model`]: prefill, then one decode step per token,
//! streaming text as it is produced.

use std::path::Path;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::{Model, DECODE_DEPTH};
use crate::sampling::{Sampler, SamplingParams};
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
    /// `eos` or `max_tokens`.
    pub stop_reason: String,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// The EOS ids of a model folder: generation_config.json's `eos_token_id`
/// (int or list) when present, else config.json's.
pub fn eos_ids(dir: &Path, config_eos: &[u32]) -> Vec<u32> {
    let p = dir.join("generation_config.json");
    let from_gen = std::fs::read_to_string(&p)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| match v.get("eos_token_id")? {
            serde_json::Value::Number(n) => Some(vec![n.as_u64()? as u32]),
            serde_json::Value::Array(a) => Some(
                a.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as u32))
                    .collect(),
            ),
            _ => None,
        });
    let mut ids = from_gen.unwrap_or_default();
    for &e in config_eos {
        if !ids.contains(&e) {
            ids.push(e);
        }
    }
    ids
}

/// Decodes a growing id sequence to text, emitting only complete characters.
pub struct StreamDecoder<'t> {
    tok: &'t Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(tok: &'t Tokenizer) -> Self {
        StreamDecoder {
            tok,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Add a token; returns the new text that is now complete.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tok.decode_skip_special(&self.ids)?;
        // A byte-level token can end in the middle of a UTF-8 sequence; the
        // decoder shows that as U+FFFD: wait for the next token.
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted {
            return Ok(String::new());
        }
        let new = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(new)
    }

    pub fn text(&self) -> Result<String> {
        self.tok.decode_skip_special(&self.ids)
    }
}

/// Generate after `prompt_ids`, which are appended to whatever the model
/// already has cached. Calls `on_text` with each complete piece of text.
pub fn generate(
    model: &mut Model,
    tok: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let needed = model.position() + prompt_ids.len() + opts.max_tokens;
    if needed > model.max_context {
        return Err(Error::invalid(format!(
            "prompt ({} tokens{}) + --max-tokens {} = {needed} exceeds the context of {} tokens; lower --max-tokens or raise --max-context",
            prompt_ids.len(),
            if model.position() > 0 {
                format!(" after {} cached", model.position())
            } else {
                String::new()
            },
            opts.max_tokens,
            model.max_context
        )));
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let plain_greedy = opts.sampling.is_greedy() && opts.sampling.repeat_penalty == 1.0;
    let mut history: Vec<u32> = prompt_ids.to_vec();
    let mut out = Vec::new();
    let mut dec = StreamDecoder::new(tok);
    let mut stop_reason = "max_tokens".to_string();

    let step = |model: &mut Model, input: &[u32], history: &[u32], sampler: &mut Sampler| {
        if plain_greedy {
            model.forward_next(input)
        } else {
            let logits = model.forward_logits(input)?;
            Ok(sampler.sample(&logits, history))
        }
    };

    let t0 = Instant::now();
    let mut prefill_s = 0.0;
    let mut next = if opts.max_tokens > 0 {
        let n = step(model, prompt_ids, &history, &mut sampler)?;
        prefill_s = t0.elapsed().as_secs_f64();
        Some(n)
    } else {
        None
    };
    let t1 = Instant::now();
    let mut decode_steps = 0usize;
    if plain_greedy {
        // No host round trip: the argmax feeds the next step on the GPU,
        // steps are submitted ahead and ids come back through a ring.
        if let Some(first) = next.take() {
            let mut emit = |id: u32, out: &mut Vec<u32>| -> Result<bool> {
                if opts.stop_ids.contains(&id) {
                    stop_reason = "eos".into();
                    return Ok(false);
                }
                out.push(id);
                on_text(&dec.push(id)?);
                Ok(out.len() < opts.max_tokens)
            };
            if emit(first, &mut out)? {
                let steps = opts.max_tokens - out.len();
                let run =
                    model.decode_greedy(first, steps, DECODE_DEPTH, |id| emit(id, &mut out))?;
                decode_steps = run.kept;
            }
        }
    }
    while let Some(id) = next.take() {
        if opts.stop_ids.contains(&id) {
            stop_reason = "eos".into();
            break;
        }
        out.push(id);
        history.push(id);
        on_text(&dec.push(id)?);
        if out.len() >= opts.max_tokens {
            break;
        }
        next = Some(step(model, &[id], &history, &mut sampler)?);
        decode_steps += 1;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    Ok(Generation {
        prompt_ids: prompt_ids.to_vec(),
        text: dec.text()?,
        generated_ids: out,
        stop_reason,
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
