//! Labelled heatmaps as PNG or SVG, drawn with plotters: a title, axis titles, readable row
//! and column (token) labels, and a colour bar with values. Signed data gets a diverging
//! palette centred on 0 (blue, white, red); non-negative data a sequential one (viridis).
//! Non-finite cells are grey. The font (DejaVu Sans) is compiled in, so no system font is used.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

/// What the picture says: its title, the axes' titles and what the colour measures.
pub struct Labels<'a> {
    pub title: &'a str,
    /// Under the columns, e.g. "position (token)".
    pub x: &'a str,
    /// Beside the rows, e.g. "layer".
    pub y: &'a str,
    /// Beside the colour bar, e.g. "probability".
    pub value: &'a str,
    /// Text written in each cell (rows x cols), e.g. the logit lens's top tokens; drawn when
    /// the cells are wide enough.
    pub cells: Option<&'a [Vec<String>]>,
}

const FONT: &str = "sans-serif";
/// The colour bar's geometry in pixels: space before the strip, the strip itself, its tick
/// labels with the value's title, and space after them. They add up to the bar's area, so the
/// strip always has its width (a margin larger than the area left it none).
const BAR_MARGIN_LEFT: u32 = 14;
const BAR_STRIP: u32 = 28;
const BAR_LABELS: u32 = 92;
const BAR_MARGIN_RIGHT: u32 = 6;
const MAX_LABEL: usize = 16;

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut ok = true;
    ONCE.call_once(|| ok = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok());
    if ok {
        Ok(())
    } else {
        bail!("the compiled-in font (DejaVu Sans) did not load")
    }
}

/// A tokenizer's string token as a reader sees it: byte-level BPE symbols (GPT-2, Llama 3,
/// SmolLM: `Ġ` for a space, `Ċ` for a newline) turned back into their text, SentencePiece's `▁`
/// into a space, and spaces shown as `·`, so that " Paris" and "Paris" differ on the page. A
/// token that is not valid text on its own (part of a multi-byte character) stays as it is.
///
/// ```ignore
/// assert_eq!(readable_token("ĠParis"), "·Paris");
/// assert_eq!(readable_token("▁the"), "·the");
/// assert_eq!(readable_token("Ċ"), "\n");
/// ```
pub fn readable_token(token: &str) -> String {
    // GPT-2's bytes_to_unicode, inverted: printable Latin-1 stands for itself, the other bytes
    // for U+0100 + n in byte order
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let byte_of = |c: char| -> Option<u8> {
        let c = c as u32;
        if printable(c) {
            return Some(c as u8);
        }
        let n = c.checked_sub(0x100)?;
        (0u32..256).filter(|&b| !printable(b)).nth(n as usize).map(|b| b as u8)
    };
    let bytes = if token.contains('▁') { None } else { token.chars().map(byte_of).collect::<Option<Vec<u8>>>() };
    let text = match bytes.map(String::from_utf8) {
        Some(Ok(text)) => text,
        Some(Err(_)) => token.to_string(),
        None => token.replace('▁', " "),
    };
    text.replace(' ', "·")
}

/// A token label as it can be drawn: [`readable_token`], then [`clean`].
fn clean_token(label: &str) -> String {
    clean(&readable_token(label))
}

/// A label as it can be drawn: control characters made visible, long ones cut with an ellipsis.
fn clean(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| match c {
            '\n' => '⏎',
            '\t' => '→',
            c if c.is_control() => '?',
            c => c,
        })
        .collect();
    if s.chars().count() > MAX_LABEL {
        s.chars().take(MAX_LABEL - 1).chain(std::iter::once('…')).collect()
    } else {
        s
    }
}

fn lerp(a: (f64, f64, f64), b: (f64, f64, f64), t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let c = |x: f64, y: f64| (x + (y - x) * t).round() as u8;
    RGBColor(c(a.0, b.0), c(a.1, b.1), c(a.2, b.2))
}

