//! The dashboard's HTML: one page, rendered here, whose small inline script polls
//! `/dashboard/data` and swaps in the `html` fragment it carries (rendered by the same
//! function as the first page), so there is one renderer and no front-end build.
//!
//! Every string that comes from the mesh (workload, service, policy and proxy names,
//! errors) goes through [`escape`], in text and in attributes alike: a hostile label must
//! show as text, never become markup or script. The fragment is assigned with
//! `innerHTML`, which never runs scripts, and only ever holds what this module escaped.

use std::fmt::Write as _;

use super::view::{Edge, View};

/// `s` with the five characters that matter in HTML text and quoted attributes escaped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}\
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:90%}\
th{background:#f2f2f2}.bad{color:#b00020}.ok{color:#1b7f1b}\
svg{border:1px solid #ddd;background:#fcfcfc}.muted{color:#777}";

/// How often the page asks for fresh data, in milliseconds.
pub const POLL_MS: u64 = 2000;

/// The whole page, with `view` rendered in it.
pub fn page(view: &View) -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Ambit dashboard</title>\
         <style>{STYLE}</style></head><body><h1>Ambit mesh</h1>\
         <p class=\"muted\">Live from the proxies' metrics, scraped by the controller; \
         refreshed every {secs} s (<a href=\"/dashboard/data\">JSON</a>). \
         <span id=\"status\"></span></p>\
         <div id=\"view\">{body}</div>\
         <script>\nconst POLL={POLL_MS};{SCRIPT}\n</script></body></html>\n",
        secs = POLL_MS / 1000,
        body = fragment(view),
    )
}

/// Polls the data endpoint and swaps in the server-rendered fragment.
const SCRIPT: &str = "(function(){\
const view=document.getElementById('view'),status=document.getElementById('status');\
async function poll(){\
try{const r=await fetch('/dashboard/data',{cache:'no-store'});\
if(!r.ok)throw new Error('HTTP '+r.status);\
const d=await r.json();view.innerHTML=d.html;\
status.textContent='updated '+new Date().toLocaleTimeString();status.className='';}\
catch(e){status.textContent='cannot reach the controller: '+e.message;status.className='bad';}\
setTimeout(poll,POLL);}\
setTimeout(poll,POLL);})();";

/// The part of the page that changes: graph, edges, denials, proxies.
pub fn fragment(view: &View) -> String {
    let mut out = String::new();
    out.push_str("<h2>Traffic</h2>");
    graph(&mut out, view);
    edges_table(&mut out, &view.edges);
    denials_table(&mut out, view);
    proxies_table(&mut out, view);
    out
}

fn rate(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.2}")
    }
}

fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{:.1}%", v * 100.0))
}

fn millis(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"))
}

fn bytes(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{:.1} MB/s", v / 1e6),
        v if v >= 1e3 => format!("{:.1} kB/s", v / 1e3),
        v => format!("{v:.0} B/s"),
    }
}

fn security(e: &Edge) -> &'static str {
    match (e.mtls, e.plaintext) {
        (true, false) => "mTLS",
        (true, true) => "mixed",
        (false, _) => "plaintext",
    }
}

fn unit(e: &Edge) -> &'static str {
    if e.protocol == "http" {
        "req/s"
    } else {
        "conn/s"
    }
}

