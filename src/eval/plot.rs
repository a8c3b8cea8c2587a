//! The picture of an evaluation (`--plot FILE`): assistant-token loss and
//! stop rate per model, each with its 95% interval as an error bar,
//! against the scale when every model is a chatvec output with a numeric
//! scale (a sweep), else in the order given. One self-contained SVG file.

use std::fmt::Write as _;

use super::EvalReport;
use crate::svg::xml;

/// The SVG document.
pub(crate) fn svg(r: &EvalReport) -> String {
    // In the order given: by scale when all have a numeric one.
    let mut ms: Vec<_> = r.models.iter().collect();
    let scales: Option<Vec<f64>> = ms.iter().map(|m| m.scale.as_ref().and_then(|s| s.as_f64())).collect();
    if scales.is_some() {
        ms.sort_by(|a, b| {
            let f = |m: &super::ModelEval| m.scale.as_ref().and_then(|s| s.as_f64()).unwrap_or(0.0);
            f(a).total_cmp(&f(b))
        });
    }
    let xs: Vec<f64> = match &scales {
        Some(_) => ms.iter().map(|m| m.scale.as_ref().and_then(|s| s.as_f64()).unwrap_or(0.0)).collect(),
        None => (0..ms.len()).map(|i| i as f64).collect(),
    };
    let (w, h, left, top, pw, ph) = (900.0, 420.0, 70.0, 50.0, 700.0, 300.0);
    let (x0, x1) = xs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(*x), b.max(*x)));
    let span = if x1 > x0 { x1 - x0 } else { 1.0 };
    let x = |v: f64| left + if xs.len() > 1 { (v - x0) / span * pw } else { pw / 2.0 };
    // The axis holds the intervals' tops too.
    let losses: Vec<f64> =
        ms.iter().filter_map(|m| m.assistant_loss_interval.map(|i| i.high).or(m.assistant_loss)).collect();
    let lmax = losses.iter().cloned().fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let yl = |v: f64| top + ph - v / lmax * ph;
    let ys = |v: f64| top + ph - v * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ =
        writeln!(s, r#"<text x="{left}" y="24" font-size="16">assistant-token loss and stop rate</text>"#);
    let _ =
        writeln!(s, r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##);
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let yy = top + ph - f * ph;
        let _ = writeln!(s, r##"<line x1="{left}" x2="{}" y1="{yy}" y2="{yy}" stroke="#eee"/>"##, left + pw);
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end" fill="#4e79a7">{:.2}</text>"##,
            left - 6.0,
            yy + 4.0,
            f * lmax
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" fill="#e15759">{:.0}%</text>"##,
            left + pw + 6.0,
            yy + 4.0,
            f * 100.0
        );
    }
    for (m, &xv) in ms.iter().zip(&xs) {
        let label = match &scales {
            Some(_) => format!("{xv}"),
            None => {
                xml(&m.model.chars().rev().take(18).collect::<Vec<_>>().into_iter().rev().collect::<String>())
            }
        };
        let _ =
            writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{label}</text>"#, x(xv), top + ph + 16.0);
    }
    let xlabel = if scales.is_some() { "scale" } else { "model" };
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{xlabel}</text>"#,
        left + pw / 2.0,
        top + ph + 36.0
    );
    let line = |pts: Vec<(f64, f64)>, color: &str, s: &mut String| {
        let p: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            p.join(" ")
        );
        for (a, b) in &pts {
            let _ = writeln!(s, r#"<circle cx="{a:.1}" cy="{b:.1}" r="4" fill="{color}"/>"#);
        }
    };
    // 95% intervals as vertical bars behind the points.
    let bar = |x: f64, lo: f64, hi: f64, color: &str, s: &mut String| {
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" x2="{x:.1}" y1="{lo:.1}" y2="{hi:.1}" stroke="{color}" stroke-width="1.5" opacity="0.6"/>"#
        );
    };
    for (m, &xv) in ms.iter().zip(&xs) {
        if let Some(i) = m.assistant_loss_interval {
            bar(x(xv), yl(i.low), yl(i.high), "#4e79a7", &mut s);
        }
        if let Some(i) = m.stop_with_answer_interval {
            bar(x(xv) + 3.0, ys(i.low), ys(i.high), "#e15759", &mut s);
        }
    }
    let loss_pts: Vec<(f64, f64)> =
        ms.iter().zip(&xs).filter_map(|(m, &xv)| m.assistant_loss.map(|l| (x(xv), yl(l)))).collect();
    line(loss_pts, "#4e79a7", &mut s);
    let stop_pts: Vec<(f64, f64)> =
        ms.iter().zip(&xs).map(|(m, &xv)| (x(xv), ys(m.stop_with_answer_rate))).collect();
    line(stop_pts, "#e15759", &mut s);
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="{}" fill="#4e79a7">- assistant-token loss (left)</text><text x="{}" y="{}" fill="#e15759">- stops with an answer (right)</text><text x="{}" y="{}" fill="#666">bars: 95% intervals</text>"##,
        h - 12.0,
        left + 260.0,
        h - 12.0,
        left + 520.0,
        h - 12.0
    );
    s.push_str("</svg>\n");
    s
}
