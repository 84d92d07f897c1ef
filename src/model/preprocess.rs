//! Decoding and the CLIP image transform, matching the reference (Pillow + torchvision):
//! `convert("RGB")`, shortest side resized to `size` with Pillow-compatible antialiased bicubic
//! in 8 bits, centre crop, `/255`, per-channel mean/std, CHW float32.
//!
//! The resize is Pillow's own 8-bit bicubic (see [`super::resample`]). Instead of resizing the
//! whole image and cropping, the crop box is mapped back into source coordinates and only that
//! box is resized: Pillow defines its `box` argument exactly so, which gives the same pixels as
//! resize-then-crop while computing only the kept columns.

use std::cell::RefCell;
use std::io::Cursor;

use super::resample::resize_rgb8_box;
use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};
use ndarray::Array3;

/// Size limits applied before and during decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Largest accepted encoded input, in bytes.
    pub max_bytes: usize,
    /// Largest accepted decoded image, in pixels (width × height): the decompression-bomb guard.
    pub max_pixels: u64,
    /// Most scans accepted in one JPEG. Each progressive scan is a pass over the whole image,
    /// so a small file repeating scans can hold a decode thread for minutes.
    #[serde(default = "default_max_jpeg_scans")]
    pub max_jpeg_scans: u32,
}

fn default_max_jpeg_scans() -> u32 {
    256
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 32 << 20,
            max_pixels: 40_000_000,
            max_jpeg_scans: default_max_jpeg_scans(),
        }
    }
}

/// Why an input could not be turned into a tensor. Every variant is permanent for that input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PreprocessError {
    #[error("empty input (0 bytes)")]
    Empty,
    #[error("input is {bytes} bytes, above the limit of {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    #[error("not an image: {bytes} bytes match no supported format (JPEG, PNG, WebP, GIF, BMP)")]
    /// The content is never echoed: it may come from an object the producer should not read.
    NotAnImage { bytes: usize },
    #[error("unsupported image format {0}")]
    UnsupportedFormat(String),
    #[error(
        "image of {width}x{height} pixels exceeds the limit of {limit} pixels (decompression bomb guard)"
    )]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("corrupt or truncated {format} image: {reason}")]
    Corrupt { format: String, reason: String },
    #[error("image has a zero dimension ({width}x{height})")]
    ZeroSize { width: u32, height: u32 },
    #[error("resize failed: {0}")]
    Resize(String),
    #[error(
        "JPEG with more than {limit} scans (limits.max_jpeg_scans): refused before decoding, as each scan is a pass over the whole image"
    )]
    TooComplex { scans: u32, limit: u32 },
    /// The decoder panicked on this input (a bug in a decoder, caught so the input is
    /// dead-lettered at once instead of redelivered until `max_deliver`).
    #[error("corrupt image: the decoder failed unexpectedly ({0})")]
    Panicked(String),
}

impl PreprocessError {
    /// A short stable label for metrics and dead-letter headers.
    pub fn kind(&self) -> &'static str {
        match self {
            PreprocessError::Empty => "empty",
            PreprocessError::TooLarge { .. } => "too_large",
            PreprocessError::NotAnImage { .. } => "not_image",
            PreprocessError::UnsupportedFormat(_) => "unsupported_format",
            PreprocessError::TooManyPixels { .. } => "too_many_pixels",
            PreprocessError::Corrupt { .. } => "corrupt",
            PreprocessError::ZeroSize { .. } => "corrupt",
            PreprocessError::Resize(_) => "resize",
            PreprocessError::TooComplex { .. } => "too_complex",
            PreprocessError::Panicked(_) => "corrupt",
        }
    }
}

/// The CLIP transform for one model (size, mean, std) with input limits.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    size: u32,
    limits: Limits,
    /// `lut[c][v] = (v / 255 − mean[c]) / std[c]`: normalisation is a table look-up.
    lut: [[f32; 256]; 3],
    /// JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain first, as Pillow's
    /// `Image.draft("RGB", (size, size))` does ([`Preprocessor::with_jpeg_draft`]).
    jpeg_draft: bool,
}

