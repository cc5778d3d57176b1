//! Image loading and preprocessing equal to the HF image processors (PIL backend):
//! CLIP (shortest side, bicubic, center crop, rescale, normalize), LLaVA-1.5 `pad` mode
//! (pad to a square of the mean color first) and DINOv2 (resize 256, crop 224, ImageNet
//! mean/std).
//!
//! The resize is a port of Pillow's 8-bit `ImagingResample` (Resample.c): separable,
//! horizontal pass then vertical, bicubic a = −0.5 with the support widened by the scale when
//! downscaling (antialias), weights in 22-bit fixed point, round and clamp to uint8 after each
//! pass. Alpha is handled the two ways the reference code bases do: transformers'
//! `convert_to_rgb` composites over white, LLaVA's loader (`Image.convert("RGB")`) drops it.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::model::mllm::Mllm;
use crate::model::vision::VisionTower;

/// An 8-bit RGB image, HWC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// What to do with an alpha channel (or a palette transparency) when going to RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlphaMode {
    /// transformers `convert_to_rgb`: `Image.alpha_composite(white, im.convert("RGBA"))`
    CompositeWhite,
    /// PIL `im.convert("RGB")`, LLaVA's loader: transparent pixels keep their stored color
    Drop,
}

/// Decodes PNG/JPEG at `path` into RGB. Grayscale is replicated, palettes expanded, 16-bit
/// samples reduced to 8 bits as PIL does (high byte).
pub fn load_rgb(path: &Path, alpha: AlphaMode) -> Result<RgbImage> {
    let bytes = crate::util::files::read_bytes(path).context("cannot read image")?;
    decode_rgb(&bytes, alpha).with_context(|| format!("{}: cannot decode image", path.display()))
}

/// PIL's `Image.MAX_IMAGE_PIXELS`: the most pixels a decoded image, or a canvas the
/// preprocessing builds (LLaVA's padded square, a resized image kept whole), may have.
pub const DEFAULT_MAX_IMAGE_PIXELS: usize = 89_478_485;

