//! `ember-uffd-handler SOCKET_PATH MEMORY_FILE`: serves one VMM's guest
//! memory from a snapshot's memory file over userfaultfd, speaking
//! Firecracker's handshake. See the README.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use ember_uffd::{error_chain, receive_handshake, serve, MemoryFile};

/// How long the VMM may take to send the handshake once it has connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const USAGE: &str = "usage: ember-uffd-handler SOCKET_PATH MEMORY_FILE";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag] if flag == "-h" || flag == "--help" => {
            println!("{USAGE}\n\nListens on SOCKET_PATH for one VMM restoring a snapshot with the Uffd memory backend and serves its page faults from MEMORY_FILE until the VMM exits.");
            ExitCode::SUCCESS
        }
        [socket, memory] => match run(Path::new(socket), Path::new(memory)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ember-uffd-handler: error: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run(socket: &Path, memory: &Path) -> Result<(), String> {
    let memory = MemoryFile::open(memory).map_err(|e| error_chain(&e))?;
    let listener = UnixListener::bind(socket)
        .map_err(|e| format!("cannot listen on socket {}: {e}", socket.display()))?;
    eprintln!(
        "ember-uffd-handler: listening on {}, serving {} ({} bytes)",
        socket.display(),
        memory.path(),
        memory.len()
    );
    let accepted = listener.accept();
    // One VMM per handler: nobody else may connect.
    drop(listener);
    let _ = std::fs::remove_file(socket);
    let (vmm, _) =
        accepted.map_err(|e| format!("cannot accept on socket {}: {e}", socket.display()))?;

    let handshake =
        receive_handshake(&vmm, Some(HANDSHAKE_TIMEOUT)).map_err(|e| error_chain(&e))?;
    let total: u64 = handshake.regions.iter().map(|r| r.size as u64).sum();
    eprintln!(
        "ember-uffd-handler: {} regions ({} bytes) received",
        handshake.regions.len(),
        total
    );
    for (i, r) in handshake.regions.iter().enumerate() {
        eprintln!(
            "ember-uffd-handler:   region {i}: host {:#x} size {:#x} file offset {:#x} page {}",
            r.base_host_virt_addr, r.size, r.offset, r.page_size
        );
    }

    let stats =
        serve(&handshake.uffd, &handshake.regions, &memory, &vmm).map_err(|e| error_chain(&e))?;
    eprintln!(
        "ember-uffd-handler: VMM gone; {} faults served ({} copied, {} zero), {} already present, {} remove events",
        stats.faults(),
        stats.pages_copied,
        stats.zero_pages,
        stats.already_present,
        stats.remove_events
    );
    Ok(())
}
