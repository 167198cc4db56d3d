//! The demo's outputs for a person: `summary.json`, a loss-curve SVG and a
//! static `index.html` that shows the inputs, the reconstructions, the
//! generated grid, the curves and the metrics. Everything is relative to
//! the output folder, so the folder can be moved or served as is.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::FileError;

/// One loss curve: a name and `(step, value)` points.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Curve {
    /// Legend text.
    pub name: String,
    /// `(step, loss)` in step order.
    pub points: Vec<(f64, f64)>,
}

impl Curve {
    /// The `key` values of a `log.jsonl` (one JSON object a line; lines
    /// without a finite `key` are skipped).
    pub fn from_log(name: &str, log: &Path, key: &str) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(log).map_err(|e| FileError::io(log, e))?;
        let points = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v["step"].as_f64()?, v[key].as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect();
        Ok(Self {
            name: name.to_string(),
            points,
        })
    }
}

const PANEL_W: f64 = 420.0;
const PANEL_H: f64 = 240.0;
const MARGIN: f64 = 48.0;

/// One panel per curve, side by side: a polyline on a log-y axis (losses
/// fall over decades) with the first/last step and the min/max loss marked.
pub fn loss_svg(curves: &[Curve]) -> String {
    let w = PANEL_W * curves.len().max(1) as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{PANEL_H}" viewBox="0 0 {w} {PANEL_H}" font-family="sans-serif" font-size="11">"##
    );
    let _ = write!(s, r##"<rect width="{w}" height="{PANEL_H}" fill="#fff"/>"##);
    for (k, c) in curves.iter().enumerate() {
        panel(&mut s, k as f64 * PANEL_W, c);
    }
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, x0: f64, c: &Curve) {
    let (pw, ph) = (PANEL_W - 1.5 * MARGIN, PANEL_H - 2.0 * MARGIN);
    let (left, top) = (x0 + MARGIN, MARGIN);
    let _ = write!(
        s,
        r##"<text x="{}" y="{}" font-size="13" font-weight="bold">{}</text><rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##,
        left,
        top - 12.0,
        escape(&c.name)
    );
    let pos: Vec<(f64, f64)> = c.points.iter().copied().filter(|p| p.1 > 0.0).collect();
    if pos.len() < 2 {
        let _ = write!(
            s,
            r##"<text x="{}" y="{}">no data</text>"##,
            left + 8.0,
            top + 20.0
        );
        return;
    }
    let (sx0, sx1) = (pos[0].0, pos[pos.len() - 1].0);
    let (lo, hi) = pos
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (ly0, ly1) = (lo.log10(), hi.log10().max(lo.log10() + 1e-9));
    let px = |x: f64| left + (x - sx0) / (sx1 - sx0).max(1e-9) * pw;
    let py = |y: f64| top + ph - (y.log10() - ly0) / (ly1 - ly0) * ph;
    let pts: Vec<String> = pos
        .iter()
        .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
        .collect();
    let _ = write!(
        s,
        r##"<polyline fill="none" stroke="#1f5fbf" stroke-width="1.5" points="{}"/>"##,
        pts.join(" ")
    );
    let bottom = top + ph;
    let _ = write!(
        s,
        r##"<text x="{left}" y="{}">{sx0}</text><text x="{}" y="{}" text-anchor="end">step {sx1}</text><text x="{}" y="{}" text-anchor="end">{hi:.3}</text><text x="{}" y="{bottom}" text-anchor="end">{lo:.3}</text>"##,
        bottom + 14.0,
        left + pw,
        bottom + 14.0,
        left - 4.0,
        top + 10.0,
        left - 4.0,
    );
}

/// `&`, `<`, `>` and `"` as entities, for text placed in HTML or SVG.
pub fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// What the page shows: image files (relative to the page), the metrics
/// table rows and the commands that made them.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Title line.
    pub title: String,
    /// Notes shown under the title (e.g. that the encoder is random).
    pub notes: Vec<String>,
    /// `(heading, caption, relative image path)` in display order.
    pub figures: Vec<(String, String, String)>,
    /// `(metric, value)` rows.
    pub metrics: Vec<(String, String)>,
    /// The stages' command lines, to rerun any stage by hand.
    pub commands: Vec<String>,
}

/// The page, with a script that marks `<body data-images="LOADED/TOTAL">`
/// once every image has loaded or failed (what the browser test reads).
pub fn index_html(p: &Page) -> String {
    let mut s = String::from("<!doctype html>\n<html><head><meta charset=\"utf-8\">");
    let _ = write!(s, "<title>{}</title>", escape(&p.title));
    s.push_str(
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}\
         img{image-rendering:pixelated;border:1px solid #ccc;max-width:100%}img.px{width:min(100%,640px)}\
         table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}\
         pre{background:#f4f4f4;padding:8px;overflow-x:auto;font-size:12px}</style></head>\n<body>\n",
    );
    let _ = writeln!(s, "<h1>{}</h1>", escape(&p.title));
    for n in &p.notes {
        let _ = writeln!(s, "<p>{}</p>", escape(n));
    }
    for (heading, caption, src) in &p.figures {
        let _ = writeln!(
            s,
            "<h2>{}</h2><p>{}</p><img{} src=\"{}\" alt=\"{}\">",
            escape(heading),
            escape(caption),
            // raster images are small: show them enlarged, pixels kept sharp
            if src.ends_with(".png") {
                " class=\"px\""
            } else {
                ""
            },
            escape(src),
            escape(heading)
        );
    }
    s.push_str("<h2>Metrics</h2><table>\n");
    for (k, v) in &p.metrics {
        let _ = writeln!(s, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
    }
    s.push_str("</table>\n<h2>Commands</h2><p>Each stage is an ordinary subcommand; rerun any of them by hand:</p><pre>");
    for c in &p.commands {
        let _ = writeln!(s, "{}", escape(c));
    }
    s.push_str(
        "</pre>\n<script>\n\
         const imgs=[...document.images];let done=0,ok=0;\n\
         const mark=()=>{document.body.dataset.images=ok+'/'+imgs.length;};\n\
         imgs.forEach(i=>{const f=()=>{done++;if(i.naturalWidth>0)ok++;mark();};\
         if(i.complete){f();}else{i.addEventListener('load',f);i.addEventListener('error',f);}});\n\
         mark();\n</script>\n</body></html>\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_one_polyline_per_curve_with_data() {
        let c = |n: &str, k: usize| Curve {
            name: n.into(),
            points: (1..=k).map(|i| (i as f64, 1.0 / i as f64)).collect(),
        };
        let svg = loss_svg(&[c("a", 10), c("b<", 1)]);
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("b&lt;") && svg.contains("no data"));
    }

    #[test]
    fn page_escapes_and_lists_every_figure() {
        let page = Page {
            title: "t".into(),
            figures: vec![("a".into(), "x<y".into(), "a.png".into())],
            metrics: vec![("m".into(), "1".into())],
            ..Default::default()
        };
        let html = index_html(&page);
        assert!(html.contains("src=\"a.png\"") && html.contains("x&lt;y"));
        assert!(html.contains("data"));
    }
}
