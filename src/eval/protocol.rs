//! How questions are asked: the two harnesses the paper's numbers come from (LLaVA-1.5's
//! greedy short answers, and the paper authors' sampling with text-only demonstrations).

use serde::{Deserialize, Serialize};

use super::generate::GenConfig;
use crate::data::template::SHORT_ANSWER;

/// How questions are asked: the two harnesses the paper's numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// LLaVA-1.5's: greedy; short questions end with "Answer the question using a single
    /// word or phrase."
    Llava,
    /// The paper authors': sampling (top-k 50, temperature 0.2), three text-only
    /// demonstrations before VQAv2 questions and caption requests
    Authors,
}

/// Text-only demonstrations of the authors' protocol: (user, assistant) turns before the
/// question. They show the answer format, not the image.
pub fn demonstrations(protocol: Protocol, caption: bool) -> Vec<(String, String)> {
    if protocol != Protocol::Authors {
        return vec![];
    }
    let pairs: [(&str, &str); 3] = if caption {
        [
            (
                CAPTION_PROMPT,
                "A man riding a bicycle down a busy city street.",
            ),
            (
                CAPTION_PROMPT,
                "A plate of rice and broccoli on a wooden table.",
            ),
            (
                CAPTION_PROMPT,
                "Two dogs playing with a red frisbee in a park.",
            ),
        ]
    } else {
        [
            ("What color is a ripe banana?", "Yellow"),
            ("How many legs does a spider have?", "8"),
            ("Is the sky blue on a clear day?", "Yes"),
        ]
    };
    pairs
        .iter()
        .map(|(q, a)| {
            let q = if caption {
                q.to_string()
            } else {
                format!("{q}\n{SHORT_ANSWER}")
            };
            (q, a.to_string())
        })
        .collect()
}

/// LLaVA-1.5's caption request.
pub const CAPTION_PROMPT: &str = "Provide a one-sentence caption for the provided image.";

/// Generation settings of a protocol.
pub fn protocol_generation(protocol: Protocol, max_new_tokens: usize, seed: u64) -> GenConfig {
    let mut g = GenConfig::greedy(max_new_tokens);
    if protocol == Protocol::Authors {
        g.temperature = 0.2;
        g.top_k = 50;
        g.seed = seed;
    }
    g
}
