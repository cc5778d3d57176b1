//! Model configs. Two layers, as in candle-transformers: serde structs that mirror the HF
//! `config.json` files field by field (every field optional, because hub configs often spell
//! out only what differs from the transformers class defaults), and plain runtime configs
//! with every value resolved. The defaults in `text` and `vision` are the transformers class defaults for
//! each `model_type`, so that e.g. llava-hf/llava-1.5-7b-hf's sparse `text_config` resolves
//! to Vicuna-7B.
//!
//! `file` holds the mirrors and the largest sizes a config may claim, `text` the language
//! model's runtime config, `vision` the tower's and the projector's.

mod file;
mod text;
mod vision;

pub use file::*;
pub use text::*;
pub use vision::*;

#[cfg(test)]
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;
    use crate::ops::act::Act;

    #[test]
    fn sparse_llava_15_config_resolves_to_vicuna_7b_and_clip_l336() {
        // llava-hf/llava-1.5-7b-hf's config.json spells out only what differs from defaults
        let json = r#"{"model_type": "llava", "image_token_index": 32000,
            "projector_hidden_act": "gelu", "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
                "vocab_size": 32064},
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                "model_type": "clip_vision_model", "num_attention_heads": 16,
                "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                "vocab_size": 32000}}"#;
        let f: LlavaConfigFile = serde_json::from_str(json).unwrap();
        let t = f.text_config.unwrap().resolve("llama", None, "t").unwrap();
        assert_eq!(
            (
                t.hidden_size,
                t.num_layers,
                t.num_heads,
                t.num_kv_heads,
                t.intermediate_size
            ),
            (4096, 32, 32, 32, 11008)
        );
        assert_eq!(
            (t.vocab_size, t.head_dim, t.tie_word_embeddings),
            (32064, 128, false)
        );
        assert_eq!(
            t.rope,
            RopeConfig {
                theta: 10000.0,
                scaling: RopeScaling::Default
            }
        );
        let VisionConfig::Clip(v) = f
            .vision_config
            .unwrap()
            .resolve("clip_vision_model", "v")
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (v.hidden_size, v.num_layers, v.patch_size, v.image_size),
            (1024, 24, 14, 336)
        );
        assert_eq!((v.hidden_act, v.layer_norm_eps), (Act::QuickGelu, 1e-5));
    }

    #[test]
    fn rope_settings_in_both_spellings() {
        let v4: TextConfigFile = serde_json::from_str(
            r#"{"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}"#,
        )
        .unwrap();
        let v5: TextConfigFile = serde_json::from_str(
            r#"{"rope_parameters": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}}"#,
        )
        .unwrap();
        let a = v4.resolve("llama", None, "a").unwrap().rope;
        assert_eq!(a, v5.resolve("llama", None, "b").unwrap().rope);
        assert_eq!(a.scaling, RopeScaling::Linear { factor: 2.0 });
        let bad: TextConfigFile =
            serde_json::from_str(r#"{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#)
                .unwrap();
        let err = bad
            .resolve("llama", None, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cfg.json") && err.contains("yarn"), "{err}");
    }

    #[test]
    fn inv_freq_matches_transformers() {
        // transformers ROPE_INIT_FUNCTIONS, head_dim 128
        let llama3 = RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        };
        let inv = llama3.inv_freq(128);
        let want = [
            (0, 1.0f32),
            (20, 0.016_560_441),
            (40, 3.428_102_4e-5),
            (45, 1.229_763_9e-5),
            (50, 4.411_534_5e-6),
            (63, 3.068_925_9e-7),
        ];
        for (i, w) in want {
            assert!(
                (inv[i] - w).abs() <= 1e-6 * w.abs(),
                "llama3 [{i}] {} vs {w}",
                inv[i]
            );
        }
        let linear = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::Linear { factor: 4.0 },
        };
        let inv = linear.inv_freq(128);
        for (i, w) in [(0, 0.25f32), (1, 0.216_491_09), (63, 2.886_954_8e-5)] {
            assert!(
                (inv[i] - w).abs() <= 1e-6 * w,
                "linear [{i}] {} vs {w}",
                inv[i]
            );
        }
    }

    #[test]
    fn projector_type_names() {
        let p = ProjectorConfig::parse_type("mlp3x_gelu", true, 8, 16, "x").unwrap();
        assert_eq!(p.num_linears, 3);
        assert_eq!(
            ProjectorConfig::parse_type("linear", true, 8, 16, "x")
                .unwrap()
                .num_linears,
            1
        );
        assert!(ProjectorConfig::parse_type("resampler", true, 8, 16, "x").is_err());
    }
}
