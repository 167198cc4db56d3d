//! `rae-cache demo --size tiny` end to end, as a newcomer runs it: the
//! generated latents must carry their class, the decoder must reconstruct,
//! and the page must load in a headless browser with every image present.
//!
//! The browser part needs Chromium (`/usr/bin/chromium`, or `RAE_BROWSER`);
//! `.ci/run` installs it and sets `RAE_BROWSER`, which makes it required.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common;

/// Class accuracy of generated latents (4 classes: chance 0.25); 0.969
/// measured on 2026-12-03 with the tiny plan (the run is seeded).
const MIN_CLASS_ACCURACY: f64 = 0.75;
/// Reconstruction PSNR of the tiny decoder after its 300 steps (18.48 dB
/// measured; a decoder that learned nothing sits near 10 dB).
const MIN_PSNR: f64 = 15.0;

fn browser() -> Option<PathBuf> {
    match std::env::var_os("RAE_BROWSER") {
        Some(p) => Some(PathBuf::from(p)),
        None => Some(PathBuf::from("/usr/bin/chromium")).filter(|p| p.exists()),
    }
}

fn chromium(browser: &Path, profile: &Path, extra: &[String], page: &Path) -> std::process::Output {
    Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--allow-file-access-from-files",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("start chromium")
}

/// The page as the browser sees it after load, then a screenshot that is
/// not blank.
fn check_in_browser(browser: &Path, out: &Path, images: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let page = out.join("index.html");
    let dom = chromium(
        browser,
        &tmp.path().join("p1"),
        &["--dump-dom".into()],
        &page,
    );
    let dom = String::from_utf8_lossy(&dom.stdout);
    let want = format!("data-images=\"{images}/{images}\"");
    assert!(
        dom.contains(&want),
        "browser DOM lacks {want}: {}",
        &dom[..dom.len().min(2000)]
    );
    let shot = tmp.path().join("shot.png");
    chromium(
        browser,
        &tmp.path().join("p2"),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1000,1800".into(),
        ],
        &page,
    );
    let img = image::open(&shot).expect("screenshot").to_rgb8();
    let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    // white page + text alone gives a few dozen colours; the images give thousands
    assert!(
        colours.len() > 500,
        "screenshot looks blank: {} colours",
        colours.len()
    );
}

#[test]
fn tiny_demo_generates_its_classes_and_a_page_that_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let o = common::run_ok([
        "demo",
        "--size",
        "tiny",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let s = common::json(&o);
    let m = &s["metrics"];
    let acc = m["class_accuracy"].as_f64().unwrap();
    let psnr = m["reconstruction_psnr"].as_f64().unwrap();
    eprintln!(
        "demo: class accuracy {acc:.3}, reconstruction PSNR {psnr:.2} dB, {:.0} s",
        s["seconds"]
    );
    assert!(acc >= MIN_CLASS_ACCURACY, "class accuracy {acc}");
    assert!(m["real_class_accuracy"].as_f64().unwrap() > 0.95);
    assert!(psnr >= MIN_PSNR, "PSNR {psnr}");
    let classes = s["images"]["classes"].as_array().unwrap().len();
    for k in [
        "examples",
        "reconstructions",
        "generated",
        "losses",
        "index",
    ] {
        let f = out.join(s["files"][k].as_str().unwrap());
        assert!(f.is_file(), "{} missing", f.display());
    }
    // one row per class in the generated grid
    let grid = image::open(out.join("decoded/grid.png")).unwrap();
    assert_eq!(
        grid.height() as usize,
        classes * (grid.width() as usize / classes)
    );
    // every stage printed its command line
    assert_eq!(s["stages"].as_array().unwrap().len(), 7);
    match browser() {
        Some(b) => check_in_browser(&b, &out, 4),
        None => eprintln!("SKIPPED the browser check: no /usr/bin/chromium (set RAE_BROWSER)"),
    }
}
