//! The viewer page at `GET /` in a real browser: Debian's headless Chromium driven over WebDriver
//! (chromedriver) against the built `fastrm serve`. The test picks the bundled scene, asks about
//! the star, waits for the streamed answer (its first token is then selected) and reads the overlay canvas back:
//! every cell must be drawn in the PNG overlays' colour for the map `fastrm explain --json` gives,
//! brightest where that map peaks.
//!
//! The test is ignored by a plain `cargo test` (its reason names what it needs): `.ci/run`
//! installs the browser and runs it with `--ignored`, where a missing browser is a failure.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

const QUESTION: &str = "What color is the star?";
/// The W3C name of an element reference in WebDriver responses.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Chromium's flags for this sandbox: no GPU, no setuid sandbox (tests may run as root), and none
/// of its background connections, which the closed network refuses.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
];

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// chromedriver and the browser binary, from `FASTRM_CHROMEDRIVER` / `FASTRM_CHROMIUM` or PATH.
fn browser() -> std::result::Result<(PathBuf, PathBuf), String> {
    let pick = |var: &str, names: &[&str]| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| names.iter().find_map(|n| on_path(n)))
    };
    let driver = pick("FASTRM_CHROMEDRIVER", &["chromedriver"]);
    let chromium = pick(
        "FASTRM_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    match (driver, chromium) {
        (Some(d), Some(c)) => Ok((d, c)),
        (d, c) => Err(format!(
            "missing {}{}{} (Debian: apt-get install chromium chromium-driver)",
            if d.is_none() { "chromedriver" } else { "" },
            if d.is_none() && c.is_none() {
                " and "
            } else {
                ""
            },
            if c.is_none() { "chromium" } else { "" },
        )),
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(extra: &[&str]) -> (Proc, SocketAddr) {
    let (child, addr) = common::spawn_server(extra);
    (Proc(child), addr)
}

/// One HTTP/1.1 exchange with a JSON body (or none); the response's status and JSON.
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let code: u16 = status
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line {status:?}"));
    let mut chunked = false;
    let mut length = None;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end().to_ascii_lowercase();
        if h.is_empty() {
            break;
        }
        chunked |= h.starts_with("transfer-encoding:") && h.contains("chunked");
        if let Some(n) = h.strip_prefix("content-length:") {
            length = n.trim().parse::<usize>().ok();
        }
    }
    let mut raw = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
    } else if let Some(n) = length {
        // chromedriver keeps the connection open whatever the request asks: read only the body.
        raw.resize(n, 0);
        r.read_exact(&mut raw).unwrap();
    } else {
        r.read_to_end(&mut raw).unwrap();
    }
    let v = if raw.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&raw)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {}", String::from_utf8_lossy(&raw)))
    };
    (code, v)
}

/// A chromedriver process and one browser session in it, both ended on drop.
struct Browser {
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
    _driver: Proc,
}

