//! [`Disk`]: the image file, through which every read, write, sync and
//! hole punch of this crate goes, and its lock.
//!
//! In tests a [`Disk`] can be told to "crash" after a number of writes
//! (writes, syncs, truncations and hole punches all count): every later
//! one fails and reaches nothing, as if the process had been killed there.

use std::fs::{File, TryLockError};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use crate::{Error, Result};

/// An open image file.
#[derive(Debug)]
pub(crate) struct Disk {
    file: File,
    /// How many more writes may reach the file (tests only).
    #[cfg(test)]
    budget: Option<u64>,
}

impl Disk {
    pub(crate) fn new(file: File) -> Disk {
        Disk {
            file,
            #[cfg(test)]
            budget: None,
        }
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Lets `n` more writes through, then fails every one (tests only).
    #[cfg(test)]
    pub(crate) fn crash_after(&mut self, n: Option<u64>) {
        self.budget = n;
    }

    /// Counts one write against the crash budget.
    #[cfg(test)]
    fn spend(&mut self) -> io::Result<()> {
        match &mut self.budget {
            Some(0) => Err(io::Error::other("simulated crash")),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    #[cfg(not(test))]
    #[inline]
    fn spend(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// The file's length in bytes. With `lseek(SEEK_END)`, not `statx`:
    /// a VMM's seccomp filter allows the one its raw disks use (all I/O
    /// here is positional, so the file offset it moves does not matter).
    pub(crate) fn len(&self) -> io::Result<u64> {
        use std::io::Seek;
        (&self.file).seek(io::SeekFrom::End(0))
    }

    pub(crate) fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Reads what the file has at `offset` into `buf` and zeroes the rest
    /// (past its end).
    pub(crate) fn read_or_zero_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset
                .checked_add(len64(done))
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            match self.file.read_at(&mut buf[done..], at) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    pub(crate) fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.spend()?;
        self.file.write_all_at(buf, offset)
    }

    /// `fdatasync`: every write so far is durable.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        self.spend()?;
        self.file.sync_data()
    }

    pub(crate) fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.spend()?;
        self.file.set_len(len)
    }

    /// Gives the file system back the space of `len` bytes at `offset`
    /// (they read as zero); a file system that cannot is not an error.
    pub(crate) fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.spend()?;
        match fallocate(&self.file, FallocateMode::PunchHole, true, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.errno(), libc::EOPNOTSUPP | libc::ENOSYS | libc::ENODEV) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}

/// A `usize` length as a `u64` (lossless on every target Rust supports
/// here; saturates otherwise).
pub(crate) fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Takes a non-blocking `flock` on `file`: shared when `shared`, exclusive
/// otherwise.
pub(crate) fn lock_file(file: &File, path: &Path, shared: bool) -> Result<()> {
    let r = if shared {
        file.try_lock_shared()
    } else {
        file.try_lock()
    };
    match r {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => Err(Error::Locked {
            path: path.to_path_buf(),
        }),
        Err(TryLockError::Error(source)) => Err(Error::Lock {
            path: path.to_path_buf(),
            source,
        }),
    }
}