/// Workloads on a circle, edges as arrows labelled with their rate and success rate.
fn graph(out: &mut String, view: &View) {
    const W: f64 = 760.0;
    const H: f64 = 420.0;
    let n = view.workloads.len().max(1) as f64;
    let pos = |name: &str| {
        let i = view.workloads.iter().position(|w| w == name).unwrap_or(0) as f64;
        let angle = std::f64::consts::TAU * i / n - std::f64::consts::FRAC_PI_2;
        (
            W / 2.0 + 150.0 * angle.cos() * 1.6,
            H / 2.0 + 150.0 * angle.sin(),
        )
    };
    let _ = write!(
        out,
        "<svg id=\"graph\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         xmlns=\"http://www.w3.org/2000/svg\"><defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" \
         refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\">\
         <path d=\"M0,0L10,5L0,10z\" fill=\"#555\"/></marker></defs>"
    );
    if view.edges.is_empty() {
        let _ = write!(
            out,
            "<text x=\"20\" y=\"30\" class=\"muted\">No traffic seen yet (rates need two scrapes of a proxy).</text>"
        );
    }
    for e in &view.edges {
        let ((x1, y1), (x2, y2)) = (pos(&e.source), pos(&e.destination));
        // Stop short of the node circles; offset the label so both directions stay readable.
        let (dx, dy) = (x2 - x1, y2 - y1);
        let len = (dx * dx + dy * dy).sqrt().max(1.0);
        let (ux, uy) = (dx / len, dy / len);
        let (sx, sy, ex, ey) = (
            x1 + ux * 24.0,
            y1 + uy * 24.0,
            x2 - ux * 24.0,
            y2 - uy * 24.0,
        );
        let healthy = e.success_rate.is_none_or(|s| s >= 0.99);
        let color = if healthy { "#1b7f1b" } else { "#b00020" };
        let dash = if e.mtls {
            ""
        } else {
            " stroke-dasharray=\"6 4\""
        };
        // The label beside the arrow's middle: to its right when the arrow is steep.
        let (mx, my) = ((sx + ex) / 2.0, (sy + ey) / 2.0);
        let (lx, ly, anchor) = if uy.abs() > ux.abs() {
            (mx + 10.0, my, "start")
        } else {
            (mx, my - 8.0, "middle")
        };
        let via = match e.services.first() {
            Some(s) => format!(" via {}", escape(s)),
            None => String::new(),
        };
        let _ = write!(
            out,
            "<g class=\"edge\" data-source=\"{src}\" data-destination=\"{dst}\" data-rate=\"{r}\">\
             <line x1=\"{sx:.1}\" y1=\"{sy:.1}\" x2=\"{ex:.1}\" y2=\"{ey:.1}\" stroke=\"{color}\" \
             stroke-width=\"2\"{dash} marker-end=\"url(#arrow)\"/>\
             <text x=\"{lx:.1}\" y=\"{ly:.1}\" font-size=\"11\" text-anchor=\"{anchor}\">{r} {u} · {ok} · {sec}{via}</text></g>",
            src = escape(&e.source),
            dst = escape(&e.destination),
            r = rate(e.rate),
            u = unit(e),
            ok = percent(e.success_rate),
            sec = security(e),
        );
    }
    for w in &view.workloads {
        let (x, y) = pos(w);
        let _ = write!(
            out,
            "<g class=\"workload\"><circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"20\" fill=\"#e8f0fe\" \
             stroke=\"#4a6fa5\"/><text x=\"{x:.1}\" y=\"{ty:.1}\" font-size=\"12\" \
             text-anchor=\"middle\">{name}</text></g>",
            ty = y + 36.0,
            name = escape(w),
        );
    }
    out.push_str("</svg>");
}

fn edges_table(out: &mut String, edges: &[Edge]) {
    out.push_str(
        "<table id=\"edges\"><tr><th>from</th><th>to</th><th>service</th><th>protocol</th>\
         <th>rate</th><th>success</th><th>p50</th><th>p99</th><th>bytes</th><th>security</th>\
         <th>reported by</th></tr>",
    );
    for e in edges {
        let _ = write!(
            out,
            "<tr class=\"edge\" data-rate=\"{r}\"><td>{src}</td><td>{dst}</td><td>{svc}</td>\
             <td>{proto}</td><td>{r} {u}</td><td>{ok}</td><td>{p50}</td><td>{p99}</td>\
             <td>{b}</td><td>{sec}</td><td>{rep}</td></tr>",
            r = rate(e.rate),
            src = escape(&e.source),
            dst = escape(&e.destination),
            svc = escape(&e.services.join(", ")),
            proto = e.protocol,
            u = unit(e),
            ok = percent(e.success_rate),
            p50 = millis(e.p50_ms),
            p99 = millis(e.p99_ms),
            b = bytes(e.bytes_per_second),
            sec = security(e),
            rep = escape(&e.reporter),
        );
    }
    out.push_str("</table>");
}

fn ago(now: f64, at: f64) -> String {
    let s = (now - at).max(0.0);
    if s < 120.0 {
        format!("{s:.0} s ago")
    } else {
        format!("{:.0} min ago", s / 60.0)
    }
}

