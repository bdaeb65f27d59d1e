//! PNG scatter plots (`exceiver_core::plot`): the image decodes at the requested size,
//! shows each label's colour where its points are, has text, and bad input errors.

use exceiver_core::plot::{legend, scatter_png, PlotOptions, NULL_COLOR, OTHER_COLOR, PALETTE};
use exceiver_core::Kind;

struct Image {
    w: u32,
    h: u32,
    rgb: Vec<u8>,
}

impl Image {
    fn px(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.w as usize + x as usize) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }
    /// Pixels of exactly `c`, and the mean x of them.
    fn count(&self, c: [u8; 3]) -> (usize, f64) {
        let (mut n, mut sx) = (0usize, 0f64);
        for y in 0..self.h {
            for x in 0..self.w {
                if self.px(x, y) == c {
                    n += 1;
                    sx += x as f64;
                }
            }
        }
        (n, if n > 0 { sx / n as f64 } else { f64::NAN })
    }
    /// Dark (text or axis) pixels in the rectangle.
    fn dark(&self, x0: u32, y0: u32, x1: u32, y1: u32) -> usize {
        let mut n = 0;
        for y in y0..y1 {
            for x in x0..x1 {
                if self.px(x, y).iter().all(|&v| v < 100) {
                    n += 1;
                }
            }
        }
        n
    }
}

fn decode(png_bytes: &[u8]) -> Image {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut rgb = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut rgb).expect("a frame");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    rgb.truncate(info.buffer_size());
    Image {
        w: info.width,
        h: info.height,
        rgb,
    }
}

/// Three labels in three vertical bands (x ≈ 0, 5, 10) plus unlabelled points at x ≈ 2.5.
fn bands() -> (Vec<[f32; 2]>, Vec<Option<String>>) {
    let mut points = Vec::new();
    let mut labels = Vec::new();
    for i in 0..300 {
        let y = (i % 100) as f32 / 10.0;
        let (x, l) = match i / 100 {
            0 => (0.0, "B cells"),
            1 => (5.0, "T cells"),
            _ => (10.0, "NK"),
        };
        // T cells are the largest group: 100 + 40 more.
        points.push([x + (i % 7) as f32 * 0.05, y]);
        labels.push(Some(l.to_string()));
    }
    for i in 0..40 {
        points.push([5.1, i as f32 / 4.0]);
        labels.push(Some("T cells".into()));
    }
    for i in 0..30 {
        points.push([2.5, i as f32 / 3.0]);
        labels.push(None);
    }
    (points, labels)
}

#[test]
fn png_has_size_colours_where_the_points_are_and_text() {
    let (points, labels) = bands();
    let bytes = scatter_png(&points, &labels, "three bands", &PlotOptions::default()).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let img = decode(&bytes);
    assert_eq!((img.w, img.h), (1200, 900));

    let (entries, _) = legend(&labels);
    let texts: Vec<(&str, usize)> = entries.iter().map(|e| (e.text.as_str(), e.count)).collect();
    assert_eq!(
        texts,
        [
            ("T cells", 140),
            ("B cells", 100),
            ("NK", 100),
            ("(null)", 30)
        ]
    );
    assert_eq!(entries[0].color, PALETTE[0]);
    assert_eq!(entries[1].color, PALETTE[1]);
    assert_eq!(entries[2].color, PALETTE[2]);
    assert_eq!(entries[3].color, NULL_COLOR);

    // Each colour is drawn, and its points sit left to right: B (x=0) < null (2.5) <
    // T (5) < NK (10). The legend swatches are far right, so compare the plot part only
    // by excluding the swatch pixels (a few dozen) through the counts' weight.
    let (nb, xb) = img.count(entries[1].color);
    let (nt, xt) = img.count(entries[0].color);
    let (nk, xk) = img.count(entries[2].color);
    let (nn, xn) = img.count(NULL_COLOR);
    for (n, what) in [(nb, "B"), (nt, "T"), (nk, "NK"), (nn, "null")] {
        assert!(n >= 200, "{what}: {n} pixels of its colour");
    }
    assert!(
        xb < xn && xn < xt && xt < xk,
        "mean x: B {xb} null {xn} T {xt} NK {xk}"
    );

    // Text: the title band and the legend column have dark glyph pixels; the axis
    // names sit below and left of the plot.
    assert!(img.dark(0, 0, 1200, 50) > 200, "title");
    assert!(img.dark(1000, 60, 1200, 300) > 300, "legend");
    assert!(img.dark(300, 860, 700, 900) > 50, "x axis name");
    assert!(img.dark(0, 350, 40, 550) > 50, "y axis name");
}

