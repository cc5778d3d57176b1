//! Mutated inputs: valid files of every kind lntune reads (safetensors, GGUF, ONNX, PNG,
//! JPEG, JSON configs and data) are changed at random, a bounded number of times each (bytes
//! flipped, spans set to extreme values, cut, duplicated), and read. Every read must end in
//! a value or an error, never a panic, and must not ask for more memory than the input
//! could need: the test's allocations on this thread are capped (see `tests.rs`), and an
//! allocation over the cap aborts the test binary.

use std::path::Path;

use lntune::util::rng::Rng;

use crate::alloc_cap::with_cap;
use crate::common::*;

/// Mutations per seed file.
const ROUNDS: usize = 300;
/// Bytes any one read may hold at a time (the seeds are at most a few MB).
const CAP: usize = 256 << 20;

/// One random change of `bytes`.
fn mutate(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = bytes.to_vec();
    if b.is_empty() {
        return b;
    }
    let at = rng.below(b.len());
    match rng.below(6) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
        }
        // a field set to an extreme value: a size or an offset claiming too much
        1 => {
            let v = [0u8, 0xFF, 0x7F, 0x80][rng.below(4)];
            for x in b.iter_mut().skip(at).take(1 + rng.below(8)) {
                *x = v;
            }
        }
        2 => b.truncate(at),
        3 => {
            let end = (at + 1 + rng.below(64)).min(b.len());
            let span = b[at..end].to_vec();
            b.splice(at..at, span);
        }
        4 => {
            let end = (at + 1 + rng.below(64)).min(b.len());
            b.drain(at..end);
        }
        _ => {
            let v = (rng.next_u64() % 4_000_000_000) as u32;
            let end = (at + 4).min(b.len());
            b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
        }
    }
    b
}

/// Reads every mutation of `seed` with `read`, under the allocation cap, catching panics;
/// a panic fails the test naming the round.
fn fuzz(name: &str, seed: &[u8], mut read: impl FnMut(&[u8])) {
    let mut rng = Rng::new(name.len() as u64 * 7919);
    for round in 0..ROUNDS {
        let input = mutate(seed, &mut rng);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            with_cap(CAP, || read(&input))
        }));
        if r.is_err() {
            let path = std::env::temp_dir().join(format!("lntune-panic-{name}-{round}"));
            let _ = std::fs::write(&path, &input);
            panic!(
                "{name}: round {round} panicked (input kept in {})",
                path.display()
            );
        }
    }
}

fn write_temp(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn mutated_safetensors_and_model_configs() {
    use candle_core::Device;
    use lntune::io::store::Store;
    let d = tempfile::tempdir().unwrap();
    let seed = std::fs::read(fixture("tiny-dinov2-llama/projector.safetensors")).unwrap();
    fuzz("safetensors", &seed, |b| {
        let p = write_temp(d.path(), "m.safetensors", b);
        let mut s = Store::new(&Device::Cpu);
        if s.add_safetensors(&p).is_ok() {
            for k in s.keys() {
                let _ = s.load_any(&k);
            }
        }
    });
    let cfg = std::fs::read(fixture("tiny-llava/config.json")).unwrap();
    fuzz("llava-config", &cfg, |b| {
        let dir = d.path().join("cfg");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), b).unwrap();
        let _ = lntune::model::spec::ModelSpec::from_path(&dir);
    });
    let compose = std::fs::read(fixture("tiny-dinov2-llama/compose.json")).unwrap();
    fuzz("compose", &compose, |b| {
        let dir = d.path().join("compose");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("compose.json"), b).unwrap();
        let _ = lntune::model::compose::ComposeFile::read(&dir);
    });
}