thread_local! {
    // One libjpeg-turbo handle per decode thread.
    static JPEG_DECODER: RefCell<Option<turbojpeg::Decompressor>> = const { RefCell::new(None) };
    // The resampler's intermediate rows, reused between images on each decode thread.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Preprocessor {
    pub fn new(size: u32, mean: [f32; 3], std: [f32; 3], limits: Limits) -> Self {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = ((v as f64 / 255.0 - mean[c] as f64) / std[c] as f64) as f32;
            }
        }
        Preprocessor {
            size,
            limits,
            lut,
            jpeg_draft: false,
        }
    }

    /// The fast JPEG path (`preprocess.jpeg_draft`): decode at the largest scale 1/s,
    /// s ∈ {8, 4, 2, 1}, with s ≤ min(width / size, height / size) (integer division), then
    /// the same resize and crop. Exactly Pillow's `img.draft("RGB", (size, size))` before
    /// `convert("RGB")`; several times less decode work on web-sized photos, and a tensor
    /// that differs from the exact path's (README "Performance" reports by how much).
    /// CMYK/YCCK JPEGs are decoded at full size either way.
    #[must_use]
    pub fn with_jpeg_draft(mut self, on: bool) -> Self {
        self.jpeg_draft = on;
        self
    }

    pub fn jpeg_draft(&self) -> bool {
        self.jpeg_draft
    }

    /// The draft scale denominator s for a `width × height` JPEG (1 = full size).
    pub fn draft_scale(&self, width: u32, height: u32) -> u32 {
        if !self.jpeg_draft || self.size == 0 {
            return 1;
        }
        let fit = (width / self.size).min(height / self.size);
        [8, 4, 2, 1].into_iter().find(|&s| fit >= s).unwrap_or(1)
    }

    pub fn from_manifest(m: &super::ModelManifest, limits: Limits) -> Self {
        Preprocessor::new(m.image.size, m.image.mean, m.image.std, limits)
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Number of f32 values in one CHW tensor.
    pub fn tensor_len(&self) -> usize {
        3 * (self.size as usize) * (self.size as usize)
    }

    /// Sniffs the format from the bytes (never from names or headers) and decodes to RGB like
    /// Pillow's `convert("RGB")`: alpha dropped, palettes expanded, grey replicated, GIFs take
    /// their first frame.
    pub fn decode(&self, bytes: &[u8]) -> Result<RgbImage, PreprocessError> {
        if bytes.is_empty() {
            return Err(PreprocessError::Empty);
        }
        if bytes.len() > self.limits.max_bytes {
            return Err(PreprocessError::TooLarge {
                bytes: bytes.len(),
                limit: self.limits.max_bytes,
            });
        }
        let format = image::guess_format(bytes)
            .map_err(|_| PreprocessError::NotAnImage { bytes: bytes.len() })?;
        if !matches!(
            format,
            ImageFormat::Jpeg
                | ImageFormat::Png
                | ImageFormat::WebP
                | ImageFormat::Gif
                | ImageFormat::Bmp
        ) {
            return Err(PreprocessError::UnsupportedFormat(format!("{format:?}")));
        }
        if format == ImageFormat::Jpeg {
            let limit = self.limits.max_jpeg_scans;
            let scans = count_jpeg_scans(bytes, limit);
            if scans > limit {
                return Err(PreprocessError::TooComplex { scans, limit });
            }
            if let Some(img) = self.decode_jpeg_turbo(bytes)? {
                return Ok(img);
            }
        }
        let fmt_name = format!("{format:?}").to_uppercase();
        let corrupt = |e: image::ImageError| PreprocessError::Corrupt {
            format: fmt_name.clone(),
            reason: e.to_string(),
        };
        // Read the dimensions from the header first: a bomb is refused before any allocation.
        let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
            .into_dimensions()
            .map_err(corrupt)?;
        if width == 0 || height == 0 {
            return Err(PreprocessError::ZeroSize { width, height });
        }
        if width as u64 * height as u64 > self.limits.max_pixels {
            return Err(PreprocessError::TooManyPixels {
                width,
                height,
                limit: self.limits.max_pixels,
            });
        }
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        let mut limits = image::Limits::default();
        // 4 bytes per pixel (RGBA) × 2 for 16-bit sources, plus decoder slack.
        limits.max_alloc = Some(self.limits.max_pixels.saturating_mul(8) + (64 << 20));
        reader.limits(limits);
        let img = reader.decode().map_err(corrupt)?;
        Ok(match img {
            DynamicImage::ImageRgb8(rgb) => rgb,
            other => other.to_rgb8(),
        })
    }

    /// JPEG through libjpeg-turbo (ISLOW IDCT, fancy upsampling), the decoder and settings
    /// Pillow uses, so the pixels are the reference's. Returns `None` for CMYK/YCCK files,
    /// which take the generic path.
    fn decode_jpeg_turbo(&self, bytes: &[u8]) -> Result<Option<RgbImage>, PreprocessError> {
        let corrupt = |reason: String| PreprocessError::Corrupt {
            format: "JPEG".into(),
            reason,
        };
        let mut dec = JPEG_DECODER.with(|d| d.borrow_mut().take());
        if dec.is_none() {
            dec = Some(
                turbojpeg::Decompressor::new()
                    .map_err(|e| PreprocessError::Resize(format!("libjpeg-turbo: {e}")))?,
            );
        }
        let Some(mut dec) = dec else {
            return Ok(None);
        };
        let result = (|| {
            // The marker count above decides; libjpeg-turbo's own limit is the backstop.
            dec.set_scan_limit(self.limits.max_jpeg_scans)
                .map_err(|e| PreprocessError::Resize(format!("libjpeg-turbo: {e}")))?;
            let header = dec.read_header(bytes).map_err(|e| corrupt(e.to_string()))?;
            if matches!(
                header.colorspace,
                turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
            ) {
                return Ok(None);
            }
            let (width, height) = (header.width as u32, header.height as u32);
            if width == 0 || height == 0 {
                return Err(PreprocessError::ZeroSize { width, height });
            }
            if width as u64 * height as u64 > self.limits.max_pixels {
                return Err(PreprocessError::TooManyPixels {
                    width,
                    height,
                    limit: self.limits.max_pixels,
                });
            }
            // libjpeg only warns on a missing end-of-image marker and fills the rest with grey;
            // Pillow refuses such a file as truncated, and so do we.
            if !has_eoi(bytes) {
                return Err(corrupt("truncated: no end-of-image marker".into()));
            }
            // The decoder is reused: set its scale for every image.
            let s = self.draft_scale(width, height) as usize;
            let factor = turbojpeg::ScalingFactor::new(1, s);
            dec.set_scaling_factor(factor)
                .map_err(|e| PreprocessError::Resize(format!("libjpeg-turbo: {e}")))?;
            let out_header = header.scaled(factor);
            let (out_w, out_h) = (out_header.width, out_header.height);
            let mut pixels = vec![0u8; out_w * out_h * 3];
            let out = turbojpeg::Image {
                pixels: pixels.as_mut_slice(),
                width: out_w,
                pitch: out_w * 3,
                height: out_h,
                format: turbojpeg::PixelFormat::RGB,
            };
            dec.decompress(bytes, out)
                .map_err(|e| corrupt(e.to_string()))?;
            RgbImage::from_raw(out_w as u32, out_h as u32, pixels)
                .map(Some)
                .ok_or_else(|| corrupt("decoded buffer size mismatch".into()))
        })();
        JPEG_DECODER.with(|d| *d.borrow_mut() = Some(dec));
        result
    }

    /// Resizes and centre-crops an RGB image to `size × size`, HWC u8 (before normalisation).
    pub fn resize_crop(&self, img: &RgbImage) -> Result<RgbImage, PreprocessError> {
        let (w, h) = img.dimensions();
        let size = self.size as usize;
        let bx = crop_box(w, h, self.size);
        let mut dst = Vec::with_capacity(size * size * 3);
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            resize_rgb8_box(
                img.as_raw(),
                w as usize,
                h as usize,
                bx,
                size,
                size,
                &mut dst,
                &mut s,
            )
        });
        RgbImage::from_raw(self.size, self.size, dst)
            .ok_or_else(|| PreprocessError::Resize("destination buffer size mismatch".into()))
    }

    /// Normalises an HWC `size × size` crop into a CHW slice of `tensor_len()` floats.
    pub fn normalize_into(&self, crop: &RgbImage, out: &mut [f32]) {
        self.normalize_hwc_into(crop.as_raw(), out);
    }

    /// Normalises a `size × size` HWC u8 crop (as [`Preprocessor::crop`] returns) into a CHW
    /// slice of `tensor_len()` floats.
    pub fn normalize_hwc_into(&self, raw: &[u8], out: &mut [f32]) {
        let plane = (self.size * self.size) as usize;
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in raw.chunks_exact(3).take(plane).enumerate() {
            r[i] = self.lut[0][px[0] as usize];
            g[i] = self.lut[1][px[1] as usize];
            b[i] = self.lut[2][px[2] as usize];
        }
    }

    /// Bytes → the `size × size` HWC u8 crop before normalisation: a quarter of the
    /// tensor's memory, for images that wait in a queue ([`Preprocessor::normalize_hwc_into`]
    /// makes the tensor).
    pub fn crop(&self, bytes: &[u8]) -> Result<Vec<u8>, PreprocessError> {
        let img = self.decode(bytes)?;
        Ok(self.resize_crop(&img)?.into_raw())
    }

    /// Bytes → CHW tensor written into `out` (a row of a preallocated batch tensor).
    pub fn preprocess_into(&self, bytes: &[u8], out: &mut [f32]) -> Result<(), PreprocessError> {
        if out.len() != self.tensor_len() {
            return Err(PreprocessError::Resize(format!(
                "output slice has {} values, expected {}",
                out.len(),
                self.tensor_len()
            )));
        }
        let img = self.decode(bytes)?;
        let crop = self.resize_crop(&img)?;
        self.normalize_into(&crop, out);
        Ok(())
    }

    /// Bytes → `[3, size, size]` tensor.
    pub fn preprocess(&self, bytes: &[u8]) -> Result<Array3<f32>, PreprocessError> {
        let s = self.size as usize;
        let mut t = Array3::<f32>::zeros((3, s, s));
        let slice = t
            .as_slice_mut()
            .ok_or_else(|| PreprocessError::Resize("non-contiguous tensor".into()))?;
        self.preprocess_into(bytes, slice)?;
        Ok(t)
    }
}

