//! The trainer as a supervised child: started in its own process group,
//! its output streamed (loss lines turned into a progress bar), Ctrl-C and
//! SIGTERM forwarded (a third signal kills it), its exit code returned.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};
use crate::ui;

/// Runs the trainer in its own process group, streams its output, forwards
/// signals, and returns (exit code, loss lines seen, last loss, signals
/// forwarded).
pub(crate) fn supervise(
    command: &[String],
    env: &[(String, String)],
    max_steps: Option<u64>,
) -> Result<(i32, u64, Option<f64>, usize)> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    crate::interrupt::set_supervising(true);
    let mut child = cmd.spawn().map_err(|e| Error::io("starting", Path::new(&command[0]), e))?;
    let pgid = child.id() as i32;
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(std::result::Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let quiet = ui::quiet();
    let bar = if ui::show_progress() {
        let b = max_steps.map_or_else(ProgressBar::new_spinner, ProgressBar::new);
        b.set_style(
            ProgressStyle::with_template("{spinner} training [{bar:30}] step {pos}{msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let (mut steps, mut last) = (0u64, None);
    let mut forwarded = 0usize;
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Some((loss, lr)) = parse_log(&line) {
                    steps += 1;
                    last = Some(loss);
                    bar.set_position(steps);
                    bar.set_message(format!(
                        "  loss {loss:.4}{}",
                        lr.map(|l| format!("  lr {l:.3e}")).unwrap_or_default()
                    ));
                }
                if !quiet || bar.is_hidden() {
                    bar.suspend(|| eprintln!("{line}"));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        let (count, sig) = crate::interrupt::signals_seen();
        if count > forwarded {
            // Third and later signals: SIGKILL, for a trainer that hangs.
            let s = if count >= 3 { libc::SIGKILL } else { sig };
            // SAFETY: kill(2) takes plain integers; -pgid names the process
            // group our child leads (started with process_group(0)).
            unsafe { libc::kill(-pgid, s) };
            forwarded = count;
        }
        if let Some(st) = child.try_wait().map_err(|e| Error::io("waiting for", Path::new(&command[0]), e))? {
            break st;
        }
    };
    // The readers end at EOF once the trainer is gone; then every line is
    // in the channel.
    for r in readers {
        let _ = r.join();
    }
    for line in rx.try_iter() {
        if let Some((loss, _)) = parse_log(&line) {
            steps += 1;
            last = Some(loss);
        }
        if !quiet || bar.is_hidden() {
            bar.suspend(|| eprintln!("{line}"));
        }
    }
    bar.finish_and_clear();
    crate::interrupt::set_supervising(false);
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok((code, steps, last, forwarded))
}

/// The loss and learning rate of a transformers log line such as
/// `{'loss': 1.234, 'grad_norm': ..., 'learning_rate': 1e-05, 'epoch': 0.1}`.
pub(crate) fn parse_log(line: &str) -> Option<(f64, Option<f64>)> {
    let num = |key: &str| -> Option<f64> {
        let re = regex::Regex::new(&format!(r#"['"]{key}['"]\s*:\s*['"]?([-+0-9.eE]+|nan|inf)"#)).ok()?;
        re.captures(line)?.get(1)?.as_str().parse().ok()
    };
    Some((num("loss")?, num("learning_rate")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_lines_of_transformers_4_and_5_parse() {
        assert_eq!(
            parse_log("{'loss': 2.3456, 'grad_norm': 1.2, 'learning_rate': 1e-05, 'epoch': 0.5}"),
            Some((2.3456, Some(1e-5)))
        );
        assert_eq!(parse_log("{'loss': '1.25', 'learning_rate': '9.5e-06'}"), Some((1.25, Some(9.5e-6))));
        assert_eq!(parse_log("{\"loss\": 0.5}"), Some((0.5, None)));
        assert!(parse_log("{'train_runtime': 3.2}").is_none());
        assert!(parse_log("{'loss': nan}").unwrap().0.is_nan());
    }
}
