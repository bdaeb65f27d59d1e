//! Scatter plots of 2-D maps as PNG images: points coloured by label, a legend with the
//! label names and counts, a title and axis names.
//!
//! `plotters` draws the axes and points into an in-memory RGB buffer; text is set with
//! `ab_glyph` in the bundled DejaVu Sans (`assets/DejaVuSans.ttf`, Bitstream Vera
//! licence, `assets/LICENSE-DejaVu.txt`), so no system font library is involved
//! (plotters' own `ab_glyph` text path drops each glyph's side bearing, which turns
//! "cl" into "d"); the `png` crate encodes the result. The same input gives the same
//! bytes.

use crate::error::{Error, Result};
use crate::model::rng::Rng;
use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::OnceLock;

/// The categorical palette: Tableau 10 (matplotlib's `tab10`) and then the light halves
/// of Tableau 20, both without their greys, which mark unlabelled and "other" points.
pub const PALETTE: [[u8; 3]; 18] = [
    [0x1f, 0x77, 0xb4], // blue
    [0xff, 0x7f, 0x0e], // orange
    [0x2c, 0xa0, 0x2c], // green
    [0xd6, 0x27, 0x28], // red
    [0x94, 0x67, 0xbd], // purple
    [0x8c, 0x56, 0x4b], // brown
    [0xe3, 0x77, 0xc2], // pink
    [0xbc, 0xbd, 0x22], // olive
    [0x17, 0xbe, 0xcf], // cyan
    [0xae, 0xc7, 0xe8], // light blue
    [0xff, 0xbb, 0x78], // light orange
    [0x98, 0xdf, 0x8a], // light green
    [0xff, 0x98, 0x96], // light red
    [0xc5, 0xb0, 0xd5], // light purple
    [0xc4, 0x9c, 0x94], // light brown
    [0xf7, 0xb6, 0xd2], // light pink
    [0xdb, 0xdb, 0x8d], // light olive
    [0x9e, 0xda, 0xe5], // light cyan
];

/// Colour of points without a label (NULL).
pub const NULL_COLOR: [u8; 3] = [0xc7, 0xc7, 0xc7];
/// Colour of the points whose labels did not get a colour of their own.
pub const OTHER_COLOR: [u8; 3] = [0x7f, 0x7f, 0x7f];
const TEXT_COLOR: [u8; 3] = [0x20, 0x20, 0x20];

/// Smallest and largest image side, in pixels.
pub const MIN_SIDE: u32 = 300;
pub const MAX_SIDE: u32 = 8000;

const FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// Longest label shown in the legend, in characters; longer ones end in "…".
const MAX_LABEL_CHARS: usize = 40;
const MAX_TITLE_CHARS: usize = 100;

/// Options of [`scatter_png`].
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOptions {
    /// Image size in pixels, each side in [`MIN_SIDE`] ..= [`MAX_SIDE`]. Default 1200 × 900.
    pub width: u32,
    pub height: u32,
    /// Axis names. Default "UMAP 1" and "UMAP 2".
    pub x_label: String,
    pub y_label: String,
    /// Heading of the legend, e.g. the label column's name. Default none.
    pub legend_title: Option<String>,
    /// Point radius in pixels, 1 ..= 20; `None` picks it from the number of points
    /// (3 up to 2,000 points, 2 up to 10,000, then 1).
    pub point_radius: Option<u32>,
}

impl Default for PlotOptions {
    fn default() -> Self {
        PlotOptions {
            width: 1200,
            height: 900,
            x_label: "UMAP 1".into(),
            y_label: "UMAP 2".into(),
            legend_title: None,
            point_radius: None,
        }
    }
}

/// One legend line: the text shown (the label, "other (k labels)" or "(null)"), how
/// many points it covers, and their colour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegendEntry {
    pub text: String,
    pub count: usize,
    pub color: [u8; 3],
}