impl Browser {
    fn start(driver: &Path, chromium: &Path) -> Browser {
        // chromedriver cannot report a port it picked, so take a free one and hand it over.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("chromedriver starts");
        let driver_proc = Proc(child);
        let t0 = Instant::now();
        loop {
            if TcpStream::connect(addr).is_ok()
                && http(addr, "GET", "/status", None).1["value"]["ready"] == true
            {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "chromedriver not ready on {addr} after 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // A fresh profile: nothing from an earlier run (or another test) leaks in.
        let profile = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let (status, v) = http(
            addr,
            "POST",
            "/session",
            Some(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": chromium, "args": args},
            }}})),
        );
        assert_eq!(status, 200, "new session: {v}");
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        Browser {
            addr,
            session,
            _profile: profile,
            _driver: driver_proc,
        }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let full = format!("/session/{}{path}", self.session);
        let (status, v) = http(self.addr, method, &full, body.as_ref());
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url})));
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT_KEY].as_str().unwrap().to_string()
    }

    fn send_keys(&self, element: &str, text: &str) {
        self.cmd(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({"text": text})),
        );
    }

    fn click(&self, element: &str) {
        self.cmd(
            "POST",
            &format!("/element/{element}/click"),
            Some(json!({})),
        );
    }

    /// Moves the mouse onto the centre of `element`.
    fn hover(&self, element: &str) {
        self.cmd(
            "POST",
            "/actions",
            Some(json!({"actions": [{
                "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
                "actions": [{"type": "pointerMove", "duration": 0, "x": 0, "y": 0,
                             "origin": {ELEMENT_KEY: element}}],
            }]})),
        );
    }

    fn script(&self, body: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": body, "args": []})),
        )
    }

    /// Picks `image` through the page's file input as a user would, types `question`, chooses
    /// the compared `method` (if any) and asks; waits until the streamed answer is done.
    fn ask(&self, image: &Path, question: &str, method: Option<&str>) {
        let input = self.find("#file");
        let image = std::fs::canonicalize(image).unwrap();
        self.send_keys(&input, image.to_str().unwrap());
        self.wait_for(
            "the image to load",
            "return document.getElementById('drop').dataset.loaded || null",
            Duration::from_secs(20),
        );
        let q = self.find("#question");
        self.send_keys(&q, question);
        if let Some(m) = method {
            self.script(&format!(
                "document.getElementById('method').value = '{m}'; return null"
            ));
        }
        self.click(&self.find("#ask"));
        let state = self.wait_for(
            "the streamed answer",
            "const s = document.getElementById('answer').dataset.state; \
             return s === 'streaming' || s === 'idle' ? null : s",
            Duration::from_secs(120),
        );
        assert_eq!(
            state,
            "done",
            "status: {}",
            self.script("return document.getElementById('status').textContent")
        );
    }

    /// Polls `body` until it returns something other than null/false.
    fn wait_for(&self, what: &str, body: &str, limit: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.script(body);
            if !(v.is_null() || v == false) {
                return v;
            }
            assert!(t0.elapsed() < limit, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the browser (chromedriver itself is killed by its guard). Nothing here may panic:
        // this also runs while a failed assertion unwinds.
        if let Ok(mut s) = TcpStream::connect(self.addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let req = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n\r\n",
                self.session, self.addr
            );
            if s.write_all(req.as_bytes()).is_ok() {
                let _ = s.read(&mut [0u8; 256]);
            }
        }
    }
}

