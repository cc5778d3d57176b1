//! Helpers shared by the integration tests: fixture paths, the `../shared` skip rule, and a
//! minimal GGUF writer so that tests build their own GGUF files.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lntune::jobs::check::diff;

/// Runs the lntune binary with `args`: (exit status success, stdout, stderr).
pub fn lntune<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// A path as a command-line argument.
pub fn p(path: &Path) -> String {
    path.display().to_string()
}

/// `tests/fixtures/<rel>`
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// `../shared/<rel>` when present. Absent: `None` with a note, except under `CI=true`,
/// where the large reference fixtures must be there.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(rel);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{} is required in CI but absent", p.display());
    }
    eprintln!("skipped: {} is absent", p.display());
    None
}

/// An asset file: `$var` if set, else `<lntune cache>/assets/<file>` (where `.ci/run` puts
/// it). Absent: `None` with a note, except under `CI=true`.
pub fn asset(var: &str, file: &str) -> Option<PathBuf> {
    let cache = std::env::var("LNTUNE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let base = std::env::var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache")
                });
            base.join("lntune")
        });
    let p = std::env::var(var)
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache.join("assets").join(file));
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{} is required in CI but absent (set ${var} or run .ci/run)",
            p.display()
        );
    }
    eprintln!(
        "skipped: {} is absent (set ${var} or run .ci/run)",
        p.display()
    );
    None
}

pub fn max_abs(got: &Tensor, want: &Tensor) -> f64 {
    diff("t", got, want).unwrap().max_abs
}

/// Loads all tensors of a safetensors file.
pub fn load_all(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

pub fn save_all(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

/// Copies a directory tree (fixtures are small).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------
// minimal GGUF v3 writer

pub enum GgufValue {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
}

/// One tensor: GGUF name, row-major dims (outermost first), ggml type id, raw bytes.
pub struct GgufTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
}

pub const GGML_F32: u32 = 0;
pub const GGML_F16: u32 = 1;
pub const GGML_Q4_0: u32 = 2;
pub const GGML_Q4_1: u32 = 3;
pub const GGML_Q8_0: u32 = 8;

fn put_str(w: &mut Vec<u8>, s: &str) {
    w.extend((s.len() as u64).to_le_bytes());
    w.extend(s.as_bytes());
}

pub fn write_gguf(path: &Path, meta: &[(&str, GgufValue)], tensors: &[GgufTensor]) {
    let mut w = Vec::new();
    w.extend(b"GGUF");
    w.extend(3u32.to_le_bytes());
    w.extend((tensors.len() as u64).to_le_bytes());
    w.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut w, k);
        match v {
            GgufValue::U32(x) => {
                w.extend(4u32.to_le_bytes());
                w.extend(x.to_le_bytes());
            }
            GgufValue::F32(x) => {
                w.extend(6u32.to_le_bytes());
                w.extend(x.to_le_bytes());
            }
            GgufValue::Bool(x) => {
                w.extend(7u32.to_le_bytes());
                w.push(*x as u8);
            }
            GgufValue::Str(s) => {
                w.extend(8u32.to_le_bytes());
                put_str(&mut w, s);
            }
            GgufValue::StrArray(items) => {
                w.extend(9u32.to_le_bytes());
                w.extend(8u32.to_le_bytes());
                w.extend((items.len() as u64).to_le_bytes());
                for s in items {
                    put_str(&mut w, s);
                }
            }
            GgufValue::I32Array(items) => {
                w.extend(9u32.to_le_bytes());
                w.extend(5u32.to_le_bytes());
                w.extend((items.len() as u64).to_le_bytes());
                for x in items {
                    w.extend(x.to_le_bytes());
                }
            }
        }
    }
    let align = 32usize;
    let mut offset = 0usize;
    let mut offsets = Vec::new();
    for t in tensors {
        offsets.push(offset);
        offset += t.data.len().div_ceil(align) * align;
    }
    for (t, off) in tensors.iter().zip(&offsets) {
        put_str(&mut w, &t.name);
        w.extend((t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            // GGUF lists dims fastest-first
            w.extend((*d as u64).to_le_bytes());
        }
        w.extend(t.ggml_type.to_le_bytes());
        w.extend((*off as u64).to_le_bytes());
    }
    while w.len() % align != 0 {
        w.push(0);
    }
    for t in tensors {
        w.extend(&t.data);
        while w.len() % align != 0 {
            w.push(0);
        }
    }
    std::fs::File::create(path).unwrap().write_all(&w).unwrap();
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A byte-level BPE tokenizer over a 512-id vocabulary (the tiny fixtures' size): ids 0-4
/// special (<pad>, <s>, </s>, <|im_start|>, <|im_end|>), 5-260 the 256 byte symbols, then a
/// few merges; id 511 is `<image>`.
pub fn tiny_tokenizer() -> lntune::io::tokenizer::ChatTokenizer {
    use tokenizers::models::bpe::BPE;
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    bs.extend(0xA1..=0xAC);
    bs.extend(0xAE..=0xFF);
    let mut byte_chars = Vec::new();
    let mut n = 0;
    for b in 0..256u32 {
        if bs.contains(&b) {
            byte_chars.push(char::from_u32(b).unwrap().to_string());
        } else {
            byte_chars.push(char::from_u32(256 + n).unwrap().to_string());
            n += 1;
        }
    }
    let mut vocab: Vec<String> = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    vocab.extend(byte_chars);
    let merges = [
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("Ġ", "a"),
        ("i", "s"),
        ("Ġ", "c"),
    ];
    for (a, b) in merges {
        vocab.push(format!("{a}{b}"));
    }
    while vocab.len() < 511 {
        vocab.push(format!("<unused{}>", vocab.len()));
    }
    vocab.push("<image>".into());
    let map: tokenizers::models::bpe::Vocab = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(
            map,
            merges
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(
        tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true),
    ));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    tok.add_special_tokens(
        [
            "<pad>",
            "<s>",
            "</s>",
            "<|im_start|>",
            "<|im_end|>",
            "<image>",
        ]
        .map(|t| tokenizers::AddedToken::from(t, true)),
    )
    .unwrap();
    lntune::io::tokenizer::ChatTokenizer {
        tokenizer: tok,
        chat_template: None,
        bos_token: Some("<s>".into()),
        eos_token: Some("<|im_end|>".into()),
        bos_id: Some(1),
        eos_id: Some(4),
        manual_bos: false,
    }
}

/// tiny-llava with a tokenizer (tokenizer.json + a ChatML chat template) in a temp dir, and
/// `shapes` data at the tower's 56 px.
pub struct TinyRun {
    pub dir: tempfile::TempDir,
}

impl TinyRun {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        copy_dir(&fixture("tiny-llava"), &model);
        let tools = tiny_tokenizer();
        tools
            .tokenizer
            .save(model.join("tokenizer.json"), false)
            .unwrap();
        let cfg = serde_json::json!({
            "bos_token": "<s>", "eos_token": "<|im_end|>",
            "chat_template": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        });
        std::fs::write(model.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        lntune::data::shapes::generate(
            &lntune::data::shapes::ShapesConfig {
                seed: 1,
                train: 24,
                test: 8,
                size: 56,
                level: Default::default(),
            },
            &dir.path().join("data"),
        )
        .unwrap();
        Self { dir }
    }

    pub fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }

    /// `lntune train` on the tiny model; returns (success, stderr).
    pub fn train(&self, out: &str, extra: &[&str]) -> (bool, String) {
        let o = self.train_command(out, extra).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    }

    /// `lntune eval` of the shapes benchmark (5 items per part) on the tiny model with the
    /// adapter of the run in `run/`, into `out`, not started.
    pub fn eval_command(&self, out: &str, extra: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"));
        c.arg("eval")
            .arg("--model")
            .arg(self.path("model"))
            .arg("--adapter")
            .arg(self.path("run/adapter"))
            .args(["--bench", "shapes", "--data"])
            .arg(self.path("data"))
            .arg("--out")
            .arg(self.path(out))
            .args([
                "--limit",
                "5",
                "--batch",
                "1",
                "--max-new-tokens",
                "4",
                "--caption-tokens",
                "6",
                "--template",
                "chatml",
                "--quiet",
            ])
            .args(extra);
        c
    }

    /// The `lntune train` command on the tiny model, not started.
    pub fn train_command(&self, out: &str, extra: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"));
        c.arg("train")
            .arg("--model")
            .arg(self.path("model"))
            .arg("--images")
            .arg(self.path("data/images"))
            .arg("--out")
            .arg(self.path(out))
            .args([
                "--batch",
                "2",
                "--template",
                "chatml",
                "--quiet",
                "--max-length",
                "256",
            ])
            .args(extra);
        c
    }
}

