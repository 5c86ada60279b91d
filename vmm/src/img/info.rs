//! `ember img info` and `check`: qemu-img's facts, keys and wording.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ember_qcow2::{ImageFormat, Qcow2};
use serde_json::{json, Map, Value};

use super::{format_of, human_size, io_err, qcow_err, virtual_size, ImgError, Output, Result};

/// Bytes the file takes on its filesystem.
fn actual_size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .map_err(io_err(path, "cannot stat"))?
        .blocks()
        * 512)
}

/// One image's facts as qemu-img's JSON has them.
fn image_json(path: &Path, format: ImageFormat) -> Result<(Map<String, Value>, Option<PathBuf>)> {
    let mut m = Map::new();
    let actual = actual_size(path)?;
    let mut next = None;
    match format {
        ImageFormat::Raw => {
            m.insert("virtual-size".into(), json!(virtual_size(path, format)?));
            m.insert("filename".into(), json!(path.display().to_string()));
            m.insert("format".into(), json!("raw"));
            m.insert("actual-size".into(), json!(actual));
            m.insert("dirty-flag".into(), json!(false));
        }
        ImageFormat::Qcow2 => {
            let image = Qcow2::open(path, true).map_err(qcow_err(path))?;
            let info = image.info();
            m.insert("virtual-size".into(), json!(info.virtual_size));
            m.insert("filename".into(), json!(path.display().to_string()));
            m.insert("cluster-size".into(), json!(info.cluster_size));
            m.insert("format".into(), json!("qcow2"));
            m.insert("actual-size".into(), json!(actual));
            m.insert(
                "format-specific".into(),
                json!({
                    "type": "qcow2",
                    "data": {
                        "compat": info.compat,
                        "compression-type": "zlib",
                        "lazy-refcounts": info.lazy_refcounts,
                        "refcount-bits": info.refcount_bits,
                        "corrupt": info.corrupt,
                        "extended-l2": false,
                    }
                }),
            );
            if let Some(b) = &info.backing_file {
                let full = image
                    .backing_chain()
                    .into_iter()
                    .find(|(p, _)| p.as_path() != path)
                    .map(|(p, _)| p);
                m.insert(
                    "full-backing-filename".into(),
                    json!(full
                        .as_ref()
                        .map_or_else(|| b.clone(), |p| p.display().to_string())),
                );
                m.insert("backing-filename".into(), json!(b));
                if let Some(f) = info.backing_format {
                    m.insert("backing-filename-format".into(), json!(f.to_string()));
                }
                next = full;
            }
            m.insert("dirty-flag".into(), json!(info.dirty));
        }
    }
    Ok((m, next))
}

/// `ember img info`'s whole output.
pub fn info_text(
    path: &Path,
    format: Option<ImageFormat>,
    output: Output,
    backing_chain: bool,
) -> Result<String> {
    let mut images = Vec::new();
    let mut at = path.to_path_buf();
    let mut fmt = format_of(path, format)?;
    loop {
        let (m, next) = image_json(&at, fmt)?;
        let backing_fmt = m
            .get("backing-filename-format")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok());
        images.push(m);
        match (backing_chain, next) {
            (true, Some(n)) if images.len() < 64 => {
                fmt = match backing_fmt {
                    Some(f) => f,
                    None => format_of(&n, None)?,
                };
                at = n;
            }
            _ => break,
        }
    }
    Ok(match output {
        Output::Json => {
            let v = if backing_chain {
                Value::Array(images.into_iter().map(Value::Object).collect())
            } else {
                Value::Object(images.into_iter().next().unwrap_or_default())
            };
            let mut s = pretty(&v);
            s.push('\n');
            s
        }
        Output::Human => images.iter().map(human_info).collect::<Vec<_>>().join("\n"),
    })
}

/// JSON with qemu's four-space indent.
fn pretty(v: &Value) -> String {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    // Serialising a Value into a Vec cannot fail.
    let _ = v.serialize(&mut ser);
    String::from_utf8(out).unwrap_or_default()
}

