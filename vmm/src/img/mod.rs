//! `ember img`: create, inspect, check, convert and resize disk images,
//! with `qemu-img`'s syntax, output and exit statuses where it has them.
//!
//! Unlike the VMM, which opens an image only in the format it is given,
//! these commands probe the format from the contents when `-f` is not
//! given, as `qemu-img` does: they run on the host, at the user's word, on
//! images the user names.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use clap::{Subcommand, ValueEnum};
use ember_qcow2::{CreateOptions, ImageFormat, Qcow2};

mod convert;
mod info;

use convert::{convert, resize};
use info::check;
pub use info::info_text;

/// Why an `ember img` command failed.
#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    /// A size that does not parse.
    #[error(
        "invalid size {0:?}: expected a number of bytes with an optional k, M, G, T, P or E suffix"
    )]
    Size(String),
    /// An `-o` option that ember does not know or cannot use.
    #[error("invalid option {0}")]
    Option(String),
    /// A file could not be read or written.
    #[error("{}: {what}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The qcow2 layer refused (its message names the file).
    #[error(transparent)]
    Qcow2(#[from] ember_qcow2::Error),
    /// Something the command cannot do, said plainly.
    #[error("{0}")]
    Usage(String),
}

type Result<T> = std::result::Result<T, ImgError>;

/// `--output`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Text for people (the default).
    #[default]
    Human,
    /// JSON with qemu-img's keys.
    Json,
}

/// `ember img` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImgCommand {
    /// Create an image: `create [-f raw|qcow2] [-b BACKING -F FMT] [-o OPTIONS] FILE [SIZE]`
    /// (SIZE may be left out with -b: the backing file's size).
    Create {
        /// The new image's format.
        #[arg(short = 'f', value_name = "FMT", default_value = "raw")]
        format: ImageFormat,
        /// A backing file (qcow2 only), relative to the new image's directory.
        #[arg(short = 'b', value_name = "BACKING")]
        backing: Option<String>,
        /// The backing file's format (probed when left out).
        #[arg(short = 'F', value_name = "FMT")]
        backing_format: Option<ImageFormat>,
        /// `cluster_size=BYTES`, `compat=0.10|1.1`, `refcount_bits=N`,
        /// `backing_file=`, `backing_fmt=`, `size=`, comma-separated.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Do not open the backing file (SIZE must be given).
        #[arg(short = 'u')]
        unsafe_backing: bool,
        /// Say nothing.
        #[arg(short = 'q')]
        quiet: bool,
        /// The image to create (replaced if it exists).
        file: PathBuf,
        /// The virtual size: bytes, or with k, M, G, T suffixes.
        size: Option<String>,
    },
    /// Show an image's format, virtual size, allocated size and backing chain.
    Info {
        /// The image's format (probed when left out).
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<ImageFormat>,
        /// `human` or `json`.
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
        /// Same as `--output json`.
        #[arg(long)]
        json: bool,
        /// Show every image of the backing chain.
        #[arg(long)]
        backing_chain: bool,
        /// The image.
        file: PathBuf,
    },
    /// Check a qcow2 image's tables and reference counts. Exit status:
    /// 0 clean, 2 corrupt, 3 leaked clusters only, 1 the check failed,
    /// 63 the format has no checks (raw).
    Check {
        /// The image's format (probed when left out).
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<ImageFormat>,
        /// Repair: `leaks` (or `all`: leaks are all ember repairs).
        #[arg(short = 'r', value_name = "leaks|all")]
        repair: Option<String>,
        /// `human` or `json`.
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
        /// Say nothing but errors.
        #[arg(short = 'q')]
        quiet: bool,
        /// The image.
        file: PathBuf,
    },
    /// Copy an image into another format, flattening its backing chain;
    /// zero ranges stay unallocated in the copy.
    Convert {
        /// The source's format (probed when left out).
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<ImageFormat>,
        /// The copy's format.
        #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
        output_format: ImageFormat,
        /// Options for the copy (as `create -o`).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Show progress (accepted for qemu-img's sake; ember is quiet).
        #[arg(short = 'p')]
        progress: bool,
        /// Say nothing.
        #[arg(short = 'q')]
        quiet: bool,
        /// The source image.
        source: PathBuf,
        /// The copy (replaced if it exists).
        dest: PathBuf,
    },
    /// Change an image's virtual size: `resize [-f FMT] [--shrink] FILE [+|-]SIZE`.
    Resize {
        /// The image's format (probed when left out).
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<ImageFormat>,
        /// Allow a raw image to shrink (the data past the new end is lost).
        #[arg(long)]
        shrink: bool,
        /// Say nothing.
        #[arg(short = 'q')]
        quiet: bool,
        /// The image.
        file: PathBuf,
        /// The new size, or `+SIZE`/`-SIZE` relative to the current one.
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
}

