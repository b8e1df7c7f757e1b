//! The controller's built-in dashboard in a real browser: the local mesh with its sample
//! traffic (`ambitctl up`), `ambitctl dashboard` forwarding the controller's operations port
//! to the host's loopback, and Debian's chromium driven through chromedriver (WebDriver) by
//! fantoccini. Asserts what an operator sees on the page: the sample's edge with a non-zero
//! rate over mTLS, both ztunnels healthy with their certificates' expiry, and, after a DENY
//! policy is applied with `ambitctl apply`, a denial naming that policy. Saves a screenshot
//! under the target dir and prints its path.
//!
//! Needs root (the local mesh) and `chromium` + `chromium-driver` (scripts/test.sh installs
//! them); under `CI=true` a missing browser fails the test instead of skipping it. Run it
//! under `flock /tmp/ambit-localmesh.lock`: the local mesh's addresses are fixed.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambit_tests::local_mesh::{ambitctl, bin_dir, tempfile_dir, wait_for, Mesh};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Kills and reaps a child process when dropped (also when the test panics).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether the browser is installed; under CI a missing one is a failure.
fn require_browser() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).is_file())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why =
        format!("the dashboard test needs {missing:?} (apt-get install chromium chromium-driver)");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "{why}; CI=true, so this is a failure, not a skip");
    eprintln!("SKIPPED {why}");
    false
}

/// `ambitctl dashboard` on a free loopback port; returns it and the URL it printed.
fn start_forward(state_dir: &Path) -> (Killed, String) {
    let mut child = Command::new(bin_dir().join("ambitctl"))
        .args(["dashboard", "--port", "0", "--state-dir"])
        .arg(state_dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run ambitctl dashboard");
    let stdout = child.stdout.take().expect("its stdout");
    let child = Killed(child);
    let mut url = String::new();
    let mut reader = BufReader::new(stdout);
    reader.read_line(&mut url).expect("the URL line");
    // Keep reading, so the pipe stays open for as long as it runs.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let url = url.trim().to_owned();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/dashboard"),
        "ambitctl dashboard printed {url:?}"
    );
    (child, url)
}

fn start_chromedriver(port: u16) -> Killed {
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run chromedriver");
    let child = Killed(child);
    wait_for(
        20,
        "chromedriver to listen",
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        String::new,
    );
    child
}

/// The rows of the page's table `selector`: each row's data attributes and text, read in
/// one script so a refresh of the page cannot interleave.
async fn rows(browser: &fantoccini::Client, selector: &str) -> Vec<Value> {
    let script = "return Array.from(document.querySelectorAll(arguments[0]))\
                  .map(r => ({data: Object.assign({}, r.dataset), text: r.innerText}));";
    match browser.execute(script, vec![json!(selector)]).await {
        Ok(Value::Array(rows)) => rows,
        _ => Vec::new(),
    }
}

/// Polls `rows(selector)` until one satisfies `want`, for at most `secs`.
async fn wait_row(
    browser: &fantoccini::Client,
    selector: &str,
    secs: u64,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = rows(browser, selector).await;
        if let Some(row) = got.iter().find(|r| want(r)) {
            return row.clone();
        }
        if Instant::now() > deadline {
            let page = browser.source().await.unwrap_or_default();
            panic!("{what}: not on the page within {secs}s; rows {got:?}\npage:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn screenshot_path() -> PathBuf {
    // target/debug -> target/dashboard/
    let dir = bin_dir()
        .parent()
        .map(|t| t.join("dashboard"))
        .expect("the target dir");
    std::fs::create_dir_all(&dir).expect("create target/dashboard");
    dir.join("dashboard.png")
}

#[tokio::test(flavor = "current_thread")]
async fn the_dashboard_shows_the_sample_mesh_and_a_denial_naming_its_policy() {
    if !require_browser() {
        return;
    }
    let Some(mesh) = Mesh::up("dashboard", "dash", "1") else {
        return;
    };
    // 2 nodes x 1 pod: demo/client-1 on node2 calls demo/echo-1 on node1 every second.
    wait_for(
        40,
        "the sample client to get replies",
        || mesh.client_log().contains("hello from demo/echo-1"),
        || mesh.client_log(),
    );
    let (_forward, url) = start_forward(&mesh.state_dir);
    let port = ambit_testing::net::free_port().expect("a free port on loopback");
    let _driver = start_chromedriver(port);
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1500"],
        }),
    );
    let browser =
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a chromium session through chromedriver");
    browser.goto(&url).await.expect("open the dashboard");

    // The sample's edge, with a non-zero rate, over mTLS (rates need two scrapes: ~2 s).
    let edge = wait_row(
        &browser,
        "tr.edge",
        30,
        "the demo/client -> demo/echo edge",
        |r| {
            let text = r["text"].as_str().unwrap_or_default();
            let rate: f64 = r["data"]["rate"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0);
            text.contains("demo/client") && text.contains("demo/echo") && rate > 0.0
        },
    )
    .await;
    let text = edge["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("mTLS") && text.contains("conn/s") && text.contains("100.0%"),
        "{edge}"
    );
    // The graph draws it too.
    let arrows = rows(&browser, "g.edge").await;
    assert!(
        arrows.iter().any(|g| {
            let end = |k: &str| g["data"][k].as_str().unwrap_or_default().to_owned();
            end("source").starts_with("demo/client") && end("destination").starts_with("demo/echo")
        }),
        "{arrows:?}"
    );
    // Both ztunnels, healthy, with their certificates' expiry.
    for node in ["node1", "node2"] {
        wait_row(
            &browser,
            "tr.proxy",
            10,
            &format!("{node}'s ztunnel, healthy"),
            |r| {
                let text = r["text"].as_str().unwrap_or_default();
                text.contains(&format!("ztunnel node={node}"))
                    && text.contains("ok")
                    && text.contains("connected")
                    && text.contains(" cert")
            },
        )
        .await;
    }

    // A DENY policy through `ambitctl apply`: the denial appears, naming it.
    let dir = tempfile_dir("dashboard");
    let file = dir.join("deny-client.yaml");
    std::fs::write(
        &file,
        "apiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: demo}\nspec:\n  selector: {matchLabels: {app: echo}}\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]\n",
    )
    .expect("write the policy");
    let out = ambitctl(&[
        "apply",
        "-f",
        &file.display().to_string(),
        "--state-dir",
        &mesh.state_dir.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let denial = wait_row(
        &browser,
        "tr.denial",
        30,
        "a denial by demo/deny-client",
        |r| r["data"]["policy"] == "demo/deny-client",
    )
    .await;
    let text = denial["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("demo/client")
            && text.contains("demo/echo")
            && text.contains("ztunnel node=node1"),
        "{denial}"
    );
    // The edge now shows failures.
    wait_row(
        &browser,
        "tr.edge",
        20,
        "the edge's success rate below 100%",
        |r| {
            let text = r["text"].as_str().unwrap_or_default();
            text.contains("demo/client") && text.contains("demo/echo") && !text.contains("100.0%")
        },
    )
    .await;

    let png = browser.screenshot().await.expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let path = screenshot_path();
    std::fs::write(&path, &png).expect("save the screenshot");
    eprintln!("dashboard screenshot: {}", path.display());
    let _ = browser.close().await;
    let _ = std::fs::remove_dir_all(dir);
}
