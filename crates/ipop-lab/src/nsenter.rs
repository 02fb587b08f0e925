//! A handle on a network namespace that outlives the borrow of its [`Netns`]: Prosody and XMPP
//! users keep one so that they can open sockets in the namespace later (readiness probes,
//! reconnections) without holding a reference to the `Netns`.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::thread;

use nix::sched::{CloneFlags, setns};

use crate::netns::Netns;

#[derive(Clone, Debug)]
pub(crate) struct NsHandle {
    name: String,
    /// An open `/run/netns/NAME`; it keeps the namespace alive while we hold it.
    file: Arc<File>,
}

impl NsHandle {
    /// # Panics
    /// When the namespace's file cannot be opened.
    pub(crate) fn of(ns: &Netns) -> NsHandle {
        let path = Path::new("/run/netns").join(ns.name());
        let file =
            File::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        NsHandle {
            name: ns.name().to_owned(),
            file: Arc::new(file),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a new thread that has entered the namespace and returns its result. Sockets
    /// created by `f` stay in the namespace wherever they are used afterwards.
    pub(crate) fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let file = &self.file;
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(format!("in-{}", self.name))
                .spawn_scoped(scope, move || {
                    setns(file.as_ref(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                    Ok(f())
                })?;
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// Runs `f` in `ns` when there is one, else on the calling thread.
pub(crate) fn run_in<T, F>(ns: Option<&NsHandle>, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    match ns {
        Some(ns) => ns.run(f),
        None => Ok(f()),
    }
}
