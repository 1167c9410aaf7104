//! A real headless browser (Debian's `chromium`) for the pages the mesh serves: load a page, let
//! its scripts run, and read the DOM they built, or save what it looks like.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The browser: `CHROMIUM`, else `chromium` or `chromium-browser` on `PATH`.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).flat_map(|d| ["chromium", "chromium-browser"].map(|n| d.join(n))).find(|p| p.is_file())
}

/// How long a page's scripts may run (virtual time: timers fire at once, network waits count).
const BUDGET: Duration = Duration::from_secs(10);

async fn run(url: &str, extra: &[String]) -> Result<Vec<u8>> {
    let chromium = binary().context("no chromium: install Debian's chromium (.ci/run does) or set CHROMIUM")?;
    let profile = tempfile::tempdir()?;
    let mut command = tokio::process::Command::new(&chromium);
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"])
        .args(["--disable-extensions", "--disable-background-networking", "--mute-audio"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={}", BUDGET.as_millis()))
        .args(extra)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .context("chromium did not finish within 90 s")?
        .with_context(|| format!("running {}", chromium.display()))?;
    if !out.status.success() {
        bail!("chromium exited with {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// The page at `url` as its scripts left the DOM (`--dump-dom`), with attribute values'
/// `&gt;`, `&lt;`, `&quot;` and `&amp;` decoded.
pub async fn dom(url: &str) -> Result<String> {
    let html = String::from_utf8(run(url, &["--dump-dom".to_owned()]).await?).context("the DOM is not UTF-8")?;
    Ok(html.replace("&gt;", ">").replace("&lt;", "<").replace("&quot;", "\"").replace("&amp;", "&"))
}

/// Saves a `width`×`height` PNG of the page at `url` to `file`.
pub async fn screenshot(url: &str, file: &Path, width: u32, height: u32) -> Result<()> {
    run(url, &[format!("--screenshot={}", file.display()), format!("--window-size={width},{height}")]).await?;
    let png = std::fs::read(file).with_context(|| format!("chromium wrote no {}", file.display()))?;
    if !png.starts_with(b"\x89PNG\r\n\x1a\n") {
        bail!("{} is not a PNG", file.display());
    }
    Ok(())
}

/// The value of attribute `name` on the first element that has it.
pub fn attribute<'a>(dom: &'a str, name: &str) -> Option<&'a str> {
    let start = dom.find(&format!(" {name}=\""))? + name.len() + 3;
    dom[start..].split('"').next()
}

/// Every value of attribute `name`, in document order.
pub fn attributes<'a>(dom: &'a str, name: &str) -> Vec<&'a str> {
    let needle = format!(" {name}=\"");
    dom.match_indices(&needle).filter_map(|(i, _)| dom[i + needle.len()..].split('"').next()).collect()
}
