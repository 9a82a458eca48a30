//! The results: rows of the table, `results.md`, `results.json`'s machine
//! description, and the latency chart (plain SVG).

use runbridge_testkit::rabbitmqctl;
use serde_json::{Value, json};

use crate::cpu::PerOp;
use crate::measure::percentile;

/// One row of the results table.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Row {
    pub(crate) id: &'static str,
    pub(crate) scenario: String,
    pub(crate) runbridge: f64,
    pub(crate) baseline: Option<f64>,
    pub(crate) unit: &'static str,
    /// runbridge / baseline (or the absolute figure when there is no baseline).
    pub(crate) ratio: Option<f64>,
    pub(crate) target: String,
    pub(crate) met: bool,
    pub(crate) notes: String,
    /// CPU per operation by process, for runbridge's side and the
    /// baseline's (`cpu`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) cpu: Vec<(&'static str, PerOp)>,
}

/// Latency samples for the chart, in milliseconds.
#[derive(Default)]
pub(crate) struct Curves(pub(crate) Vec<(String, Vec<f64>)>);

pub(crate) fn machine() -> Value {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let rabbit = rabbitmqctl(None, &["version"])
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let redis = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .find_map(|w| w.strip_prefix("v=").map(str::to_owned))
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned))
        })
        .unwrap_or_default();
    json!({"cores": cores, "cpu": cpu, "rabbitmq": rabbit, "redis": redis})
}

pub(crate) fn fmt_num(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

pub(crate) fn markdown(rows: &[Row], m: &Value, date: &str) -> String {
    let mut s = format!(
        "Measured {date} on {} cores ({}), RabbitMQ {}, Redis {}.\n\n",
        m["cores"],
        m["cpu"].as_str().unwrap_or("?"),
        m["rabbitmq"].as_str().unwrap_or("?"),
        m["redis"].as_str().unwrap_or("?")
    );
    s.push_str("| id | scenario | runbridge | baseline | ratio | target | met |\n|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} {} | {} | {} | {} | {} |\n",
            r.id,
            r.scenario,
            fmt_num(r.runbridge),
            r.unit,
            r.baseline
                .map(|b| format!("{} {}", fmt_num(b), r.unit))
                .unwrap_or_else(|| "–".into()),
            r.ratio
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "–".into()),
            r.target,
            if r.met { "yes" } else { "**no**" },
        ));
    }
    let notes: Vec<String> = rows
        .iter()
        .filter(|r| !r.notes.is_empty())
        .map(|r| format!("- {}: {}", r.id, r.notes))
        .collect();
    if !notes.is_empty() {
        s.push('\n');
        s.push_str(&notes.join("\n"));
        s.push('\n');
    }
    let cpu: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.cpu
                .iter()
                .map(move |(side, per)| format!("| {} | {side} | {} |", r.id, per.describe()))
        })
        .collect();
    if !cpu.is_empty() {
        s.push_str("\nCPU per operation (user + system time from `/proc/<pid>/stat`, µs per trigger or settle):\n\n| id | side | CPU per operation, by process |\n|---|---|---|\n");
        s.push_str(&cpu.join("\n"));
        s.push('\n');
    }
    s
}

/// Cumulative distributions on a log-scale latency axis, as plain SVG.
pub(crate) fn svg(curves: &Curves) -> String {
    let (w, h, ml, mr, mt, mb) = (760.0, 420.0, 60.0, 20.0, 30.0, 110.0);
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let (lo, hi) = (0.05f64.log10(), 1000f64.log10());
    let x = |ms: f64| ml + ((ms.max(0.05).log10() - lo) / (hi - lo)).clamp(0.0, 1.0) * pw;
    let y = |q: f64| mt + (1.0 - q) * ph;
    let colors = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    ];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{ml}\" y=\"18\" font-size=\"14\">Latency distributions (cumulative), make bench</text>\n"
    );
    for ms in [0.1, 1.0, 10.0, 100.0, 1000.0] {
        let xx = x(ms);
        s.push_str(&format!(
            "<line x1=\"{xx:.1}\" y1=\"{mt}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{ms} ms</text>\n",
            mt + ph,
            mt + ph + 15.0
        ));
    }
    for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
        let yy = y(q);
        s.push_str(&format!(
            "<line x1=\"{ml}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{q}</text>\n",
            ml + pw,
            ml - 5.0,
            yy + 4.0
        ));
    }
    for (k, (name, data)) in curves.0.iter().enumerate() {
        let mut d = data.clone();
        d.sort_by(f64::total_cmp);
        if d.is_empty() {
            continue;
        }
        let step = (d.len() / 400).max(1);
        let pts: Vec<String> = d
            .iter()
            .enumerate()
            .step_by(step)
            .chain(std::iter::once((d.len() - 1, &d[d.len() - 1])))
            .map(|(i, v)| format!("{:.1},{:.1}", x(*v), y((i + 1) as f64 / d.len() as f64)))
            .collect();
        let c = colors[k % colors.len()];
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        ));
        let ly = mt + ph + 35.0 + 16.0 * k as f64;
        let sorted_p50 = percentile(&d, 0.5);
        let sorted_p99 = percentile(&d, 0.99);
        s.push_str(&format!(
            "<line x1=\"{ml}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{c}\" stroke-width=\"3\"/><text x=\"{:.1}\" y=\"{:.1}\">{} (p50 {:.2} ms, p99 {:.2} ms, n={})</text>\n",
            ly - 4.0,
            ml + 20.0,
            ly - 4.0,
            ml + 26.0,
            ly,
            xml_escape(name),
            sorted_p50,
            sorted_p99,
            d.len()
        ));
    }
    s.push_str("</svg>\n");
    s
}

pub(crate) fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
