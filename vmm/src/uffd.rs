//! The `Uffd` memory backend of a snapshot load (Firecracker's): guest RAM
//! is mapped anonymously and registered with a userfaultfd, which goes to a
//! page-fault handler listening on a Unix socket with a JSON description
//! of the regions (`ember_uffd`'s handshake). From then on the handler
//! fills each page on its first touch.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ember_memory::GuestMemoryMmap;
use ember_uffd::userfaultfd::Uffd;
use ember_uffd::GuestRegionUffdMapping;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::{Error, Result};

/// How long the handler may take to serve the first page of a guest with
/// `memory_mib` of RAM: 5 s, and 5 s more per GiB, since some handlers
/// (Firecracker's examples) read the whole memory file before serving.
pub fn first_page_timeout(memory_mib: u64) -> Duration {
    Duration::from_secs(5 + 5 * memory_mib / 1024)
}

/// The userfaultfd and the connection to the handler, kept for the VM's
/// life (the handler takes a closed connection as "the VMM is gone").
#[derive(Debug)]
pub struct UffdBackend {
    _uffd: Uffd,
    _stream: UnixStream,
}

fn err(socket: &Path, what: String) -> Error {
    Error::Restore(format!("Uffd backend {}: {what}", socket.display()))
}

/// Registers `mem` (anonymous, untouched) with a new userfaultfd, hands
/// it to the handler listening on `socket` with region `i` at memory file
/// offset `offsets[i]`, and waits up to `timeout` for the handler to
/// serve a first page: a handler that never answers is an error here,
/// not a VM that hangs later.
pub fn attach(
    mem: &GuestMemoryMmap,
    socket: &Path,
    offsets: &[u64],
    timeout: Duration,
) -> Result<UffdBackend> {
    let uffd = ember_uffd::create_vmm_uffd()
        .map_err(|e| err(socket, format!("cannot create a userfaultfd: {e}")))?;
    let mut regions = Vec::with_capacity(offsets.len());
    for (region, &offset) in mem.iter().zip(offsets) {
        let ptr = region.as_ptr();
        let size = usize::try_from(region.len()).map_err(|e| err(socket, e.to_string()))?;
        uffd.register(ptr.cast(), size)
            .map_err(|e| err(socket, format!("cannot register guest memory: {e}")))?;
        regions.push(GuestRegionUffdMapping {
            base_host_virt_addr: ptr as u64,
            size,
            offset,
            page_size: 4096,
        });
    }
    let stream = UnixStream::connect(socket).map_err(|e| {
        err(
            socket,
            format!("cannot connect to the page-fault handler: {e}"),
        )
    })?;
    ember_uffd::send_handshake(&stream, &regions, uffd.as_raw_fd())
        .map_err(|e| err(socket, format!("cannot send the handshake: {e}")))?;
    // The first touch blocks until the handler serves it: make it on a
    // thread that holds its own reference to the memory (if the handler
    // never answers, that thread waits on and the mapping stays valid).
    let probe = mem.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("ember-uffd-probe".into())
        .spawn(move || {
            let first: std::result::Result<u8, _> = probe.read_obj(GuestAddress(0));
            let _ = tx.send(first.is_ok());
        })
        .map_err(|e| err(socket, format!("cannot start the probe thread: {e}")))?;
    match rx.recv_timeout(timeout) {
        Ok(true) => {}
        Ok(false) => return Err(err(socket, "guest memory cannot be read".into())),
        Err(_) => {
            return Err(err(
                socket,
                format!(
                    "the page-fault handler did not serve guest memory within {} s",
                    timeout.as_secs()
                ),
            ))
        }
    }
    Ok(UffdBackend {
        _uffd: uffd,
        _stream: stream,
    })
}