fn human_info(m: &Map<String, Value>) -> String {
    let s = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let n = |k: &str| m.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mut out = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        s("filename"),
        s("format"),
        human_size(n("virtual-size")),
        n("virtual-size"),
        human_size(n("actual-size"))
    );
    if m.contains_key("cluster-size") {
        out.push_str(&format!("cluster_size: {}\n", n("cluster-size")));
    }
    if m.contains_key("backing-filename") {
        out.push_str(&format!("backing file: {}\n", s("backing-filename")));
        if m.contains_key("backing-filename-format") {
            out.push_str(&format!(
                "backing file format: {}\n",
                s("backing-filename-format")
            ));
        }
    }
    if let Some(d) = m
        .get("format-specific")
        .and_then(|f| f.get("data"))
        .and_then(Value::as_object)
    {
        out.push_str("Format specific information:\n");
        // qemu-img's order.
        for k in [
            "compat",
            "compression-type",
            "lazy-refcounts",
            "refcount-bits",
            "corrupt",
            "extended-l2",
        ] {
            let v = match d.get(k) {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => continue,
            };
            out.push_str(&format!("    {}: {v}\n", k.replace('-', " ")));
        }
    }
    out
}

pub(super) fn check(
    file: &Path,
    format: Option<ImageFormat>,
    repair: Option<&str>,
    output: Output,
    quiet: bool,
) -> Result<i32> {
    let repair = match repair {
        None => false,
        Some("leaks" | "all") => true,
        Some(r) => return Err(ImgError::Usage(format!("-r {r}: use leaks or all"))),
    };
    if format_of(file, format)? == ImageFormat::Raw {
        eprintln!("ember img: This image format does not support checks");
        return Ok(63);
    }
    let report = match ember_qcow2::check(file, repair) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "ember img: {}: check failed: {}",
                file.display(),
                crate::error_chain(&e)
            );
            return Ok(1);
        }
    };
    let status = if report.corruptions > 0 {
        2
    } else if report.leaks > report.leaks_fixed {
        3
    } else {
        0
    };
    if output == Output::Json {
        let mut m = Map::new();
        m.insert("image-end-offset".into(), json!(report.image_end_offset));
        m.insert("total-clusters".into(), json!(report.total_clusters));
        m.insert("check-errors".into(), json!(0));
        if report.leaks > 0 {
            m.insert("leaks".into(), json!(report.leaks - report.leaks_fixed));
        }
        if report.leaks_fixed > 0 {
            m.insert("leaks-fixed".into(), json!(report.leaks_fixed));
        }
        if report.corruptions > 0 {
            m.insert("corruptions".into(), json!(report.corruptions));
        }
        m.insert(
            "allocated-clusters".into(),
            json!(report.allocated_clusters),
        );
        m.insert(
            "fragmented-clusters".into(),
            json!(report.fragmented_clusters),
        );
        m.insert("filename".into(), json!(file.display().to_string()));
        m.insert("format".into(), json!("qcow2"));
        println!("{}", pretty(&Value::Object(m)));
        return Ok(status);
    }
    if quiet && status == 0 {
        return Ok(0);
    }
    for line in &report.messages {
        println!("{line}");
    }
    if report.leaks_fixed > 0 {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    0 corruptions\n",
            report.leaks_fixed
        );
    }
    if status == 0 {
        println!("No errors were found on the image.");
    }
    if report.corruptions > 0 {
        println!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
            report.corruptions
        );
    }
    if report.leaks > report.leaks_fixed {
        println!(
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
            report.leaks - report.leaks_fixed
        );
    }
    if report.total_clusters > 0 && report.allocated_clusters > 0 {
        let pct = |n: u64| 100.0 * n as f64 / report.total_clusters as f64;
        let frag = 100.0 * report.fragmented_clusters as f64 / report.allocated_clusters as f64;
        println!(
            "{}/{} = {:.2}% allocated, {frag:.2}% fragmented, 0.00% compressed clusters",
            report.allocated_clusters,
            report.total_clusters,
            pct(report.allocated_clusters)
        );
    }
    println!("Image end offset: {}", report.image_end_offset);
    Ok(status)
}