fn explain_token0(method: &str) -> (Vec<usize>, Vec<f32>, String, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(["explain", "--json", "--method", method, "-t", "1"])
        .args(["--prompt", QUESTION, "-n", "16"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let grid = v["grid"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let t0 = &v["tokens"][0];
    let map = t0["map"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (
        grid,
        map,
        t0["text"].as_str().unwrap().to_string(),
        v["confidence"].clone(),
    )
}

/// The overlay's pixels `px` (RGBA, `size` = (w, h)) draw `map` (`grid` = (rows, cols)) as the
/// PNG overlays do. Each cell's centre: an opaque entry of the PNG overlays' table, the one for
/// the CLI's map upsampled as the PNGs are (pixel centres at (x + 0.5) · cells / pixels − 0.5 in
/// cells, bilinear, constant beyond the outer centres); one step of slack: the wire carries half
/// precision. Along the peak's row every pixel is checked too (blocks would be off wherever the
/// map changes between cells), and the brightest cell is the map's peak.
fn assert_overlay_shows(
    px: &[u8],
    (w, h): (usize, usize),
    (rows, cols): (usize, usize),
    map: &[f32],
    what: &str,
) {
    let table = fastrm::render::colormap_table();
    let top = map.iter().copied().fold(0.0f32, f32::max);
    let tap = |x: usize, n: usize, cells: usize| {
        let u = ((x as f32 + 0.5) * cells as f32 / n as f32 - 0.5).clamp(0.0, (cells - 1) as f32);
        let i0 = u.floor() as usize;
        (i0, (i0 + 1).min(cells - 1), u - i0 as f32)
    };
    let upsampled = |x: usize, y: usize| {
        let ((q0, q1, fx), (r0, r1, fy)) = (tap(x, w, cols), tap(y, h, rows));
        let at = |r: usize, q: usize| map[r * cols + q];
        let a = at(r0, q0) * (1.0 - fx) + at(r0, q1) * fx;
        let b = at(r1, q0) * (1.0 - fx) + at(r1, q1) * fx;
        a * (1.0 - fy) + b * fy
    };
    let entry = |x: usize, y: usize| {
        let p = &px[(y * w + x) * 4..(y * w + x) * 4 + 4];
        assert_eq!(p[3], 255, "{what}: pixel ({x}, {y}) is not drawn");
        let i = table
            .iter()
            .position(|t| t[..] == p[..3])
            .unwrap_or_else(|| panic!("{what}: pixel ({x}, {y}): {p:?} is not a viridis colour"));
        let want = lut_index(upsampled(x, y), top);
        assert!(
            i.abs_diff(want) <= 1,
            "{what}: pixel ({x}, {y}): colour entry {i}, the upsampled map says {want}"
        );
        i
    };
    let mut got_idx = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            got_idx.push(entry(
                (2 * c + 1) * w / (2 * cols),
                (2 * r + 1) * h / (2 * rows),
            ));
        }
    }
    let argmax = |xs: &[f32]| (0..xs.len()).fold(0, |b, i| if xs[i] > xs[b] { i } else { b });
    let want_peak = argmax(map);
    let y = (2 * (want_peak / cols) + 1) * h / (2 * rows);
    for x in 0..w {
        entry(x, y);
    }
    let got_f: Vec<f32> = got_idx.iter().map(|&i| i as f32).collect();
    let got_peak = argmax(&got_f);
    assert!(
        got_idx[want_peak] >= 245,
        "{what}: the map's peak is not near the top colour: {}",
        got_idx[want_peak]
    );
    assert_eq!(
        (got_peak / cols, got_peak % cols),
        (want_peak / cols, want_peak % cols),
        "{what}: brightest overlay cell vs the map's maximum"
    );
}

/// The colour table entry the PNG overlays use for `v` on a map whose maximum is `top`.
fn lut_index(v: f32, top: f32) -> usize {
    let t = if top > 0.0 { v / top } else { 0.0 };
    ((t.clamp(0.0, 1.0) * 255.0 + 0.5) as usize).min(255)
}

#[test]
#[ignore = "needs chromium and chromedriver (.ci/run installs them and runs it): cargo test --test viewer -- --ignored"]
fn viewer_streams_the_answer_and_overlays_the_selected_tokens_map() {
    let (driver, chromium) = match browser() {
        Ok(b) => b,
        Err(why) => panic!("the browser test cannot run: {why}"),
    };
    let (grid, want_map, want_text, want_conf) = explain_token0("fastrm");
    let (_, baseline_map, _, _) = explain_token0("baseline");
    assert_eq!(want_text, "yellow", "the demo model's answer changed");
    let (rows, cols) = (grid[0], grid[1]);

    let (_server, addr) = start_server(&[]);
    let b = Browser::start(&driver, &chromium);
    let origin = format!("http://{addr}");
    b.goto(&format!("{origin}/"));
    assert_eq!(b.script("return document.title"), "fastrm viewer");

    // The scene, picked through the page's file input as a user would; the exact baseline's map
    // beside FastRM's.
    let image = fastrm::demo::image_path().unwrap();
    b.ask(&image, QUESTION, Some("baseline"));
    let answer = b.script("return document.getElementById('answer').dataset.text");
    assert_eq!(answer, "yellow");
    let toks = b.script(
        "return Array.from(document.querySelectorAll('#answer .tok')).map(e => \
         ({index: e.dataset.index, text: e.textContent, data: e.dataset.text}))",
    );
    assert_eq!(
        toks[0],
        json!({"index": "0", "text": "yellow", "data": "yellow"}),
        "{toks}"
    );

    // The confidence shown when the stream ended is the engine's.
    let conf = b.script(
        "const c = document.getElementById('confidence'); \
         return {verdict: c.dataset.verdict || null, mean: Number(c.dataset.meanEntropy), \
                 text: c.textContent}",
    );
    assert_eq!(conf["verdict"], want_conf["verdict"], "{conf}");
    let mean = want_conf["mean_entropy"].as_f64().unwrap();
    assert!(
        (conf["mean"].as_f64().unwrap() - mean).abs() < 1e-6,
        "{conf} vs {want_conf}"
    );
    assert!(conf["text"]
        .as_str()
        .unwrap()
        .contains(&format!("{mean:.3}")));

    // When the answer ends its first token is selected: the overlay shows its map.
    let meta = b.script(
        "const o = document.getElementById('overlay'), i = document.getElementById('image'); \
         const ro = o.getBoundingClientRect(), ri = i.getBoundingClientRect(); \
         const d = o.getContext('2d').getImageData(0, 0, o.width, o.height).data; \
         let s = ''; for (let k = 0; k < d.length; k++) s += String.fromCharCode(d[k]); \
         const im = i.getContext('2d').getImageData(0, 0, i.width, i.height).data; \
         let lit = 0; for (let k = 0; k < im.length; k += 4) if (im[k] || im[k+1] || im[k+2]) lit++; \
         return {index: o.dataset.index, rows: Number(o.dataset.rows), cols: Number(o.dataset.cols), \
                 w: o.width, h: o.height, opacity: Number(getComputedStyle(o).opacity), \
                 same_box: ro.x === ri.x && ro.y === ri.y && ro.width === ri.width && ro.height === ri.height, \
                 image_lit: lit, selected: document.querySelector('.tok.selected')?.dataset.index ?? null, \
                 pixels: btoa(s)}",
    );
    assert_eq!(meta["index"], "0");
    assert_eq!(meta["selected"], "0");
    assert_eq!(
        (meta["rows"].as_u64(), meta["cols"].as_u64()),
        (Some(rows as u64), Some(cols as u64))
    );
    assert_eq!(
        meta["same_box"], true,
        "the overlay must lie exactly over the image"
    );
    let opacity = meta["opacity"].as_f64().unwrap();
    assert!(opacity > 0.0 && opacity < 1.0, "overlay opacity {opacity}");
    let (w, h) = (
        meta["w"].as_u64().unwrap() as usize,
        meta["h"].as_u64().unwrap() as usize,
    );
    assert!(
        meta["image_lit"].as_u64().unwrap() as usize > w * h / 2,
        "the image is not drawn under the overlay"
    );
    let px = base64::engine::general_purpose::STANDARD
        .decode(meta["pixels"].as_str().unwrap())
        .unwrap();
    assert_eq!(px.len(), w * h * 4);

    assert_overlay_shows(&px, (w, h), (rows, cols), &want_map, "FastRM");

    // Beside it, the same token's exact-baseline map, the CLI's.
    let second = b.script(
        "const s = document.getElementById('second'), o = document.getElementById('overlay2'); \
         const d = o.getContext('2d').getImageData(0, 0, o.width, o.height).data; \
         let p = ''; for (let k = 0; k < d.length; k++) p += String.fromCharCode(d[k]); \
         return {hidden: s.hidden, state: s.dataset.state, method: s.dataset.method, \
                 index: o.dataset.index, caption: document.getElementById('caption2').textContent, \
                 pixels: btoa(p)}",
    );
    assert_eq!(second["hidden"], false);
    assert_eq!(second["state"], "done");
    assert_eq!(second["method"], "baseline");
    assert_eq!(second["index"], "0");
    assert!(second["caption"]
        .as_str()
        .unwrap()
        .starts_with("exact baseline #0"));
    let px2 = base64::engine::general_purpose::STANDARD
        .decode(second["pixels"].as_str().unwrap())
        .unwrap();
    assert_overlay_shows(&px2, (w, h), (rows, cols), &baseline_map, "exact baseline");

    // Hovering another token shows its map; leaving it returns to the clicked one. The demo
    // model answers in one token (the server leaves `</s>` out), so a second one is added through
    // the page's own function, with a map of the same grid.
    b.script(
        "const g = tokens[0].grid, n = g[0] * g[1]; \
         addToken(' more', {index: 1, id: 1, text: ' more', entropy: 1, grid: g, \
                  map_b64: btoa(String.fromCharCode(...new Uint8Array(2 * n)))}); \
         return null",
    );
    let shown = "return document.getElementById('overlay').dataset.index";
    assert_eq!(
        b.script(shown),
        "0",
        "a new token does not take over the selection"
    );
    b.hover(&b.find("#answer .tok[data-index='1']"));
    assert_eq!(b.script(shown), "1", "hover shows the hovered token's map");
    b.hover(&b.find("#question"));
    assert_eq!(
        b.script(shown),
        "0",
        "leaving it shows the selected token again"
    );

    // For a person to look at: FASTRM_VIEWER_SCREENSHOT=out.png keeps what the browser showed.
    if let Some(path) = std::env::var_os("FASTRM_VIEWER_SCREENSHOT") {
        let shot = b.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot.as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    // Everything the page loaded came from the server itself.
    let resources = b.script("return performance.getEntriesByType('resource').map(e => e.name)");
    for r in resources.as_array().unwrap() {
        assert!(
            r.as_str().unwrap().starts_with(&origin),
            "the page fetched {r} from elsewhere"
        );
    }
}

/// A tiled model (LLaVA-NeXT, the tiny fixture with a random FastRM head): the page draws the
/// whole picture fitted into the canvas, its aspect kept, and the first token's map — the
/// server's own placed map, asked for apart — over exactly that rectangle, nothing outside it.
#[test]
#[ignore = "needs chromium and chromedriver (.ci/run installs them and runs it): cargo test --test viewer -- --ignored"]
fn viewer_draws_a_tiled_models_map_over_the_whole_picture() {
    let (driver, chromium) = match browser() {
        Ok(b) => b,
        Err(why) => panic!("the browser test cannot run: {why}"),
    };
    let next = common::fixture_dir("next");
    let tmp = tempfile::tempdir().unwrap();
    let head = tmp.path().join("head.safetensors");
    let engine = fastrm::Engine::load(fastrm::backend::cpu::Cpu, &next).unwrap();
    let d = engine.config().text.hidden_size;
    fastrm::explain::fastrm::HeadWeights::random(d, 16, 4)
        .save(&head)
        .unwrap();
    let (_server, addr) = start_server(&[
        "--model",
        next.to_str().unwrap(),
        "--head",
        head.to_str().unwrap(),
    ]);
    let picture = next.join("wide.png");
    let question = "What is on the left?";
    // The server's answer asked for apart: token 0's map placed on the picture.
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&picture).unwrap())
    );
    let (status, want) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&json!({
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question},
            ]}],
            "max_tokens": 4,
            "relevancy": {"method": "fastrm"},
        })),
    );
    assert_eq!(status, 200, "{want}");
    let t0 = &want["relevancy"]["tokens"][0];
    assert_eq!(t0["covers"], json!(["whole_image"]));
    let grid = &t0["grids"][0];
    let (rows, cols) = (
        grid[0].as_u64().unwrap() as usize,
        grid[1].as_u64().unwrap() as usize,
    );
    let want_map = fastrm::serve::openai::decode_map_b64(t0["map_b64"].as_str().unwrap()).unwrap();
    assert_eq!(want_map.len(), rows * cols);

    let b = Browser::start(&driver, &chromium);
    b.goto(&format!("http://{addr}/"));
    b.ask(&picture, question, None);
    // A head `fastrm eval` never calibrated: the confidence line says there is no threshold.
    let conf = b.script("return document.getElementById('confidence').textContent");
    assert!(
        conf.as_str().unwrap().contains("no calibrated threshold"),
        "{conf}"
    );
    b.script("show(0); return null");
    let meta = b.script(
        "const o = document.getElementById('overlay'); \
         const d = o.getContext('2d').getImageData(0, 0, o.width, o.height).data; \
         let s = ''; for (let k = 0; k < d.length; k++) s += String.fromCharCode(d[k]); \
         return {covers: document.getElementById('image').dataset.covers, rect: pictureRect(o), \
                 rows: Number(o.dataset.rows), cols: Number(o.dataset.cols), \
                 w: o.width, h: o.height, pixels: btoa(s)}",
    );
    assert_eq!(meta["covers"], "whole_image");
    assert_eq!(
        (meta["rows"].as_u64(), meta["cols"].as_u64()),
        (Some(rows as u64), Some(cols as u64))
    );
    let (w, h) = (
        meta["w"].as_u64().unwrap() as usize,
        meta["h"].as_u64().unwrap() as usize,
    );
    let rect: Vec<usize> = meta["rect"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let (x0, y0, rw, rh) = (rect[0], rect[1], rect[2], rect[3]);
    // The rectangle is the picture's aspect, fitted: as wide as the canvas, shorter than it.
    let img = fastrm::vision::load_image(&picture).unwrap();
    assert_eq!(rw, w);
    assert!(rh < h && (rh as f64 / rw as f64 - img.height as f64 / img.width as f64).abs() < 0.02);
    let px = base64::engine::general_purpose::STANDARD
        .decode(meta["pixels"].as_str().unwrap())
        .unwrap();
    for y in (0..h).filter(|&y| y < y0 || y >= y0 + rh) {
        for x in 0..w {
            assert_eq!(
                px[(y * w + x) * 4 + 3],
                0,
                "pixel ({x}, {y}) outside the picture is drawn"
            );
        }
    }
    let mut inside = Vec::with_capacity(rw * rh * 4);
    for y in y0..y0 + rh {
        inside.extend_from_slice(&px[(y * w + x0) * 4..(y * w + x0 + rw) * 4]);
    }
    assert_overlay_shows(&inside, (rw, rh), (rows, cols), &want_map, "tiled FastRM");
}
