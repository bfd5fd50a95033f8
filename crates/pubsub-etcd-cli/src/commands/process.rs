//! What the commands that run a user's CMD share: how CMD is started, how
//! it is stopped with everything it started, and the signals that stop a
//! long-running command.

use std::future::Future;

use anyhow::Context as _;
use tokio::process::{Child, Command};

/// `sh -c CMD` in a process group of its own, so that stopping CMD stops
/// what it started too: `sh -c` forks its commands, and a survivor would
/// keep running and hold our stderr open.
pub(super) fn shell(command: &str) -> Command {
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg(command)
        .process_group(0)
        .kill_on_drop(true);
    shell
}

/// Kills CMD's whole process group, then CMD, and reaps it. Only while CMD
/// is not reaped does its pid name its group, so call it before any wait
/// has returned.
pub(super) async fn kill_group(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        // SAFETY: kill(2) takes plain integers and touches no memory.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill().await;
}

/// Resolves on Ctrl-C or SIGTERM (what `kill` and container runtimes send).
pub(super) fn shutdown() -> anyhow::Result<impl Future<Output = ()>> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    })
}