#[test]
fn same_input_same_bytes_and_options_apply() {
    let (points, labels) = bands();
    let o = PlotOptions {
        width: 640,
        height: 480,
        legend_title: Some("cell type".into()),
        point_radius: Some(5),
        x_label: "x".into(),
        y_label: "y".into(),
    };
    let a = scatter_png(&points, &labels, "t", &o).unwrap();
    let b = scatter_png(&points, &labels, "t", &o).unwrap();
    assert_eq!(a, b);
    let img = decode(&a);
    assert_eq!((img.w, img.h), (640, 480));
    let small = scatter_png(
        &points,
        &labels,
        "t",
        &PlotOptions {
            point_radius: Some(1),
            ..o
        },
    )
    .unwrap();
    let (big_n, _) = img.count(PALETTE[0]);
    let (small_n, _) = decode(&small).count(PALETTE[0]);
    assert!(
        big_n > 4 * small_n,
        "radius 5: {big_n} pixels, radius 1: {small_n}"
    );
}

#[test]
fn legend_groups_many_labels_and_orders_by_count() {
    // 25 labels "l00".."l24" with 25, 24, ... 1 points, then 3 unlabelled.
    let mut labels = Vec::new();
    for i in 0..25 {
        for _ in 0..(25 - i) {
            labels.push(Some(format!("l{i:02}")));
        }
    }
    labels.extend([None, None, None]);
    let (entries, of_point) = legend(&labels);
    assert_eq!(entries.len(), 19);
    for (i, e) in entries[..17].iter().enumerate() {
        assert_eq!(
            (e.text.clone(), e.count, e.color),
            (format!("l{i:02}"), 25 - i, PALETTE[i])
        );
    }
    assert_eq!(entries[17].text, "other (8 labels)");
    assert_eq!(entries[17].count, (1..=8).sum::<usize>());
    assert_eq!(entries[17].color, OTHER_COLOR);
    assert_eq!(
        (entries[18].text.as_str(), entries[18].count),
        ("(null)", 3)
    );
    assert_eq!(of_point[0], 0);
    assert_eq!(of_point[labels.len() - 4], 17); // "l24"
    assert_eq!(of_point[labels.len() - 1], 18);

    // Exactly 18 labels all get colours; ties in count go by name.
    let labels: Vec<Option<String>> = (0..18).rev().map(|i| Some(format!("x{i:02}"))).collect();
    let (entries, _) = legend(&labels);
    assert_eq!(entries.len(), 18);
    assert_eq!(entries[0].text, "x00");
    assert!(entries.iter().all(|e| e.color != OTHER_COLOR));

    // Many labels, long and non-ASCII ones, one point: still a picture.
    let mut labels: Vec<Option<String>> = (0..30)
        .map(|i| Some(format!("γδ T cells, subtype {i} {}", "x".repeat(60))))
        .collect();
    labels[0] = Some(String::new());
    let points: Vec<[f32; 2]> = (0..30).map(|i| [i as f32, 0.0]).collect();
    assert!(scatter_png(
        &points,
        &labels,
        &"long title ".repeat(30),
        &PlotOptions::default()
    )
    .is_ok());
    assert!(scatter_png(&[[1.0, 1.0]], &[None], "", &PlotOptions::default()).is_ok());
}

#[test]
fn bad_input_errors() {
    let o = PlotOptions::default();
    let e = scatter_png(&[[0.0, 0.0]; 3], &[None, None], "t", &o).unwrap_err();
    assert_eq!(e.kind, Kind::ArrayShape);
    assert_eq!(e.message, "3 points but 2 labels");

    let e = scatter_png(&[], &[], "t", &o).unwrap_err();
    assert_eq!(e.kind, Kind::Data);
    assert_eq!(e.message, "no points to plot");

    let e = scatter_png(&[[0.0, 0.0], [f32::NAN, 1.0]], &[None, None], "t", &o).unwrap_err();
    assert_eq!(e.kind, Kind::Data);
    assert_eq!(e.message, "point 1 has a non-finite coordinate (NaN, 1)");

    for (w, h) in [(299, 900), (1200, 8001), (0, 0)] {
        let e = scatter_png(
            &[[0.0, 0.0]],
            &[None],
            "t",
            &PlotOptions {
                width: w,
                height: h,
                ..o.clone()
            },
        )
        .unwrap_err();
        assert_eq!(e.kind, Kind::InvalidParameter, "{w}×{h}");
        assert!(e.message.starts_with("plot "), "{}", e.message);
    }
    for r in [0, 21] {
        let e = scatter_png(
            &[[0.0, 0.0]],
            &[None],
            "t",
            &PlotOptions {
                point_radius: Some(r),
                ..o.clone()
            },
        )
        .unwrap_err();
        assert_eq!(e.kind, Kind::InvalidParameter);
        assert_eq!(
            e.message,
            format!("point radius must be between 1 and 20 pixels, got {r}")
        );
    }
}