/// Runs one decode; a decoder panic becomes a permanent error for this input, so it is
/// dead-lettered (or listed as an error row) at once instead of redelivered until `max_deliver`. (The
/// thread-local decoder it may have held is taken out during a decode and made afresh.)
pub fn guard_decoder_panics<T>(
    decode: impl FnOnce() -> Result<T, PreprocessError>,
) -> Result<T, PreprocessError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        Err(PreprocessError::Panicked(why))
    })
}

/// The torchvision `Resize(size)` + `CenterCrop(size)` geometry, as a box in source pixels:
/// the long side becomes `int(size · long / short)` (truncated), the crop offset is
/// `round((n − size) / 2)` with round-half-to-even, then both are mapped back by the scale.
pub fn crop_box(w: u32, h: u32, size: u32) -> (f64, f64, f64, f64) {
    let s = size as f64;
    let (new_w, new_h) = if w <= h {
        (size, (s * h as f64 / w as f64) as u32)
    } else {
        ((s * w as f64 / h as f64) as u32, size)
    };
    let off = |n: u32| ((n as f64 - s) / 2.0).round_ties_even().max(0.0);
    let (sx, sy) = (w as f64 / new_w as f64, h as f64 / new_h as f64);
    (off(new_w) * sx, off(new_h) * sy, s * sx, s * sy)
}

