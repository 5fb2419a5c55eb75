//! CLIP image preprocessing as HF's `CLIPImageProcessor` (PIL backend) does it: convert to RGB
//! (transparency composited onto white), resize the shortest side, center crop, rescale to
//! [0, 1] and normalize per channel.
//!
//! The resize is Pillow's own algorithm, reproduced step by step (separable convolution with an
//! antialiasing support, 22-bit fixed-point coefficients, a horizontal pass rounded to 8 bits
//! before the vertical one), because every other resampler differs from it by ±1 grey level
//! somewhere, and one level moves a normalized pixel by ~0.015.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::Value;

use crate::error::{Result, VisionError};

/// OpenAI CLIP's statistics (HF `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// An 8-bit RGB image, rows top to bottom, pixels as R, G, B bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb8 {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 || data.len() != width * height * 3 {
            return Err(VisionError::input(format!(
                "an RGB image of {width}×{height} needs {} bytes, got {}",
                width * height * 3,
                data.len()
            )));
        }
        Ok(Rgb8 { width, height, data })
    }

    fn at(&self, x: usize, y: usize, c: usize) -> u8 {
        self.data[(y * self.width + x) * 3 + c]
    }
}

/// Pillow's resampling filters (HF's `resample` ids). NEAREST (0) is not supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Filter {
    pub fn from_pil_id(id: u64) -> Option<Self> {
        match id {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            4 => Some(Filter::Box),
            5 => Some(Filter::Hamming),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    /// Pillow's filter functions (libImaging/Resample.c), operation for operation.
    fn eval(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                return 1.0;
            }
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Filter::Bicubic => {
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// How the resize step sizes the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeTo {
    /// The shorter side becomes this long; the other keeps the aspect ratio (truncated).
    ShortestEdge(usize),
    Exact {
        height: usize,
        width: usize,
    },
}

/// The settings of a `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageProcessor {
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    pub size: ResizeTo,
    pub resample: Filter,
    pub do_center_crop: bool,
    /// (height, width)
    pub crop_size: (usize, usize),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

/// Pixel values (3, height, width), channel-major, as HF's `pixel_values[0]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl PixelValues {
    /// A (1, 3, height, width) tensor.
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.data, (1, 3, self.height, self.width), device)?.to_dtype(dtype)?)
    }
}

