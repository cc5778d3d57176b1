//! Model shapes by name, for benchmarks and plans on randomly initialised weights: `tiny`
//! (the tiny-llava fixture's shape), `small` (the PyTorch peer harness's small model,
//! shared/peer/bench.py), and the paper's `llava-7b` / `llava-13b` (LLaVA-1.5: a Vicuna
//! decoder, CLIP ViT-L/14 at 336 px, the two-layer GELU projector), written out in full
//! with the values of llava-hf/llava-1.5-{7b,13b}-hf's config.json.

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

const LLAVA_7B: &str = r#"{"model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
 "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
 "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "num_hidden_layers": 32,
   "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008, "rms_norm_eps": 1e-5,
   "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": false},
 "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14, "hidden_size": 1024,
   "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096, "hidden_act": "quick_gelu",
   "layer_norm_eps": 1e-5}}"#;

const LLAVA_13B: &str = r#"{"model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
 "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
 "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 5120, "num_hidden_layers": 40,
   "num_attention_heads": 40, "num_key_value_heads": 40, "intermediate_size": 13824, "rms_norm_eps": 1e-5,
   "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": false},
 "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14, "hidden_size": 1024,
   "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096, "hidden_act": "quick_gelu",
   "layer_norm_eps": 1e-5}}"#;

/// The preset names, for help texts and errors.
pub const PRESETS: &str = "tiny, small, llava-7b, llava-13b";

/// A named preset's config.json text (llava-hf's format, as transformers' `LlavaConfig`
/// reads it).
pub fn preset_json(name: &str) -> Result<&'static str> {
    Ok(match name {
        "tiny" => TINY,
        "small" => SMALL,
        "llava-7b" => LLAVA_7B,
        "llava-13b" => LLAVA_13B,
        other => bail!("--preset `{other}` is unknown ({PRESETS})"),
    })
}

/// A named preset's resolved config.
pub fn preset(name: &str) -> Result<LlavaSpec> {
    let json = preset_json(name)?;
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

    #[test]
    fn paper_presets_have_llava_15s_parameter_counts() {
        let keys = crate::model::params::KeyPrefixes::llava_legacy();
        let count = |name: &str| {
            let s = preset(name).unwrap();
            let llm: usize = crate::model::params::llm_specs(&s.text, &keys)
                .iter()
                .map(|p| p.numel())
                .sum();
            let proj: usize = crate::model::params::projector_specs(&s.projector, &keys)
                .iter()
                .map(|p| p.numel())
                .sum();
            (
                llm,
                proj,
                crate::model::params::vision_param_count(&s.vision),
            )
        };
        // Vicuna-7B / 13B (LLaMA-2 shapes with LLaVA's 32064-token vocabulary); the
        // projector 1024 -> 4096/5120 -> 4096/5120 with biases; CLIP ViT-L/14-336's vision
        // model (577 positions, pre- and post-layernorm), as transformers counts them
        let (l7, p7, v7) = count("llava-7b");
        assert_eq!(l7, 6_738_939_904);
        assert_eq!(p7, 1024 * 4096 + 4096 + 4096 * 4096 + 4096);
        assert_eq!(v7, 303_507_456);
        let (l13, p13, v13) = count("llava-13b");
        assert_eq!(l13, 13_016_519_680);
        assert_eq!(p13, 1024 * 5120 + 5120 + 5120 * 5120 + 5120);
        assert_eq!(v13, v7);
    }
}