#[test]
fn mutated_gguf() {
    use lntune::io::gguf::GgufModel;
    use lntune::io::tokenizer::ChatTokenizer;
    use lntune::model::config::LlmConfig;
    let d = tempfile::tempdir().unwrap();
    let seed_path = d.path().join("seed.gguf");
    let meta = vec![
        ("general.architecture", GgufValue::Str("llama".into())),
        ("llama.embedding_length", GgufValue::U32(8)),
        ("llama.attention.head_count", GgufValue::U32(2)),
        ("llama.feed_forward_length", GgufValue::U32(16)),
        ("llama.block_count", GgufValue::U32(1)),
        ("llama.vocab_size", GgufValue::U32(4)),
        ("tokenizer.ggml.model", GgufValue::Str("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            GgufValue::StrArray(vec!["a".into(), "b".into(), "ab".into(), "<s>".into()]),
        ),
        (
            "tokenizer.ggml.merges",
            GgufValue::StrArray(vec!["a b".into()]),
        ),
    ];
    let tensors = vec![GgufTensor {
        name: "token_embd.weight".into(),
        dims: vec![4, 8],
        ggml_type: GGML_F32,
        data: f32_bytes(&[0.5; 32]),
    }];
    write_gguf(&seed_path, &meta, &tensors);
    let seed = std::fs::read(&seed_path).unwrap();
    fuzz("gguf", &seed, |b| {
        let p = write_temp(d.path(), "m.gguf", b);
        let Ok(g) = GgufModel::open(&p) else { return };
        let _ = LlmConfig::from_gguf(&g);
        let _ = ChatTokenizer::from_gguf(&g);
        for name in g.content.tensor_infos.keys() {
            let _ = g.dequantize_tensor(name);
        }
    });
}

#[test]
fn mutated_onnx() {
    // a prefix of the demo's DINOv2 ONNX when it is cached (the protobuf walker sees
    // messages, tensors and a cut at the end)
    let Some(onnx) = asset("LNTUNE_DINOV2_ONNX", "vit_s_focus.onnx") else {
        return;
    };
    let mut seed = vec![0u8; 1 << 16];
    use std::io::Read;
    let n = std::fs::File::open(onnx).unwrap().read(&mut seed).unwrap();
    seed.truncate(n);
    fuzz("onnx", &seed, |b| {
        let _ = lntune::io::onnx::OnnxGraph::parse(b);
    });
}

#[test]
fn mutated_images() {
    use lntune::data::image::{AlphaMode, Preprocess, decode_rgb};
    let t = TinyRun::new();
    let png = std::fs::read(t.path("data/images/train_00000.png")).unwrap();
    let img = decode_rgb(&png, AlphaMode::CompositeWhite).unwrap();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
        .encode(
            &img.data,
            img.width as u32,
            img.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    for (name, seed) in [("png", png), ("jpeg", jpeg)] {
        fuzz(name, &seed, |b| {
            if let Ok(img) = decode_rgb(b, AlphaMode::CompositeWhite) {
                for p in [
                    Preprocess::clip(224),
                    Preprocess::clip_pad(224),
                    Preprocess::dinov2(),
                ] {
                    let _ = p.pixel_values(&img);
                }
            }
        });
    }
}

#[test]
fn mutated_training_data() {
    use lntune::data::dataset::ExampleBuilder;
    use lntune::data::llava::read_file;
    use lntune::data::template::{Template, TemplateName};
    let t = TinyRun::new();
    let d = tempfile::tempdir().unwrap();
    let tokenizer = tiny_tokenizer();
    let template = Template::new(TemplateName::Chatml, Some(&tokenizer)).unwrap();
    let images = t.path("data/images");
    let builder = ExampleBuilder {
        template: &template,
        tokenizer: &tokenizer,
        image_token_id: 511,
        tokens_per_image: 16,
        max_length: 256,
        image_root: Some(&images),
        allow_any_image_path: false,
        add_special: true,
    };
    let seed = std::fs::read(t.path("data/conversation_train.json")).unwrap();
    // a few samples keep each round quick
    let samples: Vec<serde_json::Value> = serde_json::from_slice(&seed).unwrap();
    let seed = serde_json::to_vec(&samples[..3]).unwrap();
    fuzz("llava-json", &seed, |b| {
        let p = write_temp(d.path(), "data.json", b);
        if let Ok(s) = read_file(&p) {
            let _ = builder.examples(&s);
        }
    });
}