/// The colour scale of one picture: diverging around 0 for signed data, else sequential.
#[derive(Clone, Copy, Debug)]
struct Scale {
    lo: f64,
    hi: f64,
    signed: bool,
}

impl Scale {
    fn of(values: &[Vec<f64>]) -> Scale {
        let finite = values.iter().flatten().copied().filter(|v| v.is_finite());
        let lo = finite.clone().fold(f64::INFINITY, f64::min);
        let hi = finite.fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() {
            return Scale { lo: 0.0, hi: 1.0, signed: false };
        }
        if lo < 0.0 {
            let m = lo.abs().max(hi.abs()).max(1e-12);
            Scale { lo: -m, hi: m, signed: true }
        } else {
            Scale { lo, hi: if hi > lo { hi } else { lo + 1.0 }, signed: false }
        }
    }

    fn color(&self, v: f64) -> RGBColor {
        if !v.is_finite() {
            return RGBColor(170, 170, 170);
        }
        let t = (v - self.lo) / (self.hi - self.lo);
        if self.signed {
            // coolwarm's ends through white
            let (blue, white, red) = ((59.0, 76.0, 192.0), (247.0, 247.0, 247.0), (180.0, 4.0, 38.0));
            if t < 0.5 {
                lerp(blue, white, t * 2.0)
            } else {
                lerp(white, red, (t - 0.5) * 2.0)
            }
        } else {
            const VIRIDIS: [(f64, f64, f64); 5] =
                [(68.0, 1.0, 84.0), (59.0, 82.0, 139.0), (33.0, 145.0, 140.0), (94.0, 201.0, 98.0), (253.0, 231.0, 37.0)];
            let x = t.clamp(0.0, 1.0) * 4.0;
            let i = (x.floor() as usize).min(3);
            lerp(VIRIDIS[i], VIRIDIS[i + 1], x - i as f64)
        }
    }
}

/// Pixel geometry of a picture of `rows` x `cols` cells.
struct Geometry {
    width: u32,
    height: u32,
    x_area: u32,
    y_area: u32,
    bar: u32,
}

fn geometry(rows: usize, cols: usize, row_labels: &[String], col_labels: &[String], title: &str) -> Geometry {
    let cell_w = (960 / cols.max(1) as u32).clamp(4, 44);
    // at least 240 pixels high, so that the colour bar can be read
    let cell_h = (720 / rows.max(1) as u32).clamp(4, 34).max(240 / rows.max(1) as u32);
    let chars = |ls: &[String]| ls.iter().map(|l| l.chars().count()).max().unwrap_or(1).min(MAX_LABEL) as u32;
    let x_area = chars(col_labels) * 7 + 36;
    let y_area = chars(row_labels) * 8 + 44;
    // the colour bar's area: a strip, its tick labels and the value's title
    let bar = BAR_MARGIN_LEFT + BAR_STRIP + BAR_LABELS + BAR_MARGIN_RIGHT;
    Geometry {
        width: (y_area + cell_w * cols as u32 + bar + 30).max(480).max(title.chars().count() as u32 * 11 + 40),
        height: 60 + cell_h * rows as u32 + x_area,
        x_area,
        y_area,
        bar,
    }
}

