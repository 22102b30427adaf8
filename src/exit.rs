//! Every exit code of the binary, in one place (sysexits.h names where one
//! fits). Scripts and systemd (`RestartPreventExitStatus=78`) rely on them.

/// Success.
pub const OK: u8 = 0;
/// A runtime failure not covered below.
pub const FAILURE: u8 = 1;
/// Bad command-line arguments.
pub const USAGE: u8 = 2;
/// An audit trail whose chain is broken: a record edited, removed or
/// reordered (EX_DATAERR).
pub const DATA_ERROR: u8 = 65;
/// An input file could not be read (EX_NOINPUT).
pub const NO_INPUT: u8 = 66;
/// The broker could not be reached (EX_UNAVAILABLE).
pub const UNREACHABLE: u8 = 69;
/// The output could not be written (EX_IOERR).
pub const IO_ERROR: u8 = 74;
/// The broker has no valid token right now (EX_TEMPFAIL).
pub const NO_TOKEN: u8 = 75;
/// The broker refused this caller the environment's tokens (EX_NOPERM).
pub const NOT_ALLOWED: u8 = 77;
/// Invalid configuration or credentials (EX_CONFIG): restarting will not help.
pub const CONFIG: u8 = 78;
