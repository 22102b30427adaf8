//! `exec`: runs a command with a token in its environment, forwards the
//! signals it gets to it, and exits as the command did (128+N when signal N
//! ended it), the way `aws-vault exec` and `vault agent`'s exec mode hand
//! credentials to short jobs. The token is read once: a program that runs
//! longer than the token lives must ask the broker itself.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

use crate::client::{self, Target};
use crate::{Environment, exit, logging};

/// Signals passed on to the command.
const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// The shell's codes for a command that cannot be run.
const CANNOT_EXECUTE: u8 = 126;
const NOT_FOUND: u8 = 127;

pub async fn run(
    target: &Target,
    env: Environment,
    min_remaining: Option<std::time::Duration>,
    command: &[OsString],
) -> u8 {
    let token = match client::fetch(target, env, min_remaining).await {
        Ok(token) => token,
        Err(e) => {
            logging::to_stderr(format_args!("error: {e}"));
            return e.exit_code();
        }
    };
    let (program, args) = command.split_first().expect("clap requires a command");
    // Listen before spawning, so no signal falls between the two.
    let mut listeners = Vec::new();
    for sig in FORWARDED {
        match signal(SignalKind::from_raw(sig as i32)) {
            Ok(listener) => listeners.push((sig, listener)),
            Err(e) => {
                logging::to_stderr(format_args!("error: cannot handle {sig}: {e}"));
                return exit::FAILURE;
            }
        }
    }
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .envs(crate::token_text::token_env(&token))
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            logging::to_stderr(format_args!("error: cannot run {}: {e}", program.to_string_lossy()));
            return if e.kind() == std::io::ErrorKind::NotFound {
                NOT_FOUND
            } else {
                CANNOT_EXECUTE
            };
        }
    };
    drop(token);
    let pid = child.id().map(|id| Pid::from_raw(id as i32));
    let status = loop {
        let received = futures_util::future::select_all(
            listeners
                .iter_mut()
                .map(|(sig, listener)| Box::pin(async move { listener.recv().await.map(|_| *sig) })),
        );
        tokio::select! {
            status = child.wait() => break status,
            (Some(sig), _, _) = received => {
                if let Some(pid) = pid.filter(|_| !terminal_sent_it_too(sig)) {
                    // The command may have just exited: nothing to do then.
                    let _ = kill(pid, sig);
                }
            }
        }
    };
    match status {
        Ok(status) => exit_code(status),
        Err(e) => {
            logging::to_stderr(format_args!("error: waiting for {}: {e}", program.to_string_lossy()));
            exit::FAILURE
        }
    }
}

/// The command's exit code, or 128+N when signal N ended it.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.saturating_add(sig as u8),
        (None, None) => exit::FAILURE,
    }
}

/// A terminal's ^C or ^\ goes to its whole foreground process group, the
/// command included: forwarding it too would deliver it twice.
fn terminal_sent_it_too(sig: Signal) -> bool {
    matches!(sig, Signal::SIGINT | Signal::SIGQUIT | Signal::SIGWINCH)
        && nix::unistd::tcgetpgrp(std::io::stdin()).is_ok_and(|fg| fg == nix::unistd::getpgrp())
}