fn render<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    g: &Geometry,
    values: &[Vec<f64>],
    row_labels: &[String],
    col_labels: &[String],
    labels: &Labels,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the heatmap failed: {e}");
    let (rows, cols) = (values.len(), values[0].len());
    let scale = Scale::of(values);
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(labels.title, (FONT, 20)).map_err(e)?;
    let (main, bar) = root.split_horizontally(g.width - g.bar);
    // at most one label per 14 pixels along each axis; row 0 at the top
    let fit = |n: usize, pixels: u32| n.min((pixels / 14).max(1) as usize);
    let mut chart = ChartBuilder::on(&main)
        .margin(8)
        .x_label_area_size(g.x_area)
        .y_label_area_size(g.y_area)
        .build_cartesian_2d((0..cols as i32 - 1).into_segmented(), (0..rows as i32 - 1).into_segmented())
        .map_err(e)?;
    let name = |ls: &[String], v: &SegmentValue<i32>, flip: bool| match v {
        SegmentValue::CenterOf(i) => {
            let i = if flip { rows as i32 - 1 - i } else { *i };
            ls.get(i as usize).map(|l| clean(l)).unwrap_or_default()
        }
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(fit(cols, g.width - g.bar - g.y_area))
        .y_labels(fit(rows, g.height - g.x_area - 40))
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|v| name(row_labels, v, true))
        .y_label_style((FONT, 13))
        .x_desc(labels.x)
        .y_desc(labels.y)
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(e)?;
    // column labels, turned a quarter, drawn by hand (plotters misplaces rotated tick labels)
    let x_step = cols.div_ceil(fit(cols, g.width - g.bar - g.y_area));
    let style = TextStyle::from((FONT, 13).into_font()).transform(FontTransform::Rotate90).pos(Pos::new(HPos::Left, VPos::Center));
    let (_, bottom) = chart.backend_coord(&(SegmentValue::Exact(0), SegmentValue::Exact(0)));
    for c in (0..cols).step_by(x_step.max(1)) {
        let (x, _) = chart.backend_coord(&(SegmentValue::CenterOf(c as i32), SegmentValue::Exact(0)));
        let label = col_labels.get(c).map(|l| clean_token(l)).unwrap_or_default();
        main.draw_text(&label, &style, (x - main.get_base_pixel().0, bottom + 8 - main.get_base_pixel().1)).map_err(e)?;
    }
    chart
        .draw_series(values.iter().enumerate().flat_map(|(r, row)| {
            let y = (rows - 1 - r) as i32;
            row.iter().enumerate().map(move |(c, &v)| {
                let c = c as i32;
                Rectangle::new(
                    [(SegmentValue::Exact(c), SegmentValue::Exact(y)), (SegmentValue::Exact(c + 1), SegmentValue::Exact(y + 1))],
                    scale.color(v).filled(),
                )
            })
        }))
        .map_err(e)?;
    if let Some(text) = labels.cells {
        let (x0, y0) = chart.backend_coord(&(SegmentValue::Exact(0), SegmentValue::Exact(0)));
        let (x1, _) = chart.backend_coord(&(SegmentValue::Exact(1), SegmentValue::Exact(0)));
        if x1 - x0 >= 34 {
            let _ = y0;
            for (r, row) in text.iter().enumerate().take(rows) {
                for (c, t) in row.iter().enumerate().take(cols) {
                    let (x, y) = chart.backend_coord(&(SegmentValue::CenterOf(c as i32), SegmentValue::CenterOf((rows - 1 - r) as i32)));
                    let dark = values[r].get(c).is_some_and(|&v| {
                        let RGBColor(red, green, blue) = scale.color(v);
                        (red as u32 * 299 + green as u32 * 587 + blue as u32 * 114) / 1000 < 128
                    });
                    let style = TextStyle::from((FONT, 11).into_font()).color(if dark { &WHITE } else { &BLACK }).pos(Pos::new(HPos::Center, VPos::Center));
                    let short: String = clean_token(t).chars().take(((x1 - x0) / 7).max(1) as usize).collect();
                    main.draw_text(&short, &style, (x - main.get_base_pixel().0, y - main.get_base_pixel().1)).map_err(e)?;
                }
            }
        }
    }
    // the colour bar, with its values
    let mut bar_chart = ChartBuilder::on(&bar)
        .margin_top(8)
        .margin_bottom(g.x_area + 8)
        .margin_left(BAR_MARGIN_LEFT)
        .margin_right(BAR_MARGIN_RIGHT)
        .y_label_area_size(0)
        .right_y_label_area_size(BAR_LABELS)
        .build_cartesian_2d(0f64..1f64, scale.lo..scale.hi)
        .map_err(e)?
        .set_secondary_coord(0f64..1f64, scale.lo..scale.hi);
    let steps = 200;
    bar_chart
        .draw_series((0..steps).map(|i| {
            let a = scale.lo + (scale.hi - scale.lo) * i as f64 / steps as f64;
            let b = scale.lo + (scale.hi - scale.lo) * (i + 1) as f64 / steps as f64;
            Rectangle::new([(0.0, a), (1.0, b)], scale.color((a + b) / 2.0).filled())
        }))
        .map_err(e)?;
    bar_chart
        .configure_secondary_axes()
        .x_labels(0)
        .y_labels(7)
        .y_label_formatter(&|v| format_tick(*v, scale.hi - scale.lo))
        .label_style((FONT, 12))
        .y_desc(labels.value)
        .axis_desc_style((FONT, 14))
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// A colour-bar value, with as many decimals as ticks `span / 6` apart need.
fn format_tick(v: f64, span: f64) -> String {
    let step = (span / 6.0).abs().max(f64::MIN_POSITIVE);
    if v.abs() < step * 1e-6 {
        return "0".into();
    }
    let decimals = (-step.log10()).ceil().max(0.0) as usize + 1;
    if v.abs() >= 1e5 || decimals > 6 {
        format!("{v:.2e}")
    } else {
        format!("{v:.decimals$}")
    }
}

