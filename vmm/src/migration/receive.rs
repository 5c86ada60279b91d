//! The destination's side, on the VMM thread of an ember with no VM yet:
//! listen, check the CPU and layout before any memory moves, write the
//! pages into fresh guest memory, then build the VM from the state once
//! the source has let go of its disks.

use std::io::BufReader;
use std::time::Instant;

use ember_memory::{GuestMemoryMmap, MemoryLayout};
use ember_migration::transport::{Connection, Listener, Url};
use ember_migration::{memory::apply, write_reply, Event, Receiver, Reply};

use super::{decode_state, postcopy, Hello, Incoming};
use crate::seccomp::Filters;
use crate::snapshot::{LoadParams, MemorySource, VM_STATE_VERSION};
use crate::vm::Hypervisor;
use crate::{Boot, Console, Error, Result, Vmm};

/// How long the destination waits for the next bytes of a stream that has
/// begun (a source that stalls this long has failed).
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A VM received and built, paused: the caller starts it, resumes it (if
/// `resume`), then answers `Done` on `back`.
pub struct Received {
    /// The VM.
    pub vmm: Vmm,
    /// Whether the guest ran at the source (it runs here too).
    pub resume: bool,
    /// The back channel, for `Done`.
    pub back: Connection,
    /// What the source said first.
    pub hello: Hello,
    /// Pages written into guest memory.
    pub pages: u64,
    /// When the state arrived (the source paused the guest shortly before).
    pub state_at: Instant,
    /// When the source connected.
    pub accepted_at: Instant,
    /// Post-copy: the threads that serve the pages still to come.
    pub postcopy: Option<Incoming>,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("resume", &self.resume)
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

fn fail(msg: impl Into<String>) -> Error {
    Error::Migration(msg.into())
}

/// What a post-copy's threads need of the instance.
pub struct Env<'a> {
    /// Written when a post-copy ends.
    pub wake: &'a vmm_sys_util::eventfd::EventFd,
    /// The threads' filters.
    pub filters: &'a Filters,
    /// Readable when a stop signal is pending: the wait for a source ends.
    pub stop: Option<std::os::fd::RawFd>,
}

/// Listens at `url` for one source and receives its VM. Any problem is an
/// error naming it; the source is told (`Refused`) when it can be, and
/// nothing stays built here.
pub fn receive(url: &Url, console: Console, started: Instant, env: Env<'_>) -> Result<Received> {
    let listener = Listener::bind(url).map_err(|e| fail(crate::error_chain(&e)))?;
    log::info!("migration: waiting for the source on {}", listener.url());
    let conn = match env.stop {
        Some(stop) => listener
            .accept_unless(stop)
            .map_err(|e| fail(crate::error_chain(&e)))?
            .ok_or(Error::Interrupted)?,
        None => listener
            .accept()
            .map_err(|e| fail(crate::error_chain(&e)))?,
    };
    drop(listener);
    let accepted_at = Instant::now();
    let mut back = conn.try_clone().map_err(|e| fail(format!("socket: {e}")))?;
    conn.set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| fail(format!("socket: {e}")))?;
    match receive_on(conn, &mut back, console, started, env) {
        Ok((vmm, resume, hello, pages, state_at, postcopy)) => Ok(Received {
            vmm,
            resume,
            back,
            hello,
            pages,
            state_at,
            accepted_at,
            postcopy,
        }),
        Err(e) => {
            let why = crate::error_chain(&e);
            // The source may no longer listen; it fails on its own then.
            let _ = write_reply(&mut back, &Reply::Refused(why));
            Err(e)
        }
    }
}

type Parts = (Vmm, bool, Hello, u64, Instant, Option<Incoming>);

