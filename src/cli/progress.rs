//! Progress: a bar with ETA on a terminal, plain log lines otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub fn bar(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed}} < {{eta}}] {{msg}}"))
            .expect("valid template"),
    );
    bar
}

/// A log line every `every` steps when no bar is drawn (logs, CI).
pub fn log_every(bar: &ProgressBar, step: u64, every: u64, line: impl FnOnce() -> String) {
    if bar.is_hidden() && step.is_multiple_of(every) {
        eprintln!("{}", line());
    }
}