fn denials_table(out: &mut String, view: &View) {
    out.push_str("<h2>Recent denials</h2>");
    if view.denials.is_empty() {
        out.push_str(
            "<p id=\"no-denials\" class=\"muted\">No connection denied by a policy lately.</p>",
        );
        return;
    }
    out.push_str(
        "<table id=\"denials\"><tr><th>policy</th><th>from</th><th>to</th><th>count</th>\
         <th>last seen</th><th>denied by</th></tr>",
    );
    for d in &view.denials {
        let _ = write!(
            out,
            "<tr class=\"denial\" data-policy=\"{p}\"><td>{p}</td><td>{src}</td><td>{dst}</td>\
             <td>{n:.0}</td><td>{seen}</td><td>{proxy}</td></tr>",
            p = escape(&d.policy),
            src = escape(&d.source),
            dst = escape(&d.destination),
            n = d.count,
            seen = ago(view.generated_at, d.last_seen),
            proxy = escape(&d.proxy),
        );
    }
    out.push_str("</table>");
}

fn certs(n: usize) -> String {
    if n == 1 {
        "1 cert".to_owned()
    } else {
        format!("{n} certs")
    }
}

fn expiry(now: f64, at: Option<f64>, count: usize) -> String {
    match at {
        None => "-".to_owned(),
        Some(at) if at <= now => format!("<span class=\"bad\">expired</span> ({})", certs(count)),
        Some(at) => {
            let left = at - now;
            let (h, m) = ((left / 3600.0).floor(), ((left % 3600.0) / 60.0).floor());
            let class = if left < 3600.0 { "bad" } else { "ok" };
            format!(
                "<span class=\"{class}\">in {h:.0} h {m:.0} min</span> ({})",
                certs(count)
            )
        }
    }
}

fn proxies_table(out: &mut String, view: &View) {
    out.push_str(
        "<h2>Proxies</h2><table id=\"proxies\"><tr><th>proxy</th><th>kind</th><th>metrics</th>\
         <th>health</th><th>discovery</th><th>first certificate expiry</th><th>scraped</th></tr>",
    );
    for p in &view.proxies {
        let _ = write!(
            out,
            "<tr class=\"proxy\"><td>{name}</td><td>{kind}</td><td>{addr}</td>\
             <td class=\"{class}\">{status}</td><td>{xds}</td><td>{exp}</td><td>{seen}</td></tr>",
            name = escape(&p.proxy),
            kind = p.kind,
            addr = escape(p.metrics_addr.as_deref().unwrap_or("-")),
            class = if p.healthy { "ok" } else { "bad" },
            status = escape(&p.status),
            xds = match p.xds_connected {
                Some(true) => "connected",
                Some(false) => "down",
                None => "-",
            },
            exp = expiry(view.generated_at, p.cert_expiry, p.certificates),
            seen = p
                .last_scrape
                .map_or_else(|| "never".to_owned(), |at| ago(view.generated_at, at)),
        );
    }
    out.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dashboard::view::{Denial, ProxyHealth};

    #[test]
    fn hostile_names_are_text_never_markup() {
        let evil = "<script>alert(1)</script>\"' onmouseover=\"x";
        let view = View {
            generated_at: 100.0,
            workloads: vec![evil.to_owned(), "demo/echo".to_owned()],
            edges: vec![Edge {
                source: evil.to_owned(),
                destination: "demo/echo".to_owned(),
                services: vec![evil.to_owned()],
                protocol: "tcp",
                rate: 1.0,
                success_rate: Some(1.0),
                p50_ms: None,
                p99_ms: None,
                bytes_per_second: 0.0,
                mtls: true,
                plaintext: false,
                reporter: evil.to_owned(),
            }],
            denials: vec![Denial {
                policy: evil.to_owned(),
                source: evil.to_owned(),
                destination: evil.to_owned(),
                count: 1.0,
                last_seen: 99.0,
                proxy: evil.to_owned(),
            }],
            proxies: vec![ProxyHealth {
                proxy: evil.to_owned(),
                kind: "ztunnel",
                metrics_addr: None,
                healthy: false,
                status: evil.to_owned(),
                last_scrape: None,
                xds_connected: None,
                cert_expiry: Some(100.0 + 7200.0),
                certificates: 1,
            }],
        };
        let html = page(&view);
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("\" onmouseover"), "{html}");
        assert!(!html.contains("' onmouseover"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39; onmouseover=&quot;x")
        );
        // The page's own script is the only one.
        assert_eq!(html.matches("<script>").count(), 1);
        assert!(html.contains("in 2 h 0 min"), "{html}");
    }

    #[test]
    fn an_empty_mesh_says_so() {
        let view = View {
            generated_at: 0.0,
            workloads: vec![],
            edges: vec![],
            denials: vec![],
            proxies: vec![],
        };
        let html = fragment(&view);
        assert!(html.contains("No traffic seen yet"));
        assert!(html.contains("id=\"no-denials\""));
    }
}
