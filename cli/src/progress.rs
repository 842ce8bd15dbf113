//! Progress of long work on stderr (audit verification, rebuilds).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tally_event_store::verify::Progress;

/// How often progress is logged when stderr is not a terminal (a job's log, a pipe).
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(2);

/// Shows progress on stderr: a bar on a terminal, a log line every [`PROGRESS_LOG_INTERVAL`]
/// otherwise (a bar's redraws would fill a log file with control characters).
pub enum ProgressReporter {
    Bar(ProgressBar),
    Log {
        /// What is done to the events, for the log lines ("verified", "rebuilt").
        verb: &'static str,
        started: Instant,
        logged: Instant,
        /// `None` until the verifier has counted the events (it may fail before).
        latest: Option<Progress>,
    },
}

impl ProgressReporter {
    pub fn new(verb: &'static str) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} events, {per_sec:0}, ETA {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            Self::Bar(bar)
        } else {
            let now = Instant::now();
            Self::Log {
                verb,
                started: now,
                logged: now,
                latest: None,
            }
        }
    }

    pub fn update(&mut self, progress: Progress) {
        match self {
            Self::Bar(bar) => {
                // Events appended since the count was taken may push `done` past it.
                bar.set_length(progress.total.max(progress.done));
                bar.set_position(progress.done);
            }
            Self::Log {
                verb,
                started,
                logged,
                latest,
            } => {
                *latest = Some(progress);
                if logged.elapsed() >= PROGRESS_LOG_INTERVAL {
                    log_progress(verb, *started, progress);
                    *logged = Instant::now();
                }
            }
        }
    }

    /// Clears the bar (the verdict follows on stdout) or logs where verification ended.
    pub fn finish(self) {
        match self {
            Self::Bar(bar) => bar.finish_and_clear(),
            Self::Log {
                verb, started, latest, ..
            } => {
                if let Some(progress) = latest {
                    log_progress(verb, started, progress);
                }
            }
        }
    }
}

fn log_progress(verb: &str, started: Instant, progress: Progress) {
    let seconds = started.elapsed().as_secs_f64();
    let rate = if seconds > 0.0 {
        progress.done as f64 / seconds
    } else {
        0.0
    };
    tracing::info!(
        "{verb} {}/{} events ({rate:.0} events/s)",
        progress.done,
        progress.total.max(progress.done)
    );
}