/// Runs one command; the exit status on success.
pub fn run(cmd: ImgCommand) -> Result<i32> {
    match cmd {
        ImgCommand::Create {
            format,
            backing,
            backing_format,
            options,
            unsafe_backing,
            quiet,
            file,
            size,
        } => create(
            &file,
            format,
            backing,
            backing_format,
            &options,
            size.as_deref(),
            unsafe_backing,
            quiet,
        ),
        ImgCommand::Info {
            format,
            output,
            json,
            backing_chain,
            file,
        } => {
            let output = if json { Output::Json } else { output };
            print!("{}", info_text(&file, format, output, backing_chain)?);
            Ok(0)
        }
        ImgCommand::Check {
            format,
            repair,
            output,
            quiet,
            file,
        } => check(&file, format, repair.as_deref(), output, quiet),
        ImgCommand::Convert {
            format,
            output_format,
            options,
            progress: _,
            quiet: _,
            source,
            dest,
        } => {
            convert(&source, format, &dest, output_format, &options)?;
            Ok(0)
        }
        ImgCommand::Resize {
            format,
            shrink,
            quiet,
            file,
            size,
        } => {
            resize(&file, format, &size, shrink)?;
            if !quiet {
                println!("Image resized.");
            }
            Ok(0)
        }
    }
}

/// Parses `64M`, `10G`, `512`, `1.5G` (binary units, as qemu-img).
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || ImgError::Size(s.to_string());
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, ""),
    };
    let shift = match unit {
        "" | "b" | "B" => 0,
        "k" | "K" | "KiB" | "kB" => 10,
        "M" | "m" | "MiB" | "MB" => 20,
        "G" | "g" | "GiB" | "GB" => 30,
        "T" | "t" | "TiB" | "TB" => 40,
        "P" | "p" | "PiB" | "PB" => 50,
        "E" | "e" | "EiB" | "EB" => 60,
        _ => return Err(bad()),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(1u64 << shift).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let bytes = f * (1u64 << shift) as f64;
    if !(0.0..1.8e19).contains(&bytes) || bytes.fract() != 0.0 {
        return Err(bad());
    }
    // Checked to be a whole number inside u64's range just above.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(bytes as u64)
}

/// qemu's `size_to_str`: three significant digits and a binary unit.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let mut s = format!("{v:.decimals$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{s} {}", UNITS[unit])
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> ImgError + 'a {
    move |source| ImgError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn qcow_err(_path: &Path) -> impl FnOnce(ember_qcow2::Error) -> ImgError {
    ImgError::Qcow2
}

/// The format `-f` gave, or the one the contents show.
fn format_of(path: &Path, given: Option<ImageFormat>) -> Result<ImageFormat> {
    match given {
        Some(f) => Ok(f),
        None => ember_qcow2::probe(path).map_err(qcow_err(path)),
    }
}

/// `-o` options, merged.
#[derive(Default)]
struct CreateOpts {
    cluster_size: Option<u32>,
    version: Option<u32>,
    refcount_bits: Option<u32>,
    backing_file: Option<String>,
    backing_fmt: Option<ImageFormat>,
    size: Option<u64>,
}

fn parse_options(options: &[String]) -> Result<CreateOpts> {
    let mut o = CreateOpts::default();
    for kv in options.iter().flat_map(|s| s.split(',')) {
        if kv.is_empty() {
            continue;
        }
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| ImgError::Option(format!("{kv:?}: expected key=value")))?;
        let num = |v: &str| -> Result<u32> {
            parse_size(v)
                .ok()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| ImgError::Option(format!("{k}={v}: not a number")))
        };
        match k {
            "cluster_size" => o.cluster_size = Some(num(v)?),
            "refcount_bits" => o.refcount_bits = Some(num(v)?),
            "compat" => {
                o.version = Some(match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(ImgError::Option(format!("compat={v}: use 0.10 or 1.1"))),
                })
            }
            "backing_file" => o.backing_file = Some(v.to_string()),
            "backing_fmt" => {
                o.backing_fmt = Some(v.parse().map_err(|_| {
                    ImgError::Option(format!("backing_fmt={v}: use raw or qcow2"))
                })?)
            }
            "size" => o.size = Some(parse_size(v)?),
            _ => {
                return Err(ImgError::Option(format!(
                "{k}: ember knows cluster_size, compat, refcount_bits, backing_file, backing_fmt and size"
            )))
            }
        }
    }
    Ok(o)
}