/// The metrics.jsonl lines of a run.
pub fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The tiny-llava fixture with the tests' tokenizer, and 32 `shapes` samples at 56 px.
pub fn workspace(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for src in [fixture("tiny-llava"), fixture("tiny-llava-tokenizer")] {
        for e in std::fs::read_dir(src).unwrap() {
            let p = e.unwrap().path();
            let keep = matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("json" | "safetensors")
            );
            if keep {
                std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
            }
        }
    }
    let data = dir.join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args([
            "data", "shapes", "--train", "32", "--test", "4", "--size", "56", "--out",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (model, data)
}

/// An lntune adapter of `method` on `model` whose every trained tensor is the base's
/// times a fixed pattern (as a training run would leave it, with no run needed).
pub fn pattern_adapter(model: &Path, method: lntune::methods::Method, dir: &Path) {
    let mut m =
        lntune::model::mllm::Mllm::load(model, candle_core::DType::F32, &Device::Cpu).unwrap();
    let base_fp = lntune::methods::adapter::fingerprint(&mut m).unwrap();
    let cfg = lntune::methods::MethodConfig::new(method);
    let s = lntune::methods::setup::setup(&mut m, &cfg, 0).unwrap();
    let names: Vec<String> = s.trainable_specs().map(|s| s.name.clone()).collect();
    for (i, n) in names.iter().enumerate() {
        let t = m.param(n).unwrap();
        let k = t.elem_count();
        let pattern: Vec<f32> = (0..k)
            .map(|j| 1.0 + 0.05 * (((i * 7 + j) % 13) as f32 - 6.0) / 6.0)
            .collect();
        let factor = Tensor::from_vec(pattern, t.dims(), &Device::Cpu).unwrap();
        // LoRA's B starts at zero: give every factor values of its own
        let scaled = if n.contains("lora_B") {
            ((factor - 1.0).unwrap() * 2.0).unwrap()
        } else {
            (t * factor).unwrap()
        };
        *m.param_mut(n).unwrap() = scaled;
    }
    let tensors = lntune::methods::adapter::adapter_tensors(&mut m, &s, &[]).unwrap();
    let meta = lntune::methods::adapter::AdapterMeta {
        format: lntune::methods::adapter::FORMAT.into(),
        method: cfg,
        base_fingerprint: base_fp,
        base_source: model.display().to_string(),
        tensors: tensors.iter().map(|(n, _)| n.clone()).collect(),
        step: 1,
        init_tensors: vec![],
    };
    lntune::methods::adapter::save_adapter(dir, &tensors, &meta).unwrap();
}