/// Draws `values` (rows x cols) with labels, writing `path` atomically: SVG when `path` ends
/// in `.svg`, else PNG.
pub fn draw(values: &[Vec<f64>], row_labels: &[String], col_labels: &[String], labels: Labels, path: &Path) -> Result<()> {
    let rows = values.len();
    let cols = values.first().map(Vec::len).unwrap_or(0);
    if rows == 0 || cols == 0 {
        bail!("nothing to draw: the matrix is {rows} x {cols}");
    }
    if values.iter().any(|r| r.len() != cols) {
        bail!("cannot draw a ragged matrix: rows have different lengths");
    }
    register_font()?;
    let g = geometry(rows, cols, row_labels, col_labels, labels.title);
    let svg = path.extension().is_some_and(|x| x.eq_ignore_ascii_case("svg"));
    let bytes = if svg {
        let mut s = String::new();
        render(SVGBackend::with_string(&mut s, (g.width, g.height)).into_drawing_area(), &g, values, row_labels, col_labels, &labels)?;
        s.into_bytes()
    } else {
        let mut rgb = vec![0u8; g.width as usize * g.height as usize * 3];
        render(BitMapBackend::with_buffer(&mut rgb, (g.width, g.height)).into_drawing_area(), &g, values, row_labels, col_labels, &labels)?;
        let img = image::RgbImage::from_raw(g.width, g.height, rgb).ok_or_else(|| anyhow!("the picture buffer has the wrong size"))?;
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        png
    };
    crate::write_atomic(path, &bytes)
}

/// String tokens of example `ex`, when the cache recorded them.
pub(crate) fn recorded_tokens(c: &hook_cache::ActivationCache, ex: usize) -> Option<Vec<String>> {
    let hook_cache::CacheValue::Data(d) = c.get("hookrs_batches")?.inner() else { return None };
    let t = d["string_tokens"].get(ex)?.as_array()?;
    Some(t.iter().filter_map(|x| x.as_str().map(String::from)).collect())
}

