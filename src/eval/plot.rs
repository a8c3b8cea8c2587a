//! The picture of an evaluation (`--plot FILE`): assistant-token loss and
//! stop rate per model, each with its 95% interval as an error bar,
//! against the scale when every model is a chatvec output with a numeric
//! scale (a sweep), else in the order given. With benchmarks (`--bench`,
//! `--harness`), one panel per figure against the scale with its
//! intervals, then each judged benchmark's mean grade per category as
//! grouped bars. One self-contained SVG file.

use std::fmt::Write as _;

use super::EvalReport;
use crate::svg::xml;

/// The SVG document.
pub(crate) fn svg(r: &EvalReport) -> String {
    if !r.benchmarks.is_empty() {
        return bench_svg(r);
    }
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

/// Colours of successive series.
const COLORS: [&str; 8] =
    ["#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#9c755f"];

/// The models in plotting order (by scale when every one has a numeric
/// one), with their x positions and labels.
fn positions(r: &EvalReport) -> Vec<(&super::ModelEval, f64, String)> {
    let scale = |m: &super::ModelEval| m.scale.as_ref().and_then(|s| s.as_f64());
    let mut ms: Vec<_> = r.models.iter().collect();
    let numeric = ms.iter().all(|m| scale(m).is_some());
    if numeric {
        ms.sort_by(|a, b| scale(a).unwrap_or(0.0).total_cmp(&scale(b).unwrap_or(0.0)));
    }
    ms.into_iter()
        .enumerate()
        .map(|(i, m)| match (numeric, scale(m)) {
            (true, Some(v)) => (m, v, format!("{v}")),
            _ => (
                m,
                i as f64,
                xml(&m
                    .model
                    .chars()
                    .rev()
                    .take(18)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<String>()),
            ),
        })
        .collect()
}

/// One panel per benchmark figure (mean and 95% interval per model,
/// against the scale for a sweep), then per-category bars.
fn bench_svg(r: &EvalReport) -> String {
    let at = positions(r);
    let (w, left, pw, ph, gap) = (900.0, 70.0, 700.0, 180.0, 70.0);
    let cats: Vec<(usize, Vec<String>)> = r
        .benchmarks
        .iter()
        .enumerate()
        .filter_map(|(b, _)| {
            let c: Vec<String> = at.first()?.0.benchmarks.get(b)?.categories.keys().cloned().collect();
            (c.len() > 1).then_some((b, c))
        })
        .collect();
    let panels = r.benchmarks.len() + cats.len();
    let h = 40.0 + panels as f64 * (ph + gap);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let (x0, x1) =
        at.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, x, _)| (a.min(*x), b.max(*x)));
    let x = |v: f64| left + if at.len() > 1 && x1 > x0 { (v - x0) / (x1 - x0) * pw } else { pw / 2.0 };
    for (b, info) in r.benchmarks.iter().enumerate() {
        let top = 40.0 + b as f64 * (ph + gap);
        let figs: Vec<(f64, f64, f64, f64)> = at
            .iter()
            .filter_map(|(m, xv, _)| {
                let f = m.benchmarks.get(b)?;
                let iv = f.interval.unwrap_or(super::Interval { low: f.score, high: f.score });
                f.score.is_finite().then_some((*xv, f.score, iv.low, iv.high))
            })
            .collect();
        let lo = figs
            .iter()
            .map(|f| f.2)
            .fold(f64::INFINITY, f64::min)
            .min(info.top.map_or(f64::INFINITY, |_| 0.0));
        let hi = figs
            .iter()
            .map(|f| f.3)
            .fold(f64::NEG_INFINITY, f64::max)
            .max(info.top.unwrap_or(f64::NEG_INFINITY));
        let (lo, hi) = if lo.is_finite() && hi > lo { (lo, hi) } else { (0.0, 1.0) };
        let y = |v: f64| top + ph - (v - lo) / (hi - lo) * ph;
        let _ =
            writeln!(s, r#"<text x="{left}" y="{}" font-size="14">{}</text>"#, top - 8.0, xml(&info.name));
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
        );
        for i in 0..=4 {
            let v = lo + (hi - lo) * i as f64 / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{v:.2}</text>"##,
                left + pw,
                left - 6.0,
                y(v) + 4.0,
                yy = y(v)
            );
        }
        let color = COLORS[b % COLORS.len()];
        let pts: Vec<String> = figs.iter().map(|f| format!("{:.1},{:.1}", x(f.0), y(f.1))).collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            pts.join(" ")
        );
        for f in &figs {
            let _ = writeln!(
                s,
                r#"<line x1="{xx:.1}" x2="{xx:.1}" y1="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="1.5" opacity="0.6"/><circle cx="{xx:.1}" cy="{:.1}" r="4" fill="{color}"/>"#,
                y(f.2),
                y(f.3),
                y(f.1),
                xx = x(f.0)
            );
        }
        for (_, xv, label) in &at {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
                x(*xv),
                top + ph + 16.0
            );
        }
    }
    // Per category: a group of bars per category, one bar per model.
    for (k, (b, names)) in cats.iter().enumerate() {
        let top = 40.0 + (r.benchmarks.len() + k) as f64 * (ph + gap);
        let hi = r.benchmarks[*b].top.unwrap_or(10.0);
        let y = |v: f64| top + ph - v.clamp(0.0, hi) / hi * ph;
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{}" font-size="14">{} per category (mean grade; bars in the order of the panel above)</text>"#,
            top - 8.0,
            xml(&r.benchmarks[*b].name)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
        );
        let group = pw / names.len() as f64;
        let bw = (group * 0.8 / at.len().max(1) as f64).max(1.0);
        for (c, name) in names.iter().enumerate() {
            let gx = left + c as f64 * group + group * 0.1;
            for (i, (m, _, _)) in at.iter().enumerate() {
                let Some(v) = m.benchmarks.get(*b).and_then(|f| f.categories.get(name)) else { continue };
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="{}"/>"#,
                    gx + i as f64 * bw,
                    y(*v),
                    top + ph - y(*v),
                    COLORS[i % COLORS.len()]
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                gx + group * 0.4,
                top + ph + 16.0,
                xml(name)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A benchmark picture is well-formed XML with a panel per figure and
    /// a bar per model and category.
    #[test]
    fn a_benchmark_picture_has_a_panel_per_figure_and_bars_per_category() {
        let score = |s: f64| super::super::BenchScore {
            bench: "ja-mt-bench".into(),
            score: s,
            interval: Some(super::super::Interval { low: s - 1.0, high: s + 1.0 }),
            higher_is_better: true,
            categories: [("math".to_string(), s - 1.0), ("writing".to_string(), s + 1.0)]
                .into_iter()
                .collect(),
            turns: vec![s, s],
            grades: Vec::new(),
        };
        let model = |name: &str, scale: f64, s: f64| super::super::ModelEval {
            model: name.into(),
            path: name.into(),
            scale: Some(serde_json::json!(scale)),
            engine: "transformers".into(),
            assistant_loss: None,
            assistant_tokens: 0,
            stop_rate: 0.0,
            stop_with_answer_rate: 0.0,
            mean_answer_tokens: 0.0,
            language_match: None,
            assistant_loss_interval: None,
            stop_with_answer_interval: None,
            language_match_interval: None,
            lm_loss: None,
            lm_loss_interval: None,
            lm_loss_increase: None,
            keeps_language: None,
            benchmarks: vec![score(s)],
            tokens_per_second: None,
            pareto: None,
            answers: Vec::new(),
            rank: 1,
            tied_with: None,
        };
        let r = EvalReport {
            rule: "",
            lm_reference: None,
            none_acceptable: false,
            benchmarks: vec![super::super::BenchInfo {
                name: "ja-mt-bench".into(),
                files: Vec::new(),
                questions: 80,
                samples: Some(1),
                top: Some(10.0),
                kind: "judged",
                judge_model: Some("j".into()),
                judge_url: Some("http://127.0.0.1/v1".into()),
                engine: None,
            }],
            primary: Some(0),
            judge_requests: 0,
            models: vec![model("b<&>", 1.0, 6.0), model("a", 0.5, 5.0)],
            conversations: 0,
            prompts: 0,
            data: String::new(),
            samples: 0,
        };
        let text = svg(&r);
        let doc = roxmltree::Document::parse(&text).unwrap();
        let rects = doc.descendants().filter(|n| n.has_tag_name("rect")).count();
        // Background, two panel frames, 2 categories x 2 models.
        assert_eq!(rects, 1 + 2 + 4);
        let circles = doc.descendants().filter(|n| n.has_tag_name("circle")).count();
        assert_eq!(circles, 2);
        assert!(text.contains("ja-mt-bench per category"));
    }
}