fn receive_on(
    conn: Connection,
    back: &mut Connection,
    console: Console,
    started: Instant,
    threads: Env<'_>,
) -> Result<Parts> {
    let t = Instant::now();
    let stream = |e: ember_migration::Error| fail(crate::error_chain(&e));
    // Descriptors that ride on frames land in the connection's stash.
    let probe = conn.try_clone().map_err(|e| fail(format!("socket: {e}")))?;
    let mut r = Receiver::new(BufReader::with_capacity(1 << 20, conn)).map_err(stream)?;
    let Event::Start(payload) = r.next().map_err(stream)? else {
        return Err(fail("the stream does not begin with Start"));
    };
    let hello: Hello = serde_json::from_slice(&payload)
        .map_err(|e| fail(format!("the start of the stream is not valid: {e}")))?;
    let (hv, ml) = check_hello(&hello)?;
    write_reply(&mut *back, &Reply::Ready).map_err(stream)?;
    log::info!(
        "migration: accepted a {}-vCPU {} MiB guest ({} CPU) from ember {}",
        hello.machine.vcpus,
        hello.machine.memory_mib,
        hello.cpu.model,
        hello.ember_version
    );

    let mut pages = 0u64;
    let mut mem = None;
    let mut local = false;
    let mut stale = None;
    let payload = loop {
        match r.next().map_err(stream)? {
            e @ (Event::Pages(_) | Event::ZeroPages(_)) => {
                if mem.is_none() {
                    mem = Some(create_memory(&ml, &hello.machine)?);
                }
                if local {
                    return Err(fail("pages after the memory was handed over as a file"));
                }
                if let Some(m) = &mem {
                    pages += apply(m, &e).map_err(stream)?;
                }
            }
            Event::MemoryFd(p) => {
                if mem.is_some() {
                    return Err(fail("the memory file comes after pages were sent"));
                }
                let layout: super::MemoryFile = serde_json::from_slice(&p)
                    .map_err(|e| fail(format!("the memory file's layout is not valid: {e}")))?;
                let files = probe.take_fds();
                let [file] = files.as_slice() else {
                    return Err(fail(format!(
                        "the memory file's frame came with {} descriptors, not 1 (is the source on this host, on a Unix socket?)",
                        files.len()
                    )));
                };
                let m = ml
                    .map_shared(file, &layout.offsets, true)
                    .map_err(|e| fail(format!("the memory file handed over: {e}")))?;
                // The source's own memory: only the advice and the binding.
                let placed = crate::config::MemoryBackend {
                    hugepages: None,
                    prefault: false,
                    ..hello.machine.memory_backend
                };
                crate::memory::place(&m, &ml, &placed, &hello.machine.numa)?;
                mem = Some(m);
                local = true;
            }
            Event::Postcopy(set) => {
                if local {
                    return Err(fail("post-copy after the memory was handed over as a file"));
                }
                let m = match &mem {
                    Some(m) => m,
                    None => mem.insert(create_memory(&ml, &hello.machine)?),
                };
                postcopy::discard_stale(m, &set)?;
                stale = Some(set);
            }
            Event::Sync => write_reply(&mut *back, &Reply::Synced).map_err(stream)?,
            Event::State(s) => break s,
            other => return Err(fail(format!("unexpected {other:?} in the memory phase"))),
        }
    };
    let mem = match mem {
        Some(m) => m,
        // A guest whose memory is all zeros sends no page.
        None => create_memory(&ml, &hello.machine)?,
    };
    let state_at = Instant::now();
    if r.next().map_err(stream)? != Event::End {
        return Err(fail("the state is not followed by End"));
    }
    let (resume, env) = decode_state(&payload).map_err(fail)?;
    if env.state.machine != hello.machine || env.state.cpu != hello.cpu {
        return Err(fail(
            "the state describes another machine than the start of the stream",
        ));
    }
    let load = LoadParams {
        state_path: Default::default(),
        memory: MemorySource::File(Default::default()),
        network_overrides: Vec::new(),
        disk_overrides: Vec::new(),
        track_dirty_pages: false,
        vsock_override: None,
    };
    let cfg = crate::snapshot::config_for(&env.state, &load)?;
    write_reply(&mut *back, &Reply::Received).map_err(stream)?;
    // The source lets go of the disks; then they are opened (and locked)
    // here.
    if r.next().map_err(stream)? != Event::Release {
        return Err(fail("the source did not release the guest"));
    }
    // A local migration's taps came with the release.
    let taps = probe.take_fds();
    let want: usize = cfg.nets.iter().map(|(n, _)| n.descriptors()).sum();
    if local && taps.len() != want {
        return Err(fail(format!(
            "{} tap descriptors handed over for {} NICs, which have {want} queues",
            taps.len(),
            cfg.nets.len()
        )));
    }
    let mut cfg = cfg;
    cfg.memory_shared = hello.machine.shared_memory;
    // Post-copy: the fault and page threads run before anything touches
    // guest memory.
    let incoming = match stale {
        Some(set) => Some(Incoming::start(
            &mem,
            set,
            r,
            back,
            threads
                .wake
                .try_clone()
                .map_err(|e| Error::EventFd("post-copy wake-up", e))?,
            threads.filters,
        )?),
        None => None,
    };
    let vmm = Vmm::assemble(
        &hv,
        &cfg,
        &ml,
        mem,
        console,
        started,
        Boot::Restore(&env.state, if local { &taps } else { &[] }),
    )?;
    log::info!(
        "migration: {pages} pages and the state received in {:.1} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    Ok((vmm, resume, hello, pages, state_at, incoming))
}

/// The destination's guest memory, backed and placed as the source's was
/// (huge pages, THP, KSM, NUMA binding), shared when the source's was; not
/// prefaulted: the stream fills it.
fn create_memory(ml: &MemoryLayout, m: &crate::snapshot::Machine) -> Result<GuestMemoryMmap> {
    let backend = crate::config::MemoryBackend {
        shared: m.shared_memory,
        prefault: false,
        ..m.memory_backend
    };
    crate::memory::create(ml, &backend, &m.numa)
}

/// What is checked before any memory moves: the state layout version, the
/// placement (host nodes and CPUs), the vCPU count, the
/// memory layout and every CPU feature the guest saw.
fn check_hello(hello: &Hello) -> Result<(Hypervisor, MemoryLayout)> {
    if hello.vm_state_version != VM_STATE_VERSION {
        return Err(fail(format!(
            "VM state version {} is not supported (this ember reads {VM_STATE_VERSION})",
            hello.vm_state_version
        )));
    }
    hello.machine.check_placement()?;
    let hv = Hypervisor::open()?;
    hv.check_vcpus(hello.machine.vcpus)?;
    let ml = MemoryLayout::new(hello.machine.memory_mib)?;
    ml.check_phys_bits(hv.phys_address_bits())?;
    if ml.ram_regions() != hello.memory {
        return Err(fail(format!(
            "the memory regions {:x?} do not match a {} MiB guest",
            hello.memory, hello.machine.memory_mib
        )));
    }
    let host = crate::cpu::host_cpu(&hv, crate::cpu::Probe::NewVcpu)?;
    hello
        .cpu
        .check(&host)
        .map_err(|e| fail(format!("this host cannot run the guest's CPU: {e}")))?;
    Ok((hv, ml))
}
