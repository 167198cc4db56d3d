//! The progress bars `build`, `sample`, `decode` and `verify` draw on
//! stderr from the library's [`Progress`] calls.

use rae_cache::progress::Progress;

/// An indicatif bar started by [`Progress::start`]; draws nothing when
/// `show` is false (the ranks of a job other than 0).
pub struct Bar {
    /// indicatif's template; `None`: its default bar.
    template: Option<String>,
    show: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl Bar {
    /// The build's bar: images done, images/s and ETA.
    pub fn images(show: bool) -> Self {
        Self::new(
            "{spinner} {bar:40} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}",
            show,
        )
    }

    /// `label`, then items done of all, elapsed < ETA and throughput.
    pub fn labelled(label: &str, show: bool) -> Self {
        Self::new(
            &format!(
                "{label} {{bar:40}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] {{per_sec}}"
            ),
            show,
        )
    }

    /// indicatif's default bar: a bar and items done of all.
    pub fn plain(show: bool) -> Self {
        Self {
            template: None,
            show,
            bar: None,
        }
    }

    fn new(template: &str, show: bool) -> Self {
        Self {
            template: Some(template.to_string()),
            ..Self::plain(show)
        }
    }
}

impl Progress for Bar {
    fn start(&mut self, total: u64) {
        if !self.show {
            return;
        }
        let bar = indicatif::ProgressBar::new(total);
        if let Some(Ok(style)) = self
            .template
            .as_deref()
            .map(indicatif::ProgressStyle::with_template)
        {
            bar.set_style(style);
        }
        self.bar = Some(bar);
    }

    fn advance(&mut self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