/// The pixel limit: `LNTUNE_MAX_IMAGE_PIXELS` when set (a positive count), else
/// `DEFAULT_MAX_IMAGE_PIXELS`. Memory per image stays below about 4 bytes per pixel of it.
pub fn max_image_pixels() -> usize {
    std::env::var("LNTUNE_MAX_IMAGE_PIXELS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&v| v > 0)
        .unwrap_or(DEFAULT_MAX_IMAGE_PIXELS)
}

/// Refuses `w` x `h` pixels of `what` over the pixel limit.
fn check_pixels(what: &str, w: usize, h: usize) -> Result<()> {
    let limit = max_image_pixels();
    match w.checked_mul(h) {
        Some(n) if n <= limit => Ok(()),
        _ => bail!(
            "{what} of {w}x{h} pixels is over the limit of {limit} pixels (LNTUNE_MAX_IMAGE_PIXELS)"
        ),
    }
}

/// Decodes an in-memory PNG/JPEG into RGB. The header's size is checked against the pixel
/// limit before anything is decoded.
pub fn decode_rgb(bytes: &[u8], alpha: AlphaMode) -> Result<RgbImage> {
    let reader = || image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format();
    let (w, h) = reader()?.into_dimensions()?;
    check_pixels("the image", w as usize, h as usize)?;
    let mut limits = image::Limits::default();
    // RGBA at 16 bits per sample, the most a decoder holds per pixel
    limits.max_alloc = Some(8 * max_image_pixels() as u64 + (1 << 20));
    let mut r = reader()?;
    r.limits(limits);
    let img = r.decode()?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let has_alpha = img.color().has_alpha();
    if !has_alpha {
        return Ok(RgbImage {
            width: w,
            height: h,
            data: img.to_rgb8().into_raw(),
        });
    }
    let rgba = img.to_rgba8().into_raw();
    let mut data = Vec::with_capacity(w * h * 3);
    for px in rgba.chunks_exact(4) {
        match alpha {
            AlphaMode::Drop => data.extend_from_slice(&px[..3]),
            AlphaMode::CompositeWhite => data.extend(composite_over_white(px)),
        }
    }
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

/// Pillow's integer `ImagingAlphaComposite` with a white opaque destination.
fn composite_over_white(px: &[u8]) -> [u8; 3] {
    const BITS: u32 = 7;
    let sa = px[3] as u32;
    if sa == 0 {
        return [255, 255, 255];
    }
    let blend = 255 * (255 - sa);
    let outa255 = sa * 255 + blend;
    let coef1 = sa * 255 * 255 * (1 << BITS) / outa255;
    let coef2 = 255 * (1 << BITS) - coef1;
    let div255 = |a: u32| ((a >> 8) + a) >> 8;
    let ch = |c: u8| (div255(c as u32 * coef1 + 255 * coef2 + (0x80 << BITS)) >> BITS) as u8;
    [ch(px[0]), ch(px[1]), ch(px[2])]
}

/// Pillow's bicubic kernel, a = −0.5.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel of `start..start + count` (of `out_size`): first input index, tap
/// count, and 22-bit fixed-point weights (`precompute_coeffs` + `normalize_coeffs_8bpc`).
fn coeffs(
    in_size: usize,
    out_size: usize,
    start: usize,
    count: usize,
) -> (Vec<(usize, usize)>, Vec<i32>, usize) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(count);
    let mut kk = vec![0i32; count * ksize];
    let mut w = vec![0f64; ksize];
    for (i, xx) in (start..start + count).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // (int) casts truncate toward zero; negatives are clamped to 0 right after
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(xmax) {
            *wx = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        for x in 0..xmax {
            let v = if ww != 0.0 { w[x] / ww } else { w[x] };
            let f = v * (1u64 << PRECISION_BITS) as f64;
            kk[i * ksize + x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    (bounds, kk, ksize)
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS) << 8 {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// `PIL.Image.resize((w, h), Image.BICUBIC)` on an 8-bit RGB image, bit-exact.
pub fn resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    resize_bicubic_window(img, out_w, out_h, (0, 0, out_w, out_h))
}

/// The window `(x0, y0, w, h)` of `resize_bicubic(img, out_w, out_h)`, computed without the
/// rest: the horizontal pass (as Pillow, first) runs only on the input rows the window's
/// vertical taps read, and both passes only for the window's columns and rows. Each
/// pixel's arithmetic is Pillow's, so the window equals the crop of the whole resize.
pub fn resize_bicubic_window(
    img: &RgbImage,
    out_w: usize,
    out_h: usize,
    (x0, y0, cw, ch): (usize, usize, usize, usize),
) -> RgbImage {
    let vertical = (out_h != img.height).then(|| coeffs(img.height, out_h, y0, ch));
    // the input rows the vertical pass reads (the window's rows without one)
    let (r0, r1) = match &vertical {
        Some((bounds, _, _)) => (
            bounds.iter().map(|b| b.0).min().unwrap_or(0),
            bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(0),
        ),
        None => (y0, y0 + ch),
    };
    // horizontal pass: rows r0..r1, output columns x0..x0 + cw
    let mut mid = vec![0u8; cw * (r1 - r0) * 3];
    if out_w != img.width {
        let (bounds, kk, ksize) = coeffs(img.width, out_w, x0, cw);
        for y in r0..r1 {
            let row = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
            for (i, &(xmin, n)) in bounds.iter().enumerate() {
                let k = &kk[i * ksize..i * ksize + n];
                for c in 0..3 {
                    let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                    for (x, kv) in k.iter().enumerate() {
                        ss += row[(xmin + x) * 3 + c] as i32 * kv;
                    }
                    mid[((y - r0) * cw + i) * 3 + c] = clip8(ss);
                }
            }
        }
    } else {
        for y in r0..r1 {
            let src = (y * img.width + x0) * 3;
            mid[(y - r0) * cw * 3..(y - r0 + 1) * cw * 3]
                .copy_from_slice(&img.data[src..src + cw * 3]);
        }
    }
    let Some((bounds, kk, ksize)) = vertical else {
        return RgbImage {
            width: cw,
            height: ch,
            data: mid,
        };
    };
    // vertical pass: the window's rows from the horizontally resized rows
    let mut data = vec![0u8; cw * ch * 3];
    for (i, &(ymin, n)) in bounds.iter().enumerate() {
        let k = &kk[i * ksize..i * ksize + n];
        for x in 0..cw {
            for c in 0..3 {
                let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                for (y, kv) in k.iter().enumerate() {
                    ss += mid[((ymin - r0 + y) * cw + x) * 3 + c] as i32 * kv;
                }
                data[(i * cw + x) * 3 + c] = clip8(ss);
            }
        }
    }
    RgbImage {
        width: cw,
        height: ch,
        data,
    }
}

/// transformers `get_resize_output_image_size(default_to_square=False)`: the short side
/// becomes `size`, the long side `int(size · long / short)`. Returns (w, h).
pub fn shortest_edge_size(w: usize, h: usize, size: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// Center crop: top = (h − ch) / 2, left = (w − cw) / 2. The image must be at least as large.
pub fn center_crop(img: &RgbImage, cw: usize, ch: usize) -> Result<RgbImage> {
    if img.width < cw || img.height < ch {
        bail!(
            "center crop {cw}x{ch} is larger than the image {}x{}",
            img.width,
            img.height
        );
    }
    let (top, left) = ((img.height - ch) / 2, (img.width - cw) / 2);
    let mut data = Vec::with_capacity(cw * ch * 3);
    for y in top..top + ch {
        data.extend_from_slice(
            &img.data[(y * img.width + left) * 3..(y * img.width + left + cw) * 3],
        );
    }
    Ok(RgbImage {
        width: cw,
        height: ch,
        data,
    })
}

/// LLaVA's `expand2square`: paste onto a square of color `bg`, centered on the short axis.
pub fn expand_to_square(img: &RgbImage, bg: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width, img.height);
    if w == h {
        return img.clone();
    }
    let s = w.max(h);
    let (ox, oy) = if w > h {
        (0, (w - h) / 2)
    } else {
        ((h - w) / 2, 0)
    };
    let mut data: Vec<u8> = std::iter::repeat_n(bg, s * s).flatten().collect();
    for y in 0..h {
        let dst = ((y + oy) * s + ox) * 3;
        data[dst..dst + w * 3].copy_from_slice(&img.data[y * w * 3..(y + 1) * w * 3]);
    }
    RgbImage {
        width: s,
        height: s,
        data,
    }
}

/// An HF image processor's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Preprocess {
    /// resize so that the shortest edge is this (None: no resize)
    pub shortest_edge: Option<usize>,
    /// center crop (width, height) (None: no crop)
    pub crop: Option<(usize, usize)>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// LLaVA-1.5 `image_aspect_ratio = "pad"`: square with the mean color first
    pub pad_to_square: bool,
    pub alpha: AlphaMode,
}

/// The image processors, as `--image-processor` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageProcessor {
    /// CLIPImageProcessor: shortest side, bicubic, center crop, CLIP mean/std
    Clip,
    /// LLaVA-1.5 `pad`: pad to a square of the mean color, then CLIP
    ClipPad,
    /// DINOv2: shortest side 256, crop 224, ImageNet mean/std
    Dinov2,
}

/// A command's image preprocessing choice: the processor (default: the one of the model's
/// tower) and the side to resize and crop to (default: the model's square input size when
/// its config names one, compose.json `input_hw`, else the processor's own).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageProcessing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processor: Option<ImageProcessor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<usize>,
}

impl ImageProcessing {
    /// The preprocessing for `model`: CLIP at the tower's size for CLIP towers, DINOv2's for
    /// DINOv2 towers, unless a processor or size was chosen. A chosen size must be positive,
    /// and an image of it must fit the language model's context as image tokens (that
    /// bounds the tower's work too).
    pub fn preprocess(&self, model: &Mllm) -> Result<Preprocess> {
        if let Some(s) = self.size {
            if s == 0 {
                bail!("--image-size must be positive, got 0");
            }
            if let Some(v) = &model.vision {
                let cfg = v.tower.config();
                if matches!(v.tower, VisionTower::Clip(_)) && s != cfg.image_size() {
                    bail!(
                        "--image-size {s}: a CLIP tower takes images of its own size, {} (its position table is not interpolated)",
                        cfg.image_size()
                    );
                }
                if s < cfg.patch_size() {
                    bail!(
                        "--image-size {s} is smaller than one patch of the tower ({} pixels)",
                        cfg.patch_size()
                    );
                }
            }
            let context = model.llm.cfg.max_position_embeddings;
            if let Some(tokens) = model.tokens_per_image(s, s)
                && tokens >= context
            {
                bail!(
                    "--image-size {s}: an image would take {tokens} tokens, not less than the model's context of {context} (max_position_embeddings)"
                );
            }
        }
        Ok(self.preprocess_unchecked(model))
    }

    fn preprocess_unchecked(&self, model: &Mllm) -> Preprocess {
        let tower_size = model.vision.as_ref().map(|v| v.tower.config().image_size());
        let kind = match (self.processor, model.vision.as_ref().map(|v| &v.tower)) {
            (Some(k), _) => k,
            (None, Some(VisionTower::Dinov2(_))) => ImageProcessor::Dinov2,
            _ => ImageProcessor::Clip,
        };
        let mut p = match kind {
            ImageProcessor::Clip => Preprocess::clip(tower_size.unwrap_or(224)),
            ImageProcessor::ClipPad => Preprocess::clip_pad(tower_size.unwrap_or(224)),
            ImageProcessor::Dinov2 => Preprocess::dinov2(),
        };
        // a composed model made for one square size (the demo's 126 px) is used at it
        let model_size = model
            .vision
            .as_ref()
            .and_then(|v| v.input_hw)
            .filter(|(h, w)| h == w)
            .map(|(h, _)| h);
        if let Some(s) = self.size.or(model_size) {
            p.shortest_edge = Some(s);
            p.crop = Some((s, s));
        }
        p
    }
}

// the values of the HF processor configs, as written there (f32 rounds them)
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Preprocess {
    /// `CLIPImageProcessor` at `size` (224 or 336): shortest edge, center crop.
    pub fn clip(size: usize) -> Self {
        Self {
            shortest_edge: Some(size),
            crop: Some((size, size)),
            mean: CLIP_MEAN,
            std: CLIP_STD,
            pad_to_square: false,
            alpha: AlphaMode::CompositeWhite,
        }
    }

    /// LLaVA-1.5 pad mode: `expand2square(im.convert("RGB"), mean color)` then CLIP.
    pub fn clip_pad(size: usize) -> Self {
        Self {
            pad_to_square: true,
            alpha: AlphaMode::Drop,
            ..Self::clip(size)
        }
    }

    /// `facebook/dinov2-*` `BitImageProcessor`: shortest edge 256, crop 224, ImageNet stats.
    pub fn dinov2() -> Self {
        Self {
            shortest_edge: Some(256),
            crop: Some((224, 224)),
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            pad_to_square: false,
            alpha: AlphaMode::CompositeWhite,
        }
    }

    /// The pad color: `tuple(int(x * 255) for x in image_mean)`.
    pub fn pad_color(&self) -> [u8; 3] {
        self.mean.map(|m| (m as f64 * 255.0) as u8)
    }

    /// The uint8 image after pad / resize / crop, before rescale and normalize.
    pub fn resized(&self, img: &RgbImage) -> Result<RgbImage> {
        let padded;
        let img = if self.pad_to_square {
            let side = img.width.max(img.height);
            check_pixels("the padded square canvas", side, side)?;
            padded = expand_to_square(img, self.pad_color());
            &padded
        } else {
            img
        };
        let Some(s) = self.shortest_edge else {
            return match self.crop {
                Some((cw, ch)) => {
                    check_pixels("the center crop", cw, ch)?;
                    center_crop(img, cw, ch)
                }
                None => Ok(img.clone()),
            };
        };
        let (w, h) = shortest_edge_size(img.width, img.height, s);
        match self.crop {
            // the crop window of the resize, computed alone (transformers resizes the whole
            // image, then crops; each kept pixel is the same)
            Some((cw, ch)) if cw <= w && ch <= h => {
                check_pixels("the center crop", cw, ch)?;
                Ok(resize_bicubic_window(
                    img,
                    w,
                    h,
                    ((w - cw) / 2, (h - ch) / 2, cw, ch),
                ))
            }
            Some((cw, ch)) => bail!("center crop {cw}x{ch} is larger than the image {w}x{h}"),
            None => {
                check_pixels("the resized image", w, h)?;
                Ok(resize_bicubic(img, w, h))
            }
        }
    }

    /// Pixel values CHW f32: `(u8 · (1/255)) ` rounded to f32, then `(x − mean) / std` in f32.
    pub fn pixel_values(&self, img: &RgbImage) -> Result<(Vec<f32>, usize, usize)> {
        let img = self.resized(img)?;
        Ok((normalize(&img, self.mean, self.std), img.height, img.width))
    }

    /// Loads and preprocesses a file.
    pub fn load(&self, path: &Path) -> Result<(Vec<f32>, usize, usize)> {
        self.pixel_values(&load_rgb(path, self.alpha)?)
            .with_context(|| format!("{}: cannot preprocess", path.display()))
    }
}

/// HWC u8 -> CHW f32, rescaled in f64 then normalized in f32 as transformers does.
pub fn normalize(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let (w, h) = (img.width, img.height);
    let mut out = vec![0f32; 3 * w * h];
    for c in 0..3 {
        for i in 0..w * h {
            let x = (img.data[i * 3 + c] as f64 * (1.0 / 255.0)) as f32;
            out[c * w * h + i] = (x - mean[c]) / std[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic test image of `w` x `h` with varied pixels.
    fn pattern(w: usize, h: usize) -> RgbImage {
        let data = (0..w * h * 3)
            .map(|i| ((i * 37 + (i / 7) * 11) % 251) as u8)
            .collect();
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn a_resize_window_equals_the_crop_of_the_whole_resize() {
        // downscale, upscale, one axis only, both; windows at corners and the center
        for (w, h, ow, oh) in [
            (37, 23, 16, 11),
            (9, 13, 40, 33),
            (30, 20, 30, 9),
            (30, 20, 11, 20),
            (64, 64, 64, 64),
        ] {
            let img = pattern(w, h);
            let full = resize_bicubic(&img, ow, oh);
            for (x0, y0, cw, ch) in [
                (0, 0, ow, oh),
                (0, 0, ow / 2, oh / 2),
                ((ow - ow / 3) / 2, (oh - oh / 3) / 2, ow / 3, oh / 3),
                (ow - 3, oh - 2, 3, 2),
            ] {
                let win = resize_bicubic_window(&img, ow, oh, (x0, y0, cw, ch));
                let crop = center_crop_at(&full, x0, y0, cw, ch);
                assert_eq!(
                    win.data, crop,
                    "{w}x{h} -> {ow}x{oh}, window {x0},{y0} {cw}x{ch}"
                );
            }
        }
    }

    fn center_crop_at(img: &RgbImage, x0: usize, y0: usize, cw: usize, ch: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for y in y0..y0 + ch {
            v.extend_from_slice(&img.data[(y * img.width + x0) * 3..(y * img.width + x0 + cw) * 3]);
        }
        v
    }

    #[test]
    fn memory_follows_the_output_not_the_input_claims() {
        // a 1 x 60000 strip: CLIP's resize + crop computes only the 224 x 224 window (the
        // whole resize would be 224 x 13,440,000); LLaVA's pad needs a 60000² canvas and is
        // refused by the pixel limit
        let strip = pattern(1, 60000);
        let clip = Preprocess::clip(224);
        let out = clip.resized(&strip).unwrap();
        assert_eq!((out.width, out.height), (224, 224));
        let err = Preprocess::clip_pad(224)
            .resized(&strip)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("60000x60000") && err.contains("LNTUNE_MAX_IMAGE_PIXELS"),
            "{err}"
        );
        // a decoder is never asked for more than the limit: the header says 20000 x 20000
        use image::ImageEncoder;
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(&[0u8; 3], 1, 1, image::ExtendedColorType::Rgb8)
            .unwrap();
        // patch the IHDR width and height (bytes 16..24) to claim 20000 x 20000
        png[16..20].copy_from_slice(&20000u32.to_be_bytes());
        png[20..24].copy_from_slice(&20000u32.to_be_bytes());
        // the chunk's CRC-32 over its type and data (bytes 12..29), bit by bit
        let mut crc = !0u32;
        for &b in &png[12..29] {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        png[29..33].copy_from_slice(&(!crc).to_be_bytes());
        let err = format!(
            "{:#}",
            decode_rgb(&png, AlphaMode::CompositeWhite).unwrap_err()
        );
        assert!(
            err.contains("20000x20000") && err.contains("over the limit"),
            "{err}"
        );
    }

    #[test]
    fn sizes_and_crops_by_hand() {
        // 640x480 -> short side 336: 448x336; 97x61 -> 534x336 (int truncation)
        assert_eq!(shortest_edge_size(640, 480, 336), (448, 336));
        assert_eq!(shortest_edge_size(97, 61, 336), (534, 336));
        assert_eq!(shortest_edge_size(300, 500, 256), (256, 426));
        let img = RgbImage {
            width: 4,
            height: 2,
            data: (0..24).collect(),
        };
        let c = center_crop(&img, 2, 2).unwrap();
        assert_eq!(c.data, vec![3, 4, 5, 6, 7, 8, 15, 16, 17, 18, 19, 20]);
        let sq = expand_to_square(&img, [9, 9, 9]);
        assert_eq!((sq.width, sq.height), (4, 4));
        assert_eq!(&sq.data[..3], &[9, 9, 9]);
        assert_eq!(&sq.data[12..15], &[0, 1, 2]); // row 1 (offset (4-2)/2 = 1)
        assert_eq!(Preprocess::clip(336).pad_color(), [122, 116, 104]);
    }

    #[test]
    fn identity_resize_and_constant_images() {
        let img = RgbImage {
            width: 5,
            height: 3,
            data: vec![77; 45],
        };
        assert_eq!(resize_bicubic(&img, 5, 3), img);
        // normalized weights: a constant image stays constant at any size
        let r = resize_bicubic(&img, 13, 2);
        assert!(r.data.iter().all(|&v| v == 77));
    }

    #[test]
    fn composite_over_white_by_hand() {
        assert_eq!(composite_over_white(&[10, 20, 30, 255]), [10, 20, 30]);
        assert_eq!(composite_over_white(&[10, 20, 30, 0]), [255, 255, 255]);
        // half transparent black over white: about 128
        let g = composite_over_white(&[0, 0, 0, 128])[0];
        assert!((126..=128).contains(&g), "{g}");
    }
}