/// Colours for `labels`: the legend, and for each point the index of its entry.
///
/// Labels are ordered by count (descending), ties by name. Up to 18 labels each take a
/// [`PALETTE`] colour in that order; with more, the 17 largest do and the rest share
/// "other (k labels)" in [`OTHER_COLOR`]. Unlabelled points come last, as "(null)" in
/// [`NULL_COLOR`].
pub fn legend(labels: &[Option<String>]) -> (Vec<LegendEntry>, Vec<usize>) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    let mut nulls = 0;
    for l in labels {
        match l {
            Some(s) => *counts.entry(s.as_str()).or_insert(0) += 1,
            None => nulls += 1,
        }
    }
    let mut groups: Vec<(&str, usize)> = counts.into_iter().collect();
    groups.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let coloured = if groups.len() <= PALETTE.len() {
        groups.len()
    } else {
        PALETTE.len() - 1
    };
    let mut entries: Vec<LegendEntry> = groups[..coloured]
        .iter()
        .zip(PALETTE)
        .map(|(&(name, count), color)| LegendEntry {
            text: name.to_string(),
            count,
            color,
        })
        .collect();
    let mut index: HashMap<&str, usize> = groups[..coloured]
        .iter()
        .enumerate()
        .map(|(i, g)| (g.0, i))
        .collect();
    if coloured < groups.len() {
        let rest = &groups[coloured..];
        for g in rest {
            index.insert(g.0, entries.len());
        }
        entries.push(LegendEntry {
            text: format!("other ({} labels)", rest.len()),
            count: rest.iter().map(|g| g.1).sum(),
            color: OTHER_COLOR,
        });
    }
    let null_entry = entries.len();
    if nulls > 0 {
        entries.push(LegendEntry {
            text: "(null)".into(),
            count: nulls,
            color: NULL_COLOR,
        });
    }
    let of_point = labels
        .iter()
        .map(|l| match l {
            Some(s) => index.get(s.as_str()).copied().unwrap_or(null_entry),
            None => null_entry,
        })
        .collect();
    (entries, of_point)
}

