//! The server's counters, gauges and histograms, rendered in the Prometheus
//! text exposition format for `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Latency buckets (seconds): from a fast GPU's inter-token latency (ms) to
/// a CPU device's time to first token on a long prompt (tens of seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone, Debug, Default)]
struct Histogram {
    /// Cumulative only when rendered; here one count per bucket.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; LATENCY_BUCKETS.len()];
        }
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut acc = 0u64;
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            acc += self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Finished requests by outcome: `stop`, `length`, `cancelled` (client
    /// gone or shutdown), `error` (engine failure).
    outcomes: BTreeMap<&'static str, u64>,
    /// HTTP error answers by status code.
    http_errors: BTreeMap<u16, u64>,
    prompt_tokens: u64,
    prefilled_tokens: u64,
    generated_tokens: u64,
    ttft: Histogram,
    itl: Histogram,
    decode_steps: u64,
    decode_step_sequences: u64,
    decode_readback_bytes: u64,
    decode_host_sampled: u64,
    prefix_lookups: u64,
    prefix_hits: u64,
    prefix_reused_tokens: u64,
    queue_depth: u64,
    active: u64,
    kv_used: u64,
    kv_capacity: u64,
    slots: u64,
    ready: bool,
}

/// Shared by the HTTP handlers and the engine thread.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    pub fn finished(&self, outcome: &'static str) {
        self.with(|m| *m.outcomes.entry(outcome).or_default() += 1)
    }
    pub fn http_error(&self, status: u16) {
        self.with(|m| *m.http_errors.entry(status).or_default() += 1)
    }
    /// A prompt admitted to a slot: its length, the tokens actually run
    /// (the rest came from the slot's cache).
    pub fn admitted(&self, prompt: usize, prefilled: usize) {
        self.with(|m| {
            m.prompt_tokens += prompt as u64;
            m.prefilled_tokens += prefilled as u64;
            m.prefix_lookups += 1;
            if prefilled < prompt {
                m.prefix_hits += 1;
                m.prefix_reused_tokens += (prompt - prefilled) as u64;
            }
        })
    }
    pub fn generated(&self, n: usize) {
        self.with(|m| m.generated_tokens += n as u64)
    }
    pub fn ttft(&self, s: f64) {
        self.with(|m| m.ttft.observe(s))
    }
    pub fn inter_token(&self, s: f64) {
        self.with(|m| m.itl.observe(s))
    }
    pub fn decode_step(&self, sequences: usize) {
        self.with(|m| {
            m.decode_steps += 1;
            m.decode_step_sequences += sequences as u64;
        })
    }
    /// Bytes a decode pass read back from the device (every row's logits,
    /// or the picks and the rows that needed them), and the rows whose pick
    /// the device sampler left to the host.
    pub fn decode_readback(&self, bytes: u64, host_sampled: usize) {
        self.with(|m| {
            m.decode_readback_bytes += bytes;
            m.decode_host_sampled += host_sampled as u64;
        })
    }
    pub fn queue_depth(&self, n: usize) {
        self.with(|m| m.queue_depth = n as u64)
    }
    /// Active sequences and the KV cache positions held by all slots.
    pub fn occupancy(&self, active: usize, kv_used: usize) {
        self.with(|m| {
            m.active = active as u64;
            m.kv_used = kv_used as u64;
        })
    }
    pub fn set_ready(&self, slots: usize, kv_capacity: usize) {
        self.with(|m| {
            m.ready = true;
            m.slots = slots as u64;
            m.kv_capacity = kv_capacity as u64;
        })
    }

    /// Finished requests with this outcome (for tests and logs).
    pub fn outcome_count(&self, outcome: &str) -> u64 {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.outcomes.get(outcome).copied().unwrap_or(0)
    }

    pub fn render(&self) -> String {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut o = String::new();
        let counter = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let _ = writeln!(
            o,
            "# HELP wgllm_requests_total Finished generation requests by outcome (stop, length, cancelled, error).\n# TYPE wgllm_requests_total counter"
        );
        for k in ["stop", "length", "cancelled", "error"] {
            let v = m.outcomes.get(k).copied().unwrap_or(0);
            let _ = writeln!(o, "wgllm_requests_total{{outcome=\"{k}\"}} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP wgllm_http_errors_total Requests answered with an HTTP error, by status.\n# TYPE wgllm_http_errors_total counter"
        );
        for (k, v) in &m.http_errors {
            let _ = writeln!(o, "wgllm_http_errors_total{{status=\"{k}\"}} {v}");
        }
        counter(
            &mut o,
            "wgllm_prompt_tokens_total",
            "Prompt tokens of admitted requests (cached and prefilled).",
            m.prompt_tokens,
        );
        counter(
            &mut o,
            "wgllm_prefill_tokens_total",
            "Prompt tokens actually run through the model (not reused from a slot's cache).",
            m.prefilled_tokens,
        );
        counter(
            &mut o,
            "wgllm_generated_tokens_total",
            "Generated tokens.",
            m.generated_tokens,
        );
        m.ttft.render(
            &mut o,
            "wgllm_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
        );
        m.itl.render(
            &mut o,
            "wgllm_inter_token_latency_seconds",
            "Between consecutive generated tokens of one sequence.",
        );
        counter(
            &mut o,
            "wgllm_decode_steps_total",
            "Batched decode passes (one forward pass for all active sequences).",
            m.decode_steps,
        );
        counter(
            &mut o,
            "wgllm_decode_step_sequences_total",
            "Sequences advanced by decode passes (divide by wgllm_decode_steps_total for the mean batch).",
            m.decode_step_sequences,
        );
        counter(
            &mut o,
            "wgllm_decode_readback_bytes_total",
            "Bytes decode passes read back from the device (logits rows, or picks and the rows that need them).",
            m.decode_readback_bytes,
        );
        counter(
            &mut o,
            "wgllm_decode_host_sampled_total",
            "Decode rows whose pick the device sampler left to the host (sampled there from the row).",
            m.decode_host_sampled,
        );
        counter(
            &mut o,
            "wgllm_prefix_cache_lookups_total",
            "Admissions that looked for a cached prefix in a free slot.",
            m.prefix_lookups,
        );
        counter(
            &mut o,
            "wgllm_prefix_cache_hits_total",
            "Admissions that reused at least one cached prompt token.",
            m.prefix_hits,
        );
        counter(
            &mut o,
            "wgllm_prefix_cache_reused_tokens_total",
            "Prompt tokens taken from a slot's cache instead of being prefilled.",
            m.prefix_reused_tokens,
        );
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let gauge = |o: &mut String, name: &str, help: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut o,
            "wgllm_prefix_cache_hit_ratio",
            "wgllm_prefix_cache_hits_total / wgllm_prefix_cache_lookups_total.",
            ratio(m.prefix_hits, m.prefix_lookups).to_string(),
        );
        gauge(
            &mut o,
            "wgllm_queue_depth",
            "Requests waiting for a slot.",
            m.queue_depth.to_string(),
        );
        gauge(
            &mut o,
            "wgllm_active_sequences",
            "Sequences holding a slot (prefilling or decoding).",
            m.active.to_string(),
        );
        gauge(
            &mut o,
            "wgllm_slots",
            "Sequence slots (sequences decoded together).",
            m.slots.to_string(),
        );
        gauge(
            &mut o,
            "wgllm_kv_cache_used_tokens",
            "KV cache positions held, over all slots (including cached prefixes of free slots).",
            m.kv_used.to_string(),
        );
        gauge(
            &mut o,
            "wgllm_kv_cache_capacity_tokens",
            "KV cache positions over all slots.",
            m.kv_capacity.to_string(),
        );
        gauge(
            &mut o,
            "wgllm_kv_cache_usage_ratio",
            "wgllm_kv_cache_used_tokens / wgllm_kv_cache_capacity_tokens.",
            ratio(m.kv_used, m.kv_capacity).to_string(),
        );
        gauge(
            &mut o,
            "wgllm_ready",
            "1 once the model has loaded.",
            u8::from(m.ready).to_string(),
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_histograms() {
        let m = Metrics::default();
        m.finished("stop");
        m.finished("stop");
        m.http_error(400);
        m.admitted(10, 4);
        m.admitted(5, 5);
        m.ttft(0.02);
        m.ttft(3.0);
        let t = m.render();
        assert!(
            t.contains("wgllm_requests_total{outcome=\"stop\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("wgllm_http_errors_total{status=\"400\"} 1\n"),
            "{t}"
        );
        assert!(t.contains("wgllm_prompt_tokens_total 15\n"), "{t}");
        assert!(t.contains("wgllm_prefix_cache_hits_total 1\n"), "{t}");
        assert!(
            t.contains("wgllm_prefix_cache_reused_tokens_total 6\n"),
            "{t}"
        );
        assert!(t.contains("wgllm_prefix_cache_hit_ratio 0.5\n"), "{t}");
        // 0.02 falls in le=0.025 and every bucket above; 3.0 from le=5 on.
        assert!(t.contains("wgllm_time_to_first_token_seconds_bucket{le=\"0.01\"} 0\n"));
        assert!(t.contains("wgllm_time_to_first_token_seconds_bucket{le=\"0.025\"} 1\n"));
        assert!(t.contains("wgllm_time_to_first_token_seconds_bucket{le=\"2.5\"} 1\n"));
        assert!(t.contains("wgllm_time_to_first_token_seconds_bucket{le=\"5\"} 2\n"));
        assert!(t.contains("wgllm_time_to_first_token_seconds_count 2\n"));
    }
}
