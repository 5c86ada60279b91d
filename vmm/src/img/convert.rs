//! `ember img convert` and `resize`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ember_qcow2::{CreateOptions, ExtentKind, ImageFormat, Qcow2};

use super::{
    format_of, io_err, parse_options, parse_size, qcow_err, virtual_size, ImgError, Result,
};

/// A source image opened for reading, whatever its format.
enum Source {
    Raw(File),
    Qcow2(Box<Qcow2>),
}

impl Source {
    fn open(path: &Path, format: ImageFormat) -> Result<(Source, u64)> {
        Ok(match format {
            ImageFormat::Raw => {
                let f = File::open(path).map_err(io_err(path, "cannot open"))?;
                let size = f.metadata().map_err(io_err(path, "cannot stat"))?.len();
                (Source::Raw(f), size)
            }
            ImageFormat::Qcow2 => {
                let q = Qcow2::open(path, true).map_err(qcow_err(path))?;
                let size = q.virtual_size();
                (Source::Qcow2(Box::new(q)), size)
            }
        })
    }

    /// Whether `len` bytes at `offset` certainly read as zero without
    /// reading them (a hole, a zero cluster, an unallocated cluster with no
    /// backing file).
    fn known_zero(&mut self, offset: u64, len: u64) -> io::Result<bool> {
        match self {
            Source::Raw(f) => {
                // SAFETY: lseek on a descriptor `f` owns; it only moves the
                // file offset, which nothing else here uses.
                let data = unsafe {
                    libc::lseek(
                        f.as_raw_fd(),
                        libc::off_t::try_from(offset).unwrap_or(libc::off_t::MAX),
                        libc::SEEK_DATA,
                    )
                };
                // ENXIO: no data at or after `offset`.
                Ok(match u64::try_from(data) {
                    Ok(d) => d >= offset + len,
                    Err(_) => io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO),
                })
            }
            Source::Qcow2(q) => {
                let mut at = offset;
                while at < offset + len {
                    let e = q.map(at, offset + len - at)?;
                    let zero = match e.kind {
                        ExtentKind::Zero => true,
                        ExtentKind::Backing => q.backing_chain().len() <= 1,
                        _ => false,
                    };
                    if !zero || e.len == 0 {
                        return Ok(false);
                    }
                    at += e.len;
                }
                Ok(true)
            }
        }
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Source::Raw(f) => f.read_exact_at(buf, offset),
            Source::Qcow2(q) => q.read_at(buf, offset),
        }
    }
}

/// Where `convert` writes: `(bytes, offset)`, whatever the format.
type Sink = Box<dyn FnMut(&[u8], u64) -> io::Result<()>>;

/// The chunk `convert` copies at a time.
const CONVERT_CHUNK: usize = 1 << 20;
/// The unit it checks for zeros: a range of zeros this big stays a hole.
const ZERO_GRAIN: usize = 64 << 10;

pub(super) fn convert(
    source: &Path,
    format: Option<ImageFormat>,
    dest: &Path,
    out_format: ImageFormat,
    options: &[String],
) -> Result<()> {
    let format = format_of(source, format)?;
    let (mut src, size) = Source::open(source, format)?;
    let o = parse_options(options)?;
    if o.backing_file.is_some() {
        return Err(ImgError::Usage(
            "convert writes a whole image; a backing file for the copy is not supported".into(),
        ));
    }
    // Writes go through `write`, whichever format.
    let mut write: Sink = match out_format {
        ImageFormat::Raw => {
            let f = File::create(dest).map_err(io_err(dest, "cannot create"))?;
            f.set_len(size).map_err(io_err(dest, "cannot size"))?;
            Box::new(move |b, off| f.write_all_at(b, off))
        }
        ImageFormat::Qcow2 => {
            let defaults = CreateOptions::default();
            ember_qcow2::create(
                dest,
                &CreateOptions {
                    size: size.div_ceil(512) * 512,
                    cluster_size: o.cluster_size.unwrap_or(defaults.cluster_size),
                    version: o.version.unwrap_or(defaults.version),
                    refcount_bits: o.refcount_bits.unwrap_or(defaults.refcount_bits),
                    ..defaults
                },
            )
            .map_err(qcow_err(dest))?;
            let mut q = Qcow2::open(dest, false).map_err(qcow_err(dest))?;
            Box::new(move |b, off| q.write_at(b, off))
        }
    };
    let mut buf = vec![0u8; CONVERT_CHUNK];
    let mut offset = 0u64;
    while offset < size {
        let n = usize::try_from((size - offset).min(CONVERT_CHUNK as u64)).unwrap_or(CONVERT_CHUNK);
        if !src
            .known_zero(offset, n as u64)
            .map_err(io_err(source, "cannot map"))?
        {
            src.read_at(&mut buf[..n], offset)
                .map_err(io_err(source, "cannot read"))?;
            let mut at = 0;
            while at < n {
                let m = ZERO_GRAIN.min(n - at);
                let piece = &buf[at..at + m];
                if piece.iter().any(|&b| b != 0) {
                    write(piece, offset + at as u64).map_err(io_err(dest, "cannot write"))?;
                }
                at += m;
            }
        }
        offset += n as u64;
    }
    drop(write);
    // Durable before we say it is done.
    File::open(dest)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dest, "cannot sync"))
}

pub(super) fn resize(
    file: &Path,
    format: Option<ImageFormat>,
    size: &str,
    shrink: bool,
) -> Result<()> {
    let format = format_of(file, format)?;
    let current = virtual_size(file, format)?;
    let new = if let Some(rest) = size.strip_prefix('+') {
        current
            .checked_add(parse_size(rest)?)
            .ok_or_else(|| ImgError::Size(size.into()))?
    } else if let Some(rest) = size.strip_prefix('-') {
        current
            .checked_sub(parse_size(rest)?)
            .ok_or_else(|| ImgError::Usage(format!("{size}: below zero")))?
    } else {
        parse_size(size)?
    };
    if new % 512 != 0 {
        return Err(ImgError::Usage(format!(
            "new size {new} is not a multiple of 512 bytes"
        )));
    }
    match format {
        ImageFormat::Raw => {
            if new < current && !shrink {
                return Err(ImgError::Usage(
                    "use the --shrink option to shrink a raw image (the data past the new end is lost)".into(),
                ));
            }
            let f = OpenOptions::new()
                .write(true)
                .open(file)
                .map_err(io_err(file, "cannot open"))?;
            f.set_len(new).map_err(io_err(file, "cannot resize"))?;
            f.sync_all().map_err(io_err(file, "cannot sync"))
        }
        ImageFormat::Qcow2 => {
            let mut q = Qcow2::open(file, false).map_err(qcow_err(file))?;
            q.resize(new).map_err(qcow_err(file))?;
            q.flush().map_err(io_err(file, "cannot sync"))
        }
    }
}