/// A PNG scatter plot of `points` coloured by `labels` (one per point; `None` = no
/// label), with `title` on top, the axis names of `opts` and a legend on the right
/// ([`legend`] gives the colours). Grey points ("(null)", "other") are drawn first, the
/// rest in a fixed shuffled order, so that no label systematically hides another.
///
/// Errors: `points` and `labels` of different lengths ([`Kind::ArrayShape`]); no points
/// or a non-finite coordinate ([`Kind::Data`]); a size or radius out of range
/// ([`Kind::InvalidParameter`]).
///
/// [`Kind::ArrayShape`]: crate::Kind::ArrayShape
/// [`Kind::Data`]: crate::Kind::Data
/// [`Kind::InvalidParameter`]: crate::Kind::InvalidParameter
pub fn scatter_png(
    points: &[[f32; 2]],
    labels: &[Option<String>],
    title: &str,
    opts: &PlotOptions,
) -> Result<Vec<u8>> {
    if points.len() != labels.len() {
        return Err(Error::shape(format!(
            "{} points but {} labels",
            points.len(),
            labels.len()
        )));
    }
    if points.is_empty() {
        return Err(Error::data("no points to plot"));
    }
    if let Some(i) = points
        .iter()
        .position(|p| !(p[0].is_finite() && p[1].is_finite()))
    {
        return Err(Error::data(format!(
            "point {i} has a non-finite coordinate ({}, {})",
            points[i][0], points[i][1]
        )));
    }
    for (what, v) in [("width", opts.width), ("height", opts.height)] {
        if !(MIN_SIDE..=MAX_SIDE).contains(&v) {
            return Err(Error::invalid(format!(
                "plot {what} must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {v}"
            )));
        }
    }
    if let Some(r) = opts.point_radius {
        if !(1..=20).contains(&r) {
            return Err(Error::invalid(format!(
                "point radius must be between 1 and 20 pixels, got {r}"
            )));
        }
    }
    let font = font()?;
    let (entries, of_point) = legend(labels);
    let radius = opts.point_radius.unwrap_or(match points.len() {
        0..=2_000 => 3,
        2_001..=10_000 => 2,
        _ => 1,
    });

    let (w, h) = (opts.width, opts.height);
    // Sizes are given for 1200 × 900 and scale with the image.
    let scale = (w.min(h * 4 / 3) as f32 / 1200.0).max(0.5);
    let px = |v: f32| (v * scale).round().max(1.0);
    let title_h = px(56.0) as i32;
    let legend_size = px(18.0);
    let legend_lines: Vec<String> = entries
        .iter()
        .map(|e| format!("{} ({})", shorten(&e.text, MAX_LABEL_CHARS), e.count))
        .collect();
    let legend_head = opts
        .legend_title
        .as_deref()
        .map(|t| shorten(t, MAX_LABEL_CHARS));
    let widest = legend_lines
        .iter()
        .chain(legend_head.iter())
        .map(|l| text_width(font, legend_size, l))
        .fold(0.0f32, f32::max);
    let legend_w = ((widest + 3.0 * legend_size) as u32).clamp(w / 6, w / 3);

    let mut buf = vec![0u8; w as usize * h as usize * 3];
    let mut texts: Vec<TextItem> = Vec::new();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (_, body) = root.split_vertically(title_h as u32);
        let (plot_area, legend_area) = body.split_horizontally(w.saturating_sub(legend_w));
        let (xr, yr) = draw_points(&plot_area, points, &entries, &of_point, radius, &px)?;
        let x_mid = (xr.start + xr.end) as f32 / 2.0;
        texts.push(TextItem::new(
            shorten(title.trim(), MAX_TITLE_CHARS),
            px(28.0),
            (x_mid, title_h as f32 / 2.0 + px(4.0)),
        ));
        texts.push(TextItem::new(
            shorten(&opts.x_label, MAX_LABEL_CHARS),
            px(20.0),
            (x_mid, yr.end as f32 + px(26.0)),
        ));
        texts.push(TextItem {
            vertical: true,
            ..TextItem::new(
                shorten(&opts.y_label, MAX_LABEL_CHARS),
                px(20.0),
                (xr.start as f32 - px(26.0), (yr.start + yr.end) as f32 / 2.0),
            )
        });

        // The legend: swatches drawn here, their text after plotters is done.
        let (lx, ly) = legend_area.get_base_pixel();
        let line = (legend_size * 1.45).round();
        let swatch = (legend_size * 0.35).round().max(3.0);
        let x0 = lx as f32 + px(8.0);
        let mut y = ly as f32 + px(40.0);
        if let Some(head) = legend_head {
            texts.push(TextItem {
                left: true,
                ..TextItem::new(head, legend_size * 1.05, (x0, y))
            });
            y += line * 1.25;
        }
        for (e, text) in entries.iter().zip(legend_lines) {
            root.draw(&Circle::new(
                ((x0 + swatch) as i32, y as i32),
                swatch as u32,
                rgb(e.color).filled(),
            ))
            .map_err(draw_err)?;
            texts.push(TextItem {
                left: true,
                ..TextItem::new(text, legend_size, (x0 + 3.0 * swatch, y))
            });
            y += line;
        }
        root.present().map_err(draw_err)?;
    }
    for t in &texts {
        draw_text(&mut buf, w, h, font, t);
    }
    encode_png(&buf, w, h)
}

fn font() -> Result<&'static FontRef<'static>> {
    static FONT: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).ok())
        .as_ref()
        .ok_or_else(|| Error::internal("the bundled font could not be read"))
}

