//! The picture (`--plot FILE`): one self-contained SVG file, no scripts or
//! external references, so it opens in any browser and can be attached to
//! a model card. It holds the relative norm of each module kind across the
//! layers (one line per kind, log scale), and with `--against`, a
//! layers x module-kinds heatmap of cosine similarity.

use std::fmt::Write as _;

use super::TensorResult;
use super::figures::Figures;
use super::report::{Group, module_kind};
use crate::model::layers::layer_index;
use crate::svg::xml;

/// The kinds drawn per layer.
const LAYER_KINDS: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];
/// A color per kind (Tableau 10).
const COLORS: [&str; 7] = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1"];

/// Figures per (layer, kind), for the layers the vector has.
fn grid(results: &[TensorResult]) -> (u64, Vec<Vec<Option<Figures>>>) {
    let layers = results.iter().filter_map(|r| layer_index(&r.name)).max().map_or(0, |m| m + 1);
    let mut cells = vec![vec![Group::default(); LAYER_KINDS.len()]; layers as usize];
    for r in results {
        let (Some(l), Some(k)) =
            (layer_index(&r.name), LAYER_KINDS.iter().position(|k| *k == module_kind(&r.name)))
        else {
            continue;
        };
        cells[l as usize][k].add(r);
    }
    let figs = cells.iter().map(|row| row.iter().map(Group::sum_figures).collect()).collect();
    (layers, figs)
}

/// The relative norm of a cell (pretrained, else base), else its norm.
fn size_of(f: &Figures) -> f64 {
    f.rel_norm_pretrained.or(f.rel_norm_base).unwrap_or(f.norm)
}

/// `-1 -> blue, 0 -> white, 1 -> red`.
fn diverging(x: f64) -> String {
    let x = x.clamp(-1.0, 1.0);
    let (r, g, b) = if x >= 0.0 {
        (255.0, 255.0 * (1.0 - x), 255.0 * (1.0 - x))
    } else {
        (255.0 * (1.0 + x), 255.0 * (1.0 + x), 255.0)
    };
    format!("rgb({},{},{})", r.round() as u8, g.round() as u8, b.round() as u8)
}

/// The SVG document for a report over `results`; `title` names the vector.
pub(crate) fn svg(results: &[TensorResult], title: &str, against: Option<&str>) -> String {
    let (layers, cells) = grid(results);
    let relative = results.iter().any(|r| r.present.pre || r.present.base);
    let (w, left, top, ch) = (960.0, 80.0, 60.0, 320.0);
    let pw = w - left - 150.0;
    let heat = against.is_some();
    let cell_h = if layers > 0 { (14.0f64).min(600.0 / layers as f64).max(3.0) } else { 14.0 };
    // The heatmap, or its colour legend (21 steps of 8 px), whichever is taller.
    let heat_h = if heat { 80.0 + (cell_h * layers as f64).max(180.0) } else { 0.0 };
    let h = top + ch + 70.0 + heat_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{left}" y="24" font-size="16">chat vector: {}</text>"#, xml(title));
    let what = if relative {
        "||v|| / ||W|| per layer and module (log scale)"
    } else {
        "||v|| per layer and module (log scale)"
    };
    let _ = writeln!(s, r##"<text x="{left}" y="44" fill="#555">{what}</text>"##);
    // Line chart: log10 of each kind's size across layers.
    let vals: Vec<f64> =
        cells.iter().flatten().flatten().map(size_of).filter(|v| *v > 0.0 && v.is_finite()).collect();
    let (lo, hi) = vals
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v.log10()), b.max(v.log10())));
    let (lo, hi) = if vals.is_empty() { (-4.0, 0.0) } else { (lo.floor(), hi.ceil().max(lo.floor() + 1.0)) };
    let y = |v: f64| top + ch - (v.log10() - lo) / (hi - lo) * ch;
    let x = |l: u64| left + if layers > 1 { l as f64 / (layers - 1) as f64 * pw } else { pw / 2.0 };
    let _ =
        writeln!(s, r##"<rect x="{left}" y="{top}" width="{pw}" height="{ch}" fill="none" stroke="#999"/>"##);
    let mut e = lo as i64;
    while e <= hi as i64 {
        let yy = top + ch - (e as f64 - lo) / (hi - lo) * ch;
        let label = if relative { format!("{}%", 10f64.powi(e as i32 + 2)) } else { format!("1e{e}") };
        let _ = writeln!(s, r##"<line x1="{left}" x2="{}" y1="{yy}" y2="{yy}" stroke="#eee"/>"##, left + pw);
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">{label}</text>"#, left - 6.0, yy + 4.0);
        e += 1;
    }
    let step = (layers / 16).max(1);
    for l in (0..layers).step_by(step as usize) {
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{l}</text>"#, x(l), top + ch + 16.0);
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">layer</text>"#,
        left + pw / 2.0,
        top + ch + 34.0
    );
    for (k, kind) in LAYER_KINDS.iter().enumerate() {
        let pts: Vec<String> = (0..layers)
            .filter_map(|l| {
                let v = size_of(cells[l as usize][k].as_ref()?);
                (v > 0.0 && v.is_finite()).then(|| format!("{:.1},{:.1}", x(l), y(v)))
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        let c = COLORS[k];
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="1.5"/>"#,
            pts.join(" ")
        );
        let ly = top + 14.0 + 18.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{kind}</text>"#,
            left + pw + 16.0,
            left + pw + 36.0,
            left + pw + 42.0,
            ly + 4.0
        );
    }
    if let Some(other) = against {
        let ht = top + ch + 70.0;
        let _ = writeln!(s, r#"<text x="{left}" y="{ht}" font-size="14">cosine with {}</text>"#, xml(other));
        let gy = ht + 16.0;
        let cw = (pw / LAYER_KINDS.len() as f64).min(70.0);
        for (k, kind) in LAYER_KINDS.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{kind}</text>"#,
                left + cw * (k as f64 + 0.5),
                gy + 10.0
            );
        }
        for l in 0..layers {
            let yy = gy + 16.0 + cell_h * l as f64;
            if l % step == 0 {
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{}" text-anchor="end">{l}</text>"#,
                    left - 6.0,
                    yy + cell_h * 0.8
                );
            }
            for k in 0..LAYER_KINDS.len() {
                let cos = cells[l as usize][k].as_ref().and_then(|f| f.cosine);
                let fill = cos.map_or("#ddd".to_string(), diverging);
                let tip = cos.map_or("no figure".to_string(), |c| format!("{c:.3}"));
                let _ = writeln!(
                    s,
                    r#"<rect x="{}" y="{yy}" width="{cw}" height="{cell_h}" fill="{fill}"><title>layer {l} {}: {tip}</title></rect>"#,
                    left + cw * k as f64,
                    LAYER_KINDS[k]
                );
            }
        }
        // Legend: -1 .. 1.
        let lx = left + cw * LAYER_KINDS.len() as f64 + 30.0;
        for i in 0..=20 {
            let v = 1.0 - i as f64 / 10.0;
            let _ = writeln!(
                s,
                r#"<rect x="{lx}" y="{}" width="16" height="8" fill="{}"/>"#,
                gy + 16.0 + 8.0 * i as f64,
                diverging(v)
            );
        }
        for (i, label) in [(0, "1"), (10, "0"), (20, "-1")] {
            let _ =
                writeln!(s, r#"<text x="{}" y="{}">{label}</text>"#, lx + 22.0, gy + 24.0 + 8.0 * i as f64);
        }
    }
    s.push_str("</svg>\n");
    s
}