/// The virtual size of the image at `path` in `format`.
fn virtual_size(path: &Path, format: ImageFormat) -> Result<u64> {
    match format {
        ImageFormat::Raw => Ok(std::fs::metadata(path)
            .map_err(io_err(path, "cannot read its size"))?
            .len()),
        ImageFormat::Qcow2 => Ok(Qcow2::open(path, true)
            .map_err(qcow_err(path))?
            .virtual_size()),
    }
}

#[allow(clippy::too_many_arguments)]
fn create(
    file: &Path,
    format: ImageFormat,
    backing: Option<String>,
    backing_format: Option<ImageFormat>,
    options: &[String],
    size: Option<&str>,
    unsafe_backing: bool,
    quiet: bool,
) -> Result<i32> {
    let o = parse_options(options)?;
    let backing = backing.or(o.backing_file);
    let backing_format = backing_format.or(o.backing_fmt);
    let size = match size {
        Some(s) => Some(parse_size(s)?),
        None => o.size,
    };
    if backing.is_some() && format == ImageFormat::Raw {
        return Err(ImgError::Usage(
            "a raw image cannot have a backing file; use -f qcow2".into(),
        ));
    }
    // The backing file, as the new image will find it.
    let backing_path = backing.as_ref().map(|b| {
        let p = Path::new(b);
        if p.is_relative() {
            file.parent().unwrap_or(Path::new(".")).join(p)
        } else {
            p.to_path_buf()
        }
    });
    let backing_format = match (&backing_path, backing_format) {
        (Some(_), Some(f)) => Some(f),
        (Some(p), None) if !unsafe_backing => Some(format_of(p, None)?),
        (Some(_), None) => {
            return Err(ImgError::Usage(
                "-u needs the backing file's format (-F)".into(),
            ))
        }
        (None, f) => f,
    };
    let size = match (size, &backing_path, backing_format) {
        (Some(s), _, _) => s,
        (None, Some(p), Some(f)) if !unsafe_backing => virtual_size(p, f)?,
        _ => {
            return Err(ImgError::Usage(
                "the image's size is missing (give SIZE, or a backing file to take it from)".into(),
            ))
        }
    };
    if size % 512 != 0 {
        return Err(ImgError::Usage(format!(
            "size {size} is not a multiple of 512 bytes"
        )));
    }
    match format {
        ImageFormat::Raw => {
            let f = File::create(file).map_err(io_err(file, "cannot create"))?;
            f.set_len(size).map_err(io_err(file, "cannot size"))?;
            if !quiet {
                println!("Formatting '{}', fmt=raw size={size}", file.display());
            }
        }
        ImageFormat::Qcow2 => {
            let defaults = CreateOptions::default();
            let opts = CreateOptions {
                size,
                cluster_size: o.cluster_size.unwrap_or(defaults.cluster_size),
                version: o.version.unwrap_or(defaults.version),
                backing_file: backing.clone(),
                backing_format,
                refcount_bits: o.refcount_bits.unwrap_or(defaults.refcount_bits),
            };
            ember_qcow2::create(file, &opts).map_err(qcow_err(file))?;
            if !quiet {
                let mut line = format!(
                    "Formatting '{}', fmt=qcow2 cluster_size={} compression_type=zlib size={size}",
                    file.display(),
                    opts.cluster_size
                );
                if let (Some(b), Some(f)) = (&backing, backing_format) {
                    line.push_str(&format!(" backing_file={b} backing_fmt={f}"));
                }
                line.push_str(&format!(" refcount_bits={}", opts.refcount_bits));
                println!("{line}");
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn img_parse_size_takes_qemu_units_and_rejects_garbage() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        for bad in ["", "G", "12Q", "-1", "1.1.1", "99999999999E"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn img_human_size_matches_qemu() {
        assert_eq!(human_size(67108864), "64 MiB");
        assert_eq!(human_size(200704), "196 KiB");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(1300 << 20), "1.27 GiB");
        assert_eq!(human_size(0), "0 B");
    }
}