fn draw_err<E: std::fmt::Display>(e: E) -> Error {
    Error::internal(format!("drawing the plot failed: {e}"))
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

fn rgb(c: [u8; 3]) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

/// Draws the axes and the points; returns the plotting region in image pixels.
fn draw_points(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    points: &[[f32; 2]],
    entries: &[LegendEntry],
    of_point: &[usize],
    radius: u32,
    px: &dyn Fn(f32) -> f32,
) -> Result<(Range<i32>, Range<i32>)> {
    let range = |axis: usize| {
        let (lo, hi) = points
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), p| {
                (l.min(p[axis]), h.max(p[axis]))
            });
        let pad = if hi > lo { 0.04 * (hi - lo) } else { 1.0 };
        (lo - pad)..(hi + pad)
    };
    let mut chart = ChartBuilder::on(area)
        .margin(px(12.0) as u32)
        .x_label_area_size(px(40.0) as u32)
        .y_label_area_size(px(40.0) as u32)
        .build_cartesian_2d(range(0), range(1))
        .map_err(draw_err)?;
    // UMAP coordinates have no units: axes without ticks or grid, as is the custom.
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(0)
        .y_labels(0)
        .draw()
        .map_err(draw_err)?;

    let is_grey = |e: usize| entries[e].color == NULL_COLOR || entries[e].color == OTHER_COLOR;
    let mut order: Vec<usize> = (0..points.len()).collect();
    let mut rng = Rng::new(0x504C_4F54);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order.sort_by_key(|&i| !is_grey(of_point[i]));
    let colors: Vec<RGBColor> = entries.iter().map(|e| rgb(e.color)).collect();
    chart
        .draw_series(order.iter().map(|&i| {
            let p = points[i];
            Circle::new((p[0], p[1]), radius, colors[of_point[i]].filled())
        }))
        .map_err(draw_err)?;
    Ok(chart.plotting_area().get_pixel_range())
}

/// A line of text: centred on `at` (or starting there, `left`), optionally turned to
/// read upwards (`vertical`).
struct TextItem {
    text: String,
    size: f32,
    at: (f32, f32),
    left: bool,
    vertical: bool,
}

impl TextItem {
    fn new(text: String, size: f32, at: (f32, f32)) -> TextItem {
        TextItem {
            text,
            size,
            at,
            left: false,
            vertical: false,
        }
    }
}

/// Glyphs of `text` on a baseline at y = 0 from x = 0, with kerning; and the advance.
fn layout(font: &FontRef<'static>, size: f32, text: &str) -> (Vec<ab_glyph::Glyph>, f32) {
    let sf = font.as_scaled(PxScale::from(size));
    let mut caret = 0.0f32;
    let mut prev = None;
    let mut glyphs = Vec::with_capacity(text.len());
    for c in text.chars() {
        let id = sf.glyph_id(c);
        if let Some(p) = prev {
            caret += sf.kern(p, id);
        }
        glyphs.push(id.with_scale_and_position(size, point(caret, 0.0)));
        caret += sf.h_advance(id);
        prev = Some(id);
    }
    (glyphs, caret)
}

fn text_width(font: &FontRef<'static>, size: f32, text: &str) -> f32 {
    layout(font, size, text).1
}

/// Draws `t` into the RGB buffer, blending by glyph coverage; pixels outside are skipped.
fn draw_text(buf: &mut [u8], w: u32, h: u32, font: &FontRef<'static>, t: &TextItem) {
    let sf = font.as_scaled(PxScale::from(t.size));
    let (glyphs, width) = layout(font, t.size, &t.text);
    // Offsets from the anchor along the text (u) and across it (v, down = +).
    let u0 = if t.left { 0.0 } else { -width / 2.0 };
    let v0 = (sf.ascent() + sf.descent()) / 2.0;
    for g in glyphs {
        let Some(outline) = font.outline_glyph(g) else {
            continue; // blank (space) or missing glyph
        };
        let b = outline.px_bounds();
        outline.draw(|gx, gy, cov| {
            let u = u0 + b.min.x + gx as f32;
            let v = v0 + b.min.y + gy as f32;
            let (x, y) = if t.vertical {
                (t.at.0 + v, t.at.1 - u)
            } else {
                (t.at.0 + u, t.at.1 + v)
            };
            let (x, y) = (x.round() as i64, y.round() as i64);
            if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
                return;
            }
            let i = (y as usize * w as usize + x as usize) * 3;
            let a = cov.clamp(0.0, 1.0);
            for (p, &c) in buf[i..i + 3].iter_mut().zip(&TEXT_COLOR) {
                *p = (*p as f32 * (1.0 - a) + c as f32 * a).round() as u8;
            }
        });
    }
}

fn encode_png(rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    let err = |e: png::EncodingError| Error::internal(format!("encoding the PNG failed: {e}"));
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(err)?;
        writer.write_image_data(rgb).map_err(err)?;
        writer.finish().map_err(err)?;
    }
    Ok(out)
}
