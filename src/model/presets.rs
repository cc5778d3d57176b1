//! Model shapes by name, for benchmarks and tests on randomly initialised weights: `tiny`
//! (the tiny-llava fixture's shape) and `small` (the PyTorch peer harness's small model,
//! shared/peer/bench.py).

use anyhow::{Result, bail};

use super::config::LlavaConfigFile;
use super::load::LlavaSpec;

const TINY: &str = r#"{"model_type": "llava", "image_token_index": 511, "projector_hidden_act": "gelu",
 "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
 "text_config": {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 4,
   "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256, "rms_norm_eps": 1e-5,
   "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": false},
 "vision_config": {"model_type": "clip_vision_model", "image_size": 56, "patch_size": 14, "hidden_size": 64,
   "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "hidden_act": "quick_gelu",
   "layer_norm_eps": 1e-5}}"#;

const SMALL: &str = r#"{"model_type": "llava", "image_token_index": 49151, "projector_hidden_act": "gelu",
 "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
 "text_config": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 12,
   "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, "rms_norm_eps": 1e-5,
   "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": false},
 "vision_config": {"model_type": "clip_vision_model", "image_size": 224, "patch_size": 16, "hidden_size": 384,
   "num_hidden_layers": 6, "num_attention_heads": 6, "intermediate_size": 1536, "hidden_act": "quick_gelu",
   "layer_norm_eps": 1e-5}}"#;

/// A named preset's resolved config.
pub fn preset(name: &str) -> Result<LlavaSpec> {
    let json = match name {
        "tiny" => TINY,
        "small" => SMALL,
        other => bail!("--preset `{other}` is unknown (tiny, small)"),
    };
    let file: LlavaConfigFile = serde_json::from_str(json).expect("preset JSON is valid");
    LlavaSpec::from_file(&file, &format!("preset {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_peer_counts() {
        // shared/peer/RESULTS.md: small total 110,678,208 params
        let s = preset("small").unwrap();
        let keys = crate::model::params::KeyPrefixes {
            llm_body: "l".into(),
            lm_head: "h".into(),
            vision: "v".into(),
            projector: "p".into(),
        };
        let n: usize = crate::model::params::llm_specs(&s.text, &keys)
            .iter()
            .map(|p| p.numel())
            .sum::<usize>()
            + crate::model::params::projector_specs(&s.projector, &keys)
                .iter()
                .map(|p| p.numel())
                .sum::<usize>()
            + crate::model::params::vision_param_count(&s.vision);
        assert_eq!(n, 110_678_208);
    }
}
