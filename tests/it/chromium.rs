//! Headless Chromium, to look at the admin pages as a browser renders them. Not installed is a
//! failure, not a skip: `scripts/test` installs it (`apt-get install -y chromium`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// A first start of Chromium on a loaded machine can be slow.
const BROWSER_PATIENCE: Duration = Duration::from_secs(90);

fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "Chromium is not installed, and the status page tests need it: run \
         `apt-get install -y chromium` (Debian's package; `scripts/test` does it), or set CHROMIUM \
         to the browser's path"
    );
}

/// A browser profile directory that is removed when the run is over.
struct Profile(PathBuf);

impl Profile {
    fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("smsw-chromium-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create a Chromium profile directory");
        Self(dir)
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn run(extra: &[String], url: &str) -> Vec<u8> {
    let profile = Profile::new();
    let mut cmd = Command::new(binary());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.0.display()))
    .args(extra)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let out = tokio::time::timeout(BROWSER_PATIENCE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("Chromium did not finish with {url} in {BROWSER_PATIENCE:?}"))
        .unwrap_or_else(|e| panic!("could not start Chromium: {e}"));
    assert!(
        out.status.success(),
        "Chromium failed on {url} ({:?}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The DOM after the page loaded, serialised: what the browser made of the HTML.
pub async fn dump_dom(url: &str) -> String {
    let dom = String::from_utf8(run(&["--dump-dom".into()], url).await)
        .expect("Chromium's DOM dump is UTF-8");
    assert!(
        dom.contains("</html>"),
        "Chromium printed no document for {url}:\n{dom}"
    );
    dom
}

/// A PNG of the page at a laptop's window size.
pub async fn screenshot(url: &str, png: &Path) {
    run(
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1280,1400".into(),
            "--hide-scrollbars".into(),
        ],
        url,
    )
    .await;
}

/// The text a person reads in a piece of serialised DOM: tags dropped, entities decoded,
/// whitespace collapsed.
pub fn visible_text(html: &str) -> String {
    let mut text = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    let decoded = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&");
    decoded.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The serialised element that starts at the first occurrence of `marker` (an attribute such
/// as `id="counts"`), up to the end of its `tag` element. Enough for the flat markup of the
/// status pages.
pub fn element<'a>(dom: &'a str, marker: &str, tag: &str) -> &'a str {
    let at = dom
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker} in the page:\n{dom}"));
    let start = dom[..at]
        .rfind(&format!("<{tag}"))
        .unwrap_or_else(|| panic!("{marker} is not on a <{tag}>"));
    let close = format!("</{tag}>");
    let end = dom[at..]
        .find(&close)
        .map(|i| at + i + close.len())
        .unwrap_or_else(|| panic!("<{tag}> with {marker} is not closed"));
    &dom[start..end]
}
