//! Ctrl-C, SIGTERM and SIGUSR2 for the long-running commands (`run`, `worker`, `certify`).
//! SIGUSR2 is what Slurm sends ahead of a walltime or preemption (`--signal=B:USR2@LEAD`).

use caf::sched::CancelFlag;

use super::exit::INTERRUPTED;

/// What a command prints on each signal.
pub struct Notices {
    pub stopping: &'static str,
    pub aborted: Option<&'static str>,
}

/// First Ctrl-C / SIGTERM / SIGUSR2: print `stopping` and cancel `shutdown`, so the command stops at its
/// next clean point. Second: print `aborted` and exit 130 at once (work in flight is redone on
/// resume).
///
/// The watcher has its own thread and runtime so that `certify`, which has no runtime, and
/// `run`, which has one, install it the same way.
pub fn stop_on_signal(shutdown: CancelFlag, notices: Notices) {
    let watcher = move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            // Without a watcher the signal's default action still stops the process; only the
            // clean stop is lost, which is no reason to refuse the command.
            return;
        };
        rt.block_on(async {
            wait_for_signal().await;
            eprintln!("{}", notices.stopping);
            shutdown.cancel();
            wait_for_signal().await;
            if let Some(m) = notices.aborted {
                eprintln!("{m}");
            }
            std::process::exit(INTERRUPTED);
        })
    };
    // As above: failing to start the watcher only loses the clean stop.
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(watcher);
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::user_defined2()),
        ) {
            (Ok(mut term), Ok(mut usr2)) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                    _ = usr2.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
