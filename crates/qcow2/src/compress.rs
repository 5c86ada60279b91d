//! Compressed clusters: raw deflate (compression type 0, zlib's 12-bit
//! window), through `flate2`'s pure-Rust backend.

use flate2::{Decompress, FlushDecompress, Status};

/// Inflates `input` (a compressed cluster's bytes as the L2 entry bounds
/// them) into exactly `cluster_size` bytes, or says why it cannot.
pub(crate) fn inflate_cluster(input: &[u8], cluster_size: usize) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; cluster_size];
    let mut d = Decompress::new(false);
    match d.decompress(input, &mut out, FlushDecompress::Finish) {
        // QEMU accepts a stream that filled the cluster, ended or not.
        Ok(Status::StreamEnd | Status::Ok | Status::BufError)
            if u64::try_from(cluster_size).is_ok_and(|c| d.total_out() == c) =>
        {
            Ok(out)
        }
        Ok(_) => Err(format!(
            "the data inflates to {} bytes, not a cluster of {cluster_size}",
            d.total_out()
        )),
        Err(e) => Err(format!("the deflate stream is invalid ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    #[test]
    fn inflate_cluster_round_trips_raw_deflate() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut c = Compress::new(Compression::default(), false);
        let mut out = vec![0u8; 8192];
        c.compress(&data, &mut out, FlushCompress::Finish).unwrap();
        let n = usize::try_from(c.total_out()).unwrap();
        assert_eq!(inflate_cluster(&out[..n], 4096).unwrap(), data);
    }

    #[test]
    fn inflate_cluster_garbage_is_an_error() {
        assert!(inflate_cluster(&[0xff; 64], 4096).is_err());
        assert!(inflate_cluster(&[], 4096).is_err());
    }
}
