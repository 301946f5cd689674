//! Labelled heatmaps as PNG (an `image` buffer and an 8×8 bitmap font).

use std::path::Path;

use anyhow::{bail, Result};
use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

const MAX_LABEL: usize = 14;

fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, vertical: bool) {
    text_n(img, x, y, s, vertical, MAX_LABEL)
}

fn text_n(img: &mut RgbImage, x: i64, y: i64, s: &str, vertical: bool, max: usize) {
    for (i, ch) in s.chars().take(max).enumerate() {
        let glyph = font8x8::BASIC_FONTS.get(ch).or_else(|| font8x8::BASIC_FONTS.get('?')).unwrap_or([0; 8]);
        let (ox, oy) = if vertical { (x, y + 8 * i as i64) } else { (x + 8 * i as i64, y) };
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    let (px, py) = if vertical { (ox + 7 - row as i64, oy + col as i64) } else { (ox + col as i64, oy + row as i64) };
                    if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                        img.put_pixel(px as u32, py as u32, Rgb([20, 20, 20]));
                    }
                }
            }
        }
    }
}

/// White → red for non-negative data; blue → white → red when there are negatives.
fn color(v: f64, lo: f64, hi: f64) -> Rgb<u8> {
    if !v.is_finite() {
        return Rgb([160, 160, 160]);
    }
    let lerp = |a: f64, b: f64, t: f64| (a + (b - a) * t.clamp(0.0, 1.0)) as u8;
    if lo < 0.0 {
        let m = lo.abs().max(hi.abs()).max(1e-12);
        let t = v / m;
        if t >= 0.0 {
            Rgb([lerp(255.0, 200.0, t), lerp(255.0, 30.0, t), lerp(255.0, 30.0, t)])
        } else {
            Rgb([lerp(255.0, 30.0, -t), lerp(255.0, 80.0, -t), lerp(255.0, 200.0, -t)])
        }
    } else {
        let t = if hi > lo { (v - lo) / (hi - lo) } else { 0.0 };
        Rgb([lerp(255.0, 180.0, t), lerp(255.0, 20.0, t), lerp(255.0, 20.0, t)])
    }
}

/// Draws `values` (rows × cols) with labels and a title, writing a PNG atomically.
pub fn draw(values: &[Vec<f64>], row_labels: &[String], col_labels: &[String], title: &str, path: &Path) -> Result<()> {
    let rows = values.len();
    let cols = values.first().map(Vec::len).unwrap_or(0);
    if rows == 0 || cols == 0 {
        bail!("nothing to draw: the matrix is {rows} x {cols}");
    }
    let cell: u32 = if rows.max(cols) > 64 { 6 } else { 22 };
    let lab = |ls: &[String]| ls.iter().map(|l| l.chars().count().min(MAX_LABEL)).max().unwrap_or(0) as u32 * 8;
    let left = lab(row_labels) + 10;
    let top = 24 + lab(col_labels) + 6;
    let width = (left + cell * cols as u32 + 10).max(8 * title.len() as u32 + 16);
    let height = top + cell * rows as u32 + 26;
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let finite = values.iter().flatten().copied().filter(|v| v.is_finite());
    let lo = finite.clone().fold(f64::INFINITY, f64::min);
    let hi = finite.fold(f64::NEG_INFINITY, f64::max);
    text_n(&mut img, 8, 6, title, false, usize::MAX);
    for (c, l) in col_labels.iter().enumerate().take(cols) {
        if cell >= 8 {
            text(&mut img, (left + c as u32 * cell + (cell - 8) / 2) as i64, 24, l, true);
        }
    }
    for (r, row) in values.iter().enumerate() {
        if let Some(l) = row_labels.get(r) {
            if cell >= 8 {
                text(&mut img, 4, (top + r as u32 * cell + (cell - 8) / 2) as i64, l, false);
            }
        }
        for (c, &v) in row.iter().enumerate() {
            let col = color(v, lo, hi);
            for dy in 0..cell.saturating_sub(1) {
                for dx in 0..cell.saturating_sub(1) {
                    img.put_pixel(left + c as u32 * cell + dx, top + r as u32 * cell + dy, col);
                }
            }
        }
    }
    text_n(&mut img, 8, (top + rows as u32 * cell + 8) as i64, &format!("min {lo:.3} max {hi:.3}"), false, usize::MAX);
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::write_atomic(path, &bytes)
}