/// Positions the extraction kept, when the token groups are explicit.
pub(crate) fn recorded_positions(c: &hook_cache::ActivationCache, n_tokens: usize) -> Option<Vec<usize>> {
    let hook_cache::CacheValue::Data(d) = c.get("metadata")?.inner() else { return None };
    let groups: hook_core::TokenGroups = d["target_token_positions"].as_str()?.parse().ok()?;
    groups.resolve(n_tokens).ok().map(|r| r.flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_data_is_centred_on_zero() {
        let s = Scale::of(&[vec![-1.0, 3.0]]);
        assert!(s.signed);
        assert_eq!((s.lo, s.hi), (-3.0, 3.0));
        assert_eq!(s.color(0.0), RGBColor(247, 247, 247));
        let p = Scale::of(&[vec![0.2, 0.9]]);
        assert!(!p.signed);
        assert_eq!(p.color(0.2), RGBColor(68, 1, 84));
        assert_eq!(p.color(f64::NAN), RGBColor(170, 170, 170));
    }

    #[test]
    fn labels_are_made_drawable() {
        assert_eq!(clean("a\nb"), "a⏎b");
        assert_eq!(readable_token("ĠParis"), "·Paris");
        assert_eq!(readable_token("Paris"), "Paris");
        assert_eq!(readable_token("▁the"), "·the");
        assert_eq!(clean_token("Ċ"), "⏎");
        assert_eq!(readable_token("ĠĠĠ"), "···");
        assert_eq!(readable_token("Ã©"), "é", "two byte-level symbols of one character");
        assert_eq!(readable_token("<|im_start|>"), "<|im_start|>");
        assert_eq!(readable_token("café"), "café", "not byte-level: left as it is");
        assert_eq!(clean(&"x".repeat(40)).chars().count(), MAX_LABEL);
        assert_eq!(format_tick(0.25, 1.0), "0.25");
        assert_eq!(format_tick(0.0061, 0.001), "0.00610");
        assert_eq!(format_tick(1e-20, 1.0), "0");
        assert_eq!(format_tick(123456.0, 1e6), "1.23e5");
    }

    #[test]
    fn the_colour_bar_shows_its_strip() {
        let dir = tempfile::tempdir().unwrap();
        let v = vec![vec![-1.0, 0.5], vec![0.0, 2.0]];
        let rows = vec!["L0".to_string(), "L1".to_string()];
        let cols = vec!["a".to_string(), "b".to_string()];
        let path = dir.path().join("bar.png");
        draw(&v, &rows, &cols, Labels { title: "t", x: "x", y: "y", value: "v", cells: None }, &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        let g = geometry(2, 2, &rows, &cols, "t");
        // the strip's middle column runs from the palette's top end (red, +2) to its bottom (blue, -2)
        let x = g.width - g.bar + BAR_MARGIN_LEFT + BAR_STRIP / 2;
        let column: Vec<[u8; 3]> = (0..img.height()).map(|y| img.get_pixel(x, y).0).collect();
        let near = |c: &[u8; 3], want: (u8, u8, u8)| (c[0] as i32 - want.0 as i32).abs() < 12 && (c[1] as i32 - want.1 as i32).abs() < 12 && (c[2] as i32 - want.2 as i32).abs() < 12;
        let red = column.iter().position(|c| near(c, (180, 4, 38))).expect("the strip's red end is drawn");
        let blue = column.iter().rposition(|c| near(c, (59, 76, 192))).expect("the strip's blue end is drawn");
        assert!(red < blue, "the strip runs from high values at the top to low ones at the bottom");
        let white = column.iter().filter(|c| near(c, (247, 247, 247))).count();
        assert!(white >= 1 && (blue - red) > 100, "a strip of {} pixels", blue - red);
    }

    #[test]
    fn writes_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let v = vec![vec![-1.0, 0.5, f64::NAN], vec![0.0, 2.0, -0.25]];
        let rows = vec!["L0".to_string(), "L1".to_string()];
        let cols = vec!["<s>".to_string(), " the".to_string(), "\n".to_string()];
        let l = Labels { title: "t", x: "position", y: "layer", value: "v", cells: None };
        draw(&v, &rows, &cols, l, &dir.path().join("a.png")).unwrap();
        let png = std::fs::read(dir.path().join("a.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let l = Labels { title: "title <&>", x: "position", y: "layer", value: "v", cells: None };
        draw(&v, &rows, &cols, l, &dir.path().join("a.svg")).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("a.svg")).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        assert!(svg.contains("·the") && svg.contains("layer"));
        assert!(draw(&[], &[], &[], Labels { title: "", x: "", y: "", value: "", cells: None }, &dir.path().join("b.png")).is_err());
    }
}