impl Default for ImageProcessor {
    /// `CLIPImageProcessor()`'s defaults.
    fn default() -> Self {
        ImageProcessor {
            do_convert_rgb: true,
            do_resize: true,
            size: ResizeTo::ShortestEdge(224),
            resample: Filter::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }
}

impl ImageProcessor {
    /// `preprocessor_config.json` in `dir`, or the `image_processor` of transformers 5's
    /// `processor_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        for (file, key) in [("preprocessor_config.json", None), ("processor_config.json", Some("image_processor"))] {
            let path = dir.join(file);
            if !path.is_file() {
                continue;
            }
            let shown = path.display().to_string();
            let text =
                std::fs::read_to_string(&path).map_err(|source| VisionError::Io { path: shown.clone(), source })?;
            let json: Value =
                serde_json::from_str(&text).map_err(|e| VisionError::config(&shown, format!("invalid JSON: {e}")))?;
            let section = match key {
                None => Some(&json),
                Some(k) => json.get(k),
            };
            if let Some(section) = section {
                return Self::from_json(section, &shown);
            }
        }
        Err(VisionError::config(
            dir.display().to_string(),
            "no preprocessor_config.json (nor an image_processor in processor_config.json)",
        ))
    }

    /// Parse HF image-processor settings; missing keys take `CLIPImageProcessor`'s defaults.
    pub fn from_json(json: &Value, path: &str) -> Result<Self> {
        let err = |m: String| VisionError::config(path, m);
        if let Some(kind) = json.get("image_processor_type").and_then(Value::as_str) {
            if !kind.starts_with("CLIPImageProcessor") {
                return Err(err(format!(
                    "image processor {kind:?} is not supported (LLaVA-1.5 uses CLIPImageProcessor)"
                )));
            }
        }
        let mut p = ImageProcessor::default();
        let flag = |key: &str, default: bool| json.get(key).and_then(Value::as_bool).unwrap_or(default);
        p.do_convert_rgb = flag("do_convert_rgb", p.do_convert_rgb);
        p.do_resize = flag("do_resize", p.do_resize);
        p.do_center_crop = flag("do_center_crop", p.do_center_crop);
        p.do_rescale = flag("do_rescale", p.do_rescale);
        p.do_normalize = flag("do_normalize", p.do_normalize);
        let positive = |v: &Value, what: &str| -> Result<usize> {
            v.as_u64()
                .filter(|&x| x > 0)
                .map(|x| x as usize)
                .ok_or_else(|| err(format!("{what} must be a positive integer")))
        };
        if let Some(size) = json.get("size").filter(|v| !v.is_null()) {
            p.size = if size.is_u64() {
                ResizeTo::ShortestEdge(positive(size, "size")?)
            } else if let Some(edge) = size.get("shortest_edge") {
                if size.get("longest_edge").is_some_and(|v| !v.is_null()) {
                    return Err(err("size.longest_edge is not supported".into()));
                }
                ResizeTo::ShortestEdge(positive(edge, "size.shortest_edge")?)
            } else if let (Some(h), Some(w)) = (size.get("height"), size.get("width")) {
                ResizeTo::Exact { height: positive(h, "size.height")?, width: positive(w, "size.width")? }
            } else {
                return Err(err(format!("size {size} is neither an integer, {{shortest_edge}} nor {{height, width}}")));
            };
        }
        if let Some(crop) = json.get("crop_size").filter(|v| !v.is_null()) {
            p.crop_size = if crop.is_u64() {
                let c = positive(crop, "crop_size")?;
                (c, c)
            } else {
                match (crop.get("height"), crop.get("width")) {
                    (Some(h), Some(w)) => (positive(h, "crop_size.height")?, positive(w, "crop_size.width")?),
                    _ => return Err(err(format!("crop_size {crop} is neither an integer nor {{height, width}}"))),
                }
            };
        }
        if let Some(r) = json.get("resample").filter(|v| !v.is_null()) {
            let id = r.as_u64().ok_or_else(|| err(format!("resample {r} is not a PIL filter id")))?;
            p.resample = Filter::from_pil_id(id).ok_or_else(|| {
                err(format!("resample {id} is not supported (1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)"))
            })?;
        }
        if let Some(f) = json.get("rescale_factor").filter(|v| !v.is_null()) {
            p.rescale_factor = f.as_f64().ok_or_else(|| err("rescale_factor must be a number".into()))?;
        }
        let triple = |key: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0); 3]),
                Some(Value::Array(a)) if a.len() == 3 && a.iter().all(Value::is_number) => {
                    Ok([0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0)))
                }
                Some(v) => Err(err(format!("{key} {v} must be a number or three numbers"))),
            }
        };
        p.image_mean = triple("image_mean", p.image_mean)?;
        p.image_std = triple("image_std", p.image_std)?;
        if p.image_std.contains(&0.0) {
            return Err(err("image_std must not contain 0".into()));
        }
        Ok(p)
    }

    /// The (height, width) the output will have for an input of `width`×`height`.
    pub fn output_size(&self, width: usize, height: usize) -> (usize, usize) {
        if self.do_center_crop {
            return self.crop_size;
        }
        if self.do_resize {
            let (w, h) = self.resized_size(width, height);
            return (h, w);
        }
        (height, width)
    }

    /// (width, height) after the resize step, as HF's `get_resize_output_image_size`.
    fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        match self.size {
            ResizeTo::Exact { height, width } => (width, height),
            ResizeTo::ShortestEdge(edge) => {
                let (short, long) = if width <= height { (width, height) } else { (height, width) };
                // Python's int(edge * long / short): the true quotient, truncated.
                let new_long = ((edge * long) as f64 / short as f64) as usize;
                if width <= height {
                    (edge, new_long)
                } else {
                    (new_long, edge)
                }
            }
        }
    }

    /// Read an image file (PNG or JPEG) and preprocess it.
    pub fn preprocess_file(&self, path: &Path) -> Result<PixelValues> {
        self.preprocess(&load_image(path)?)
    }

    pub fn preprocess(&self, image: &Rgb8) -> Result<PixelValues> {
        let resized;
        let mut img = image;
        if self.do_resize {
            let (w, h) = self.resized_size(image.width, image.height);
            if w == 0 || h == 0 {
                return Err(VisionError::input(format!("a {}×{} image resizes to nothing", image.width, image.height)));
            }
            resized = resize(image, w, h, self.resample);
            img = &resized;
        }
        let (out_h, out_w) = if self.do_center_crop { self.crop_size } else { (img.height, img.width) };
        // HF's center_crop: offset (orig - crop) // 2; a crop larger than the image pads it with
        // zeros, the image placed ceil((crop - orig) / 2) in.
        let source = |out: usize, orig: usize, crop: usize| -> Option<usize> {
            if crop > orig {
                let pad = (crop - orig).div_ceil(2);
                out.checked_sub(pad).filter(|&s| s < orig)
            } else {
                Some(out + (orig - crop) / 2)
            }
        };
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        let mut data = vec![0f32; 3 * out_h * out_w];
        for c in 0..3 {
            for y in 0..out_h {
                let sy = if self.do_center_crop { source(y, img.height, out_h) } else { Some(y) };
                for x in 0..out_w {
                    let sx = if self.do_center_crop { source(x, img.width, out_w) } else { Some(x) };
                    let v = match (sx, sy) {
                        (Some(sx), Some(sy)) => img.at(sx, sy, c),
                        _ => 0,
                    };
                    // numpy: uint8 → float64 × factor → float32, then (x - mean) / std in float32.
                    let mut f = if self.do_rescale { (v as f64 * self.rescale_factor) as f32 } else { v as f32 };
                    if self.do_normalize {
                        f = (f - mean[c]) / std[c];
                    }
                    data[(c * out_h + y) * out_w + x] = f;
                }
            }
        }
        Ok(PixelValues { height: out_h, width: out_w, data })
    }
}

