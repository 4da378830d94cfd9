//! Reloading when the configuration file changes (DESIGN: a reload is "SIGHUP, file
//! change, or the admin API").
//!
//! The file's *directory* is watched (inotify through the `notify` crate), not the file:
//! editors save by writing a new file and renaming it over the old one, and Kubernetes
//! updates a mounted ConfigMap by swapping a symlink; both end a watch on the file itself.
//! Only events naming the file count, unless the file is a symbolic link (then any event
//! of the directory may have changed its target). Events are debounced ([`QUIET`] without
//! a new one, at most [`MAX_WAIT`] after the first), then the file is read and reloaded
//! only if its bytes differ from the last version seen, so a save that changes nothing or
//! a burst of events of one save reloads at most once. The reload itself is SIGHUP's:
//! checked whole, refused whole.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fulcrum_admin::ReloadFn;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long the file must stay quiet after an event before it is read.
pub const QUIET: Duration = Duration::from_millis(250);

/// The longest wait from the first event to the read, however busy the file.
pub const MAX_WAIT: Duration = Duration::from_secs(2);

/// Starts watching `path`; on a change of its content, runs `reload` (on the blocking
/// pool) and logs the outcome. Runs until `cancel`.
///
/// # Errors
/// The watch cannot be set up (no inotify instance left, the directory unreadable): the
/// message says so, and reloading still works by SIGHUP and the admin API.
pub fn spawn(path: PathBuf, reload: ReloadFn, cancel: CancellationToken) -> Result<(), String> {
    let directory = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // The version running now, read before the watch starts (and not in the task, which
    // may first run after a change it would then take for the baseline).
    let mut last = std::fs::read(&path).ok();
    let name = path.file_name().map(std::ffi::OsStr::to_os_string);
    let linked = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
    let changed = Arc::new(Notify::new());
    let mut watcher = {
        let changed = Arc::clone(&changed);
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let relevant = match event {
                Ok(e) => {
                    // Reads of the file (ours included) open and close it without writing.
                    let writes = match e.kind {
                        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                        EventKind::Access(_) => false,
                        _ => true,
                    };
                    writes && (linked || e.paths.iter().any(|p| p.file_name() == name.as_deref()))
                }
                // A queue overflow may have dropped a change: look.
                Err(_) => true,
            };
            if relevant {
                changed.notify_one();
            }
        })
        .map_err(|e| format!("cannot watch `{}`: {e}", path.display()))?
    };
    watcher
        .watch(&directory, RecursiveMode::NonRecursive)
        .map_err(|e| format!("cannot watch `{}`: {e}", directory.display()))?;
    tokio::spawn(async move {
        // Dropping the watcher ends the watch; it lives as long as this task.
        let _watcher = watcher;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = changed.notified() => {}
            }
            // Debounce: wait until QUIET passes without another event, or MAX_WAIT.
            let latest = tokio::time::Instant::now() + MAX_WAIT;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = changed.notified() => {}
                    () = tokio::time::sleep(QUIET) => break,
                    () = tokio::time::sleep_until(latest) => break,
                }
            }
            let now = read(&path).await;
            if now.is_none() || now == last {
                // Gone for the moment (a rename in progress, a deleted file): the running
                // configuration stays, and the next event looks again.
                continue;
            }
            last = now;
            let reload = Arc::clone(&reload);
            match tokio::task::spawn_blocking(move || reload()).await {
                Ok(Ok(summary)) => {
                    tracing::info!(%summary, "file changed: configuration reloaded");
                }
                Ok(Err(error)) => tracing::error!(
                    %error,
                    "file changed: new configuration refused; the running one stays"
                ),
                Err(error) => tracing::error!(%error, "file changed: reload failed"),
            }
        }
    });
    Ok(())
}

async fn read(path: &Path) -> Option<Vec<u8>> {
    tokio::fs::read(path).await.ok()
}
