//! Rotary position embedding as Hugging Face applies it (rotate_half).

/// `rope_scaling` from config.json, as far as wgllm supports it.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// No scaling (`rope_scaling` absent or `rope_type: "default"`).
    None,
    /// `rope_type: "linear"`: positions divided by `factor`.
    Linear { factor: f32 },
    /// `rope_type: "llama3"`.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}