/// Decode a PNG or JPEG into RGB as `PIL.Image.open(path)` + HF's `convert_to_rgb` would:
/// grey replicated, transparency composited onto white.
pub fn load_image(path: &Path) -> Result<Rgb8> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| VisionError::Io { path: shown.clone(), source })?;
    let decoded = image::load_from_memory(&bytes)
        .map_err(|e| VisionError::Image { path: shown.clone(), message: e.to_string() })?;
    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    if width == 0 || height == 0 {
        return Err(VisionError::Image { path: shown, message: "the image is empty".into() });
    }
    if decoded.color().has_alpha() {
        let rgba = decoded.to_rgba8();
        let mut data = Vec::with_capacity(width * height * 3);
        for px in rgba.pixels() {
            let [r, g, b, a] = px.0;
            data.extend([r, g, b].map(|c| over_white(c, a)));
        }
        Rgb8::new(width, height, data)
    } else {
        Rgb8::new(width, height, decoded.to_rgb8().into_raw())
    }
}

/// One channel of `PIL.Image.alpha_composite(white, src)` (libImaging/AlphaComposite.c with an
/// opaque destination): 7-bit fixed point, divisions by 255 rounded by shifts.
fn over_white(c: u8, a: u8) -> u8 {
    const BITS: u32 = 7;
    let (c, a) = (c as u32, a as u32);
    let coef1 = a << BITS;
    let coef2 = (255 << BITS) - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << BITS);
    ((((tmp >> 8) + tmp) >> 8) >> BITS) as u8
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input index, and fixed-point weights of the inputs from there.
struct Coeffs {
    starts: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the box (0, in_size).
fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let mut starts = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; both bounds are clamped afterwards.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> = (0..n).map(|x| filter.eval((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            k.iter_mut().for_each(|w| *w /= ww);
        }
        let fixed = k
            .iter()
            .map(|&w| {
                let scaled = w * (1u32 << PRECISION_BITS) as f64;
                if w < 0.0 {
                    (-0.5 + scaled) as i32
                } else {
                    (0.5 + scaled) as i32
                }
            })
            .collect();
        starts.push(xmin);
        weights.push(fixed);
    }
    Coeffs { starts, weights }
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// `PIL.Image.resize((width, height), filter)` of an RGB image: horizontal pass, then vertical,
/// each rounded to 8 bits; a pass whose size does not change is skipped, as Pillow does.
pub fn resize(img: &Rgb8, width: usize, height: usize, filter: Filter) -> Rgb8 {
    let mut cur = img.clone();
    if width != cur.width {
        let co = coeffs(cur.width, width, filter);
        let mut data = vec![0u8; width * cur.height * 3];
        for y in 0..cur.height {
            for (xx, (&xmin, k)) in co.starts.iter().zip(&co.weights).enumerate() {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (x, &w) in k.iter().enumerate() {
                        ss += cur.at(xmin + x, y, c) as i64 * w as i64;
                    }
                    data[(y * width + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        cur = Rgb8 { width, height: cur.height, data };
    }
    if height != cur.height {
        let co = coeffs(cur.height, height, filter);
        let mut data = vec![0u8; cur.width * height * 3];
        for (yy, (&ymin, k)) in co.starts.iter().zip(&co.weights).enumerate() {
            for x in 0..cur.width {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (y, &w) in k.iter().enumerate() {
                        ss += cur.at(x, ymin + y, c) as i64 * w as i64;
                    }
                    data[(yy * cur.width + x) * 3 + c] = clip8(ss);
                }
            }
        }
        cur = Rgb8 { width: cur.width, height, data };
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compositing_onto_white_matches_pillow_at_the_ends() {
        assert_eq!(over_white(17, 0), 255);
        assert_eq!(over_white(17, 255), 17);
        // Half transparent black is mid grey (Pillow gives 128 for alpha 127).
        assert_eq!(over_white(0, 127), 128);
    }

    #[test]
    fn shortest_edge_keeps_the_aspect_ratio_truncated() {
        let p = ImageProcessor { size: ResizeTo::ShortestEdge(336), ..ImageProcessor::default() };
        assert_eq!(p.resized_size(640, 480), (448, 336));
        assert_eq!(p.resized_size(100, 333), (336, 1118));
    }

    #[test]
    fn rejects_unsupported_settings() {
        let bad = [
            serde_json::json!({"resample": 0}),
            serde_json::json!({"size": {"foo": 3}}),
            serde_json::json!({"image_processor_type": "SiglipImageProcessor"}),
            serde_json::json!({"image_std": [0.5, 0.0, 0.5]}),
        ];
        for b in bad {
            assert!(ImageProcessor::from_json(&b, "x").is_err(), "{b}");
        }
    }
}