/// Whether a JPEG stream contains its end-of-image marker (FF D9) near the end; trailing
/// bytes after it (padding, appended data) are tolerated.
/// Counts the start-of-scan markers of a JPEG, stopping once the count exceeds `limit`. A walk
/// over the marker segments (skipping entropy-coded data): milliseconds even for the largest
/// accepted file, while decoding a file of repeated scans costs a pass over the image per scan.
/// Malformed structure ends the walk; the decoder reports it.
fn count_jpeg_scans(bytes: &[u8], limit: u32) -> u32 {
    const SOS: u8 = 0xDA;
    let mut scans = 0u32;
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() && scans <= limit {
        if bytes[i] != 0xFF {
            return scans;
        }
        let marker = bytes[i + 1];
        match marker {
            // Fill bytes before a marker.
            0xFF => {
                i += 1;
                continue;
            }
            0xD9 => return scans, // EOI
            0xD0..=0xD7 | 0x01 => {
                i += 2;
                continue;
            }
            _ => {}
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        i += 2 + len;
        if marker == SOS {
            scans += 1;
            // Entropy-coded data runs to the next marker that is neither a stuffed 0xFF00
            // nor a restart marker.
            while i + 1 < bytes.len() {
                if bytes[i] == 0xFF
                    && bytes[i + 1] != 0x00
                    && !(0xD0..=0xD7).contains(&bytes[i + 1])
                {
                    break;
                }
                i += 1;
            }
        }
    }
    scans
}

fn has_eoi(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(64 << 10)..];
    tail.windows(2).rev().any(|w| w == [0xFF, 0xD9])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre() -> Preprocessor {
        Preprocessor::new(224, [0.5; 3], [0.5; 3], Limits::default())
    }

    /// SOI, a DQT-like segment, `n` scans whose data holds a stuffed 0xFF00 and a restart
    /// marker, then EOI.
    fn synthetic_jpeg(n: usize) -> Vec<u8> {
        let mut b = vec![0xFF, 0xD8, 0xFF, 0xDB, 0x00, 0x04, 1, 2];
        for _ in 0..n {
            b.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x03, 9]);
            b.extend_from_slice(&[7, 0xFF, 0x00, 8, 0xFF, 0xD3, 6]);
        }
        b.extend_from_slice(&[0xFF, 0xD9]);
        b
    }

    #[test]
    fn jpeg_scans_are_counted_over_marker_segments() {
        assert_eq!(count_jpeg_scans(&synthetic_jpeg(0), 10), 0);
        assert_eq!(count_jpeg_scans(&synthetic_jpeg(3), 10), 3);
        // The walk stops just above the limit: enough to refuse, and cheap.
        assert_eq!(count_jpeg_scans(&synthetic_jpeg(1000), 10), 11);
        // Truncated or malformed structure ends the walk without panicking.
        let j = synthetic_jpeg(3);
        for cut in 0..j.len() {
            assert!(count_jpeg_scans(&j[..cut], 10) <= 3);
        }
    }

    #[test]
    fn a_jpeg_above_the_scan_limit_is_too_complex() {
        let limits = Limits {
            max_jpeg_scans: 2,
            ..Limits::default()
        };
        let p = Preprocessor::new(224, [0.5; 3], [0.5; 3], limits);
        let e = p.decode(&synthetic_jpeg(3)).map(|_| ()).unwrap_err();
        assert_eq!(e, PreprocessError::TooComplex { scans: 3, limit: 2 });
        assert_eq!(e.kind(), "too_complex");
    }

    #[test]
    fn crop_geometry_matches_torchvision() {
        // 640x480 -> resize to 298x224 (int(224*640/480) = 298), crop left round(37) = 37.
        let (l, t, w, h) = crop_box(640, 480, 224);
        let sx = 640.0 / 298.0;
        assert!((l - 37.0 * sx).abs() < 1e-9 && t == 0.0);
        assert!((w - 224.0 * sx).abs() < 1e-9 && (h - 480.0).abs() < 1e-9);
        // Half-to-even: new long side 225 -> offset round(0.5) = 0; 227 -> round(1.5) = 2.
        let (l, ..) = crop_box(225, 224, 224);
        assert_eq!(l, 0.0);
        let (l, ..) = crop_box(227, 224, 224);
        assert!((l - 2.0).abs() < 1e-9);
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let p = pre();
        assert_eq!(p.decode(&[]).unwrap_err(), PreprocessError::Empty);
        assert_eq!(p.decode(b"hello world").unwrap_err().kind(), "not_image");
        let small = Preprocessor::new(
            224,
            [0.5; 3],
            [0.5; 3],
            Limits {
                max_bytes: 4,
                max_pixels: 10,
                ..Limits::default()
            },
        );
        assert_eq!(small.decode(b"12345").unwrap_err().kind(), "too_large");
        // PNG signature followed by garbage.
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend_from_slice(&[0xde; 40]);
        assert_eq!(p.decode(&png).unwrap_err().kind(), "corrupt");
    }

    #[test]
    fn normalisation_uses_mean_and_std() {
        let p = Preprocessor::new(2, [0.5, 0.0, 1.0], [0.5, 1.0, 0.25], Limits::default());
        let crop =
            RgbImage::from_raw(2, 2, vec![255, 0, 255, 0, 255, 0, 255, 255, 255, 0, 0, 0]).unwrap();
        let mut out = vec![0f32; 12];
        p.normalize_into(&crop, &mut out);
        assert_eq!(&out[0..4], &[1.0, -1.0, 1.0, -1.0]); // R: (v-0.5)/0.5
        assert_eq!(&out[4..8], &[0.0, 1.0, 1.0, 0.0]); // G: v
        assert_eq!(&out[8..12], &[0.0, -4.0, 0.0, -4.0]); // B: (v-1)/0.25
    }
}
